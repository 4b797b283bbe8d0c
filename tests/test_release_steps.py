"""``build_release`` as a list of steps, on a small release: a hand-made base tarball stands in for the
mmdebstrap bootstrap (minutes under qemu-user); everything after it runs for real (tar, mkfs.ext4, debugfs,
mkimage, mkfs.vfat, mtools, sfdisk, bmaptool, the artifact writer), on a 64 MiB slot, in a few seconds.

The stories: two releases built by one process each get their own clock and leave none behind in
``os.environ`` (before, the first build's SOURCE_DATE_EPOCH leaked into every later one); the steps run in order
and report their timings; a build stops at the stage asked for; the manifest keeps its format.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import image.basecache
import image.build
import image.disk
import image.release
import image.rootfs
from artifacts.keys import load_signer
from image.archive import ArchiveState
from image.layers import load_layers, merge_layers
from image.manifest import PreviousRelease, ReleaseManifest
from image.release import STEPS, Stage, build_release, stage_set
from ota_common.errors import UserError

KERNEL = "6.1.0-test-arm64"
ONE, TWO = 1_700_000_000, 1_700_086_400


def _fake_base(path: Path) -> Path:
    """A base rootfs tarball with what the steps read: accounts, a kernel and initrd, dpkg's status."""
    uid, gid = os.getuid(), os.getgid()  # "root" of the fake tree is whoever runs the test: no root needed
    files = {
        "etc/passwd": f"root:x:{uid}:{gid}:root:/root:/bin/sh\n",
        "etc/group": f"root:x:{gid}:\n",
        "etc/hostname": "base\n",
        f"boot/vmlinuz-{KERNEL}": "kernel",
        f"boot/initrd.img-{KERNEL}": "initrd",
        "var/lib/dpkg/status": "Package: base-files\nStatus: install ok installed\nVersion: 12.4\nArchitecture: arm64\n",
    }
    with tarfile.open(path, "w") as tar:
        for d in ("etc", "etc/ssh", "boot", "var", "var/lib", "var/lib/dpkg", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, uid, gid, 1_650_000_000
            tar.addfile(info)
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o644, uid, gid, 1_650_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def small_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A configuration of one small layer for the qemu-virt board (no firmware to download), the bootstrap and
    the preflight (arm64 emulation) replaced; returns the configuration file."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    base = _fake_base(tmp_path / "base.tar")
    monkeypatch.setattr(image.rootfs, "bootstrap", lambda spec, cache, progress=None: base)
    # the archive as it is when this base was "bootstrapped" (no network: tests/test_base_cache.py covers that)
    monkeypatch.setattr(image.basecache, "check_archive",
                        lambda suite, mirror, cache: ArchiveState((), {"base-files": "12.4"}))
    monkeypatch.setattr(image.release, "preflight", lambda: None)
    layers = tmp_path / "config" / "layers"
    (layers / "small").mkdir(parents=True)
    (layers / "small" / "version.j2").write_text("{{ release.name }} {{ release.version }}\n")
    (layers / "small.yaml").write_text("templates:\n  - {src: small/version.j2, dest: /etc/small-version}\n")
    config = tmp_path / "config" / "release.yaml"
    config.write_text("name: small\nlayers: [small]\nboards: [qemu-virt]\nslot_size_mib: 64\nboot_size_mib: 64\n"
                      "data_size_mib: 16\ncompression: none\n")
    return config


@pytest.fixture
def tool_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str], str | None]]:
    """Every program the image modules run: (program, the environment added for it, SOURCE_DATE_EPOCH of this
    process at that moment); the programs still run."""
    calls: list[tuple[str, dict[str, str], str | None]] = []
    for module in (image.rootfs, image.build, image.disk):
        real = module.run  # type: ignore[attr-defined]

        def recording(args: Sequence[Any], *, _real: Callable[..., Any] = real, **kw: Any) -> Any:
            calls.append((Path(os.fspath(args[0])).name, dict(kw.get("env") or {}), os.environ.get("SOURCE_DATE_EPOCH")))
            return _real(args, **kw)

        monkeypatch.setattr(module, "run", recording)
    return calls


def _build(config: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]], **kw: Any) -> image.release.ReleaseResult:
    return build_release(config=config, signer=load_signer(keys["ec"][0]), out=tmp_path / "out",
                         cache_dir=tmp_path / "cache", **kw)


def _stamped_times(artifact: Path) -> set[int]:
    """The times in an artifact that come from the clock: its header and payload members, and the payload's files
    (version, manifest and signature are written at time 0)."""
    with tarfile.open(artifact) as tar:
        times = {m.mtime for m in tar.getmembers() if m.name in {"header.tar", "data/0000.tar"}}
        with tarfile.open(fileobj=tar.extractfile("data/0000.tar")) as data:
            return times | {m.mtime for m in data.getmembers()}


def test_two_releases_in_one_process_each_get_their_own_epoch_and_leave_none_behind(
        small_release: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]],
        tool_runs: list[tuple[str, dict[str, str], str | None]]) -> None:
    """The qemu tests and the demo build several releases in one process. Each must be stamped with its own
    epoch: before, the first build wrote its SOURCE_DATE_EPOCH into os.environ, and every later build read it
    back as its own."""
    results = {}
    for epoch, version in ((ONE, "1.0.0"), (TWO, "1.1.0")):
        tool_runs.clear()
        results[epoch] = _build(small_release, tmp_path, keys, version=version, epoch=epoch)
        assert "SOURCE_DATE_EPOCH" not in os.environ
        ran = {name for name, _, _ in tool_runs}
        assert {"tar", "mkfs.ext4", "debugfs", "mkimage", "mkfs.vfat", "mcopy", "sfdisk", "bmaptool"} <= ran
        assert all(seen is None for _, _, seen in tool_runs)  # never in the process's environment, not even during
        stamping = [(name, env) for name, env, _ in tool_runs if name in {"tar", "mkfs.ext4", "mkimage", "mkfs.vfat",
                                                                          "mmd", "mcopy"}]
        assert stamping and all(env.get("SOURCE_DATE_EPOCH") == str(epoch) for _, env in stamping), stamping
        assert all(env["E2FSPROGS_FAKE_TIME"] == str(epoch) for name, env, _ in tool_runs
                   if name in {"mkfs.ext4", "debugfs"})
    for epoch, result in results.items():
        manifest = json.loads((result.out_dir / "manifest.json").read_text())
        assert manifest["source_date_epoch"] == epoch
        (artifact,) = result.out_dir.glob("*.mender")
        assert _stamped_times(artifact) == {epoch}  # the artifact writer's clock, pinned for this build only
    assert "SOURCE_DATE_EPOCH" not in os.environ


def test_the_epoch_defaults_to_the_environment_of_the_caller(small_release: Path, tmp_path: Path,
                                                             keys: dict[str, tuple[Path, Path]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(TWO))
    result = _build(small_release, tmp_path, keys, stages={"rootfs"})
    assert json.loads((result.out_dir / "manifest.json").read_text())["source_date_epoch"] == TWO
    assert os.environ["SOURCE_DATE_EPOCH"] == str(TWO)


def test_steps_run_in_order_and_each_reports_its_time(small_release: Path, tmp_path: Path,
                                                      keys: dict[str, tuple[Path, Path]]) -> None:
    said: list[str] = []
    result = _build(small_release, tmp_path, keys, progress=said.append, epoch=ONE)
    steps = ["base rootfs", "layers", "rootfs.ext4", "qemu-virt: disk image", "qemu-virt: artifact", "provenance"]
    assert list(result.timings) == steps
    started = [line.removesuffix(" …") for line in said if line.endswith(" …")]
    finished = [line.rsplit(": ", 1)[0] for line in said if line.endswith(" s") and ": " in line]
    assert started == steps and finished == steps, said
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert list(manifest["timings"]) == steps
    assert [step.__name__ for step in STEPS] == ["base_rootfs", "rootfs_tree", "rootfs_image", "board_outputs",
                                                 "deltas", "provenance", "manifest"]


@pytest.mark.parametrize(("stages", "outputs"), [
    ({"rootfs"}, {"rootfs.ext4", "manifest.json"}),
    ({Stage.ROOTFS, Stage.IMAGES}, {"rootfs.ext4", "qemu-virt/disk.img", "qemu-virt/disk.img.bmap",
                                    "qemu-virt/disk.img.gz", "manifest.json"}),
    ({"rootfs", "images", Stage.ARTIFACTS}, {"rootfs.ext4", "qemu-virt/disk.img", "qemu-virt/disk.img.bmap",
                                             "qemu-virt/disk.img.gz", "small-1.0.0-qemu-virt.mender",
                                             "qemu-virt/sbom.cdx.json", "provenance.intoto.json", "manifest.json"}),
])
def test_a_build_stops_at_the_stage_asked_for(small_release: Path, tmp_path: Path,
                                              keys: dict[str, tuple[Path, Path]], stages: set[Stage | str],
                                              outputs: set[str]) -> None:
    result = _build(small_release, tmp_path, keys, stages=stages, epoch=ONE)
    assert set(result.outputs) == outputs
    assert {p.relative_to(result.out_dir).as_posix() for p in result.out_dir.rglob("*") if p.is_file()} == outputs
    assert set(json.loads((result.out_dir / "manifest.json").read_text())["outputs"]) == outputs - {"manifest.json"}


def test_stages_by_member_or_value() -> None:
    assert stage_set(["rootfs", Stage.IMAGES]) == {Stage.ROOTFS, Stage.IMAGES}
    with pytest.raises(ValueError, match="'image'"):
        stage_set(["image"])


#: the keys of manifest.json, in the order other code and people have read them since the first release
TOP_KEYS = ["name", "version", "artifact_name", "boards", "source_date_epoch", "built_at", "build_seconds", "signed",
            "security_version", "trust", "previous", "kernel", "disk", "layers", "base", "outputs", "packages",
            "tools", "timings"]


def test_the_manifest_keeps_its_format_and_reads_back(small_release: Path, tmp_path: Path,
                                                      keys: dict[str, tuple[Path, Path]]) -> None:
    first = _build(small_release, tmp_path, keys, epoch=ONE)
    second = build_release(config=small_release, signer=load_signer(keys["ec"][0]), out=tmp_path / "out",
                           cache_dir=tmp_path / "cache", version="1.1.0", epoch=TWO, previous=first.out_dir)
    text = (second.out_dir / "manifest.json").read_text()
    doc = json.loads(text)
    assert list(doc) == TOP_KEYS
    assert text == json.dumps(doc, indent=2) + "\n"
    assert ReleaseManifest.from_json(text).to_json() == text
    assert list(doc["trust"]) == ["release_key", "trusted_keys", "revoked_keys", "server_ca", "server_url",
                                  "insecure_http", "config_variables"]
    assert doc["boards"] == {"qemu-virt": {"device_type": "qemu-virt"}}
    assert doc["kernel"] == KERNEL and doc["disk"]["slot_mib"] == 64 and list(doc["disk"]) == ["disk_id", "slot_mib"]
    assert doc["packages"] == [{"name": "base-files", "version": "12.4", "architecture": "arm64"}]
    assert list(doc["base"]) == ["key", "suite", "mirror", "built_at", "archive", "decision"]
    assert list(doc["tools"]) == ["python", "mmdebstrap", "mke2fs", "mkimage"]
    # the stand-in bootstrap leaves nothing in the cache: each build "bootstraps", and says so
    assert isinstance(doc["base"]["built_at"], int) and doc["base"]["archive"] == []
    assert doc["base"]["decision"] == "not cached: bootstrapping from the archive ()"
    first_doc = json.loads((first.out_dir / "manifest.json").read_text())
    assert first_doc["previous"] is None
    # the release it updates from, and the delta from that release's artifact (the version is in the rootfs)
    deltas = doc["previous"].pop("deltas")
    assert doc["previous"] == {"version": "1.0.0", "artifact_name": "small-1.0.0",
                               "rootfs_sha256": first_doc["outputs"]["rootfs.ext4"]["sha256"]}
    assert list(deltas) == ["qemu-virt"] and list(deltas["qemu-virt"]) == ["file", "from", "size", "literal_bytes",
                                                                         "copied_bytes", "zero_bytes"]
    assert deltas["qemu-virt"]["file"] == "delta-from-1.0.0-qemu-virt.mender" in doc["outputs"]
    assert deltas["qemu-virt"]["from"] == "small-1.0.0-qemu-virt.mender"
    with pytest.raises(UserError, match="not a release manifest"):
        ReleaseManifest.from_json(json.dumps({**doc, "trust": {}}))


def test_the_previous_release_is_named_in_words(tmp_path: Path) -> None:
    """A library message names what the thing is; the command line's flags are the CLI's business."""
    with pytest.raises(UserError) as e:
        PreviousRelease.load(tmp_path)
    assert str(e.value) == (f"the previous release {tmp_path}: no manifest.json there; pass a release output "
                            "directory (OUT/<version>)")
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match=r"^the previous release .*: manifest.json is not valid JSON$"):
        PreviousRelease.load(tmp_path)
    for doc in ([], {"name": "x"}, {"version": 3}):
        (tmp_path / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(UserError, match=r"^the previous release .*: manifest.json is not a release manifest$"):
            PreviousRelease.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "0.9", "outputs": []}))
    assert PreviousRelease.load(tmp_path) == PreviousRelease(tmp_path, "0.9", None, None)


def test_the_layers_programs_run_at_the_build_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """groupadd, useradd (it dates /etc/shadow), systemctl and a layer's own commands get the epoch."""
    layer = tmp_path / "l.yaml"
    layer.write_text("groups: [{name: video}]\nusers: [{name: app}]\nunits: {enable: [x.service]}\n"
                     "commands: [\"true\"]\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    calls: list[tuple[str, dict[str, str]]] = []
    monkeypatch.setattr(image.rootfs, "run", lambda args, **kw: calls.append((Path(args[0]).name, kw["env"])))
    image.rootfs.apply_layers(root, merge_layers(load_layers([layer])), {}, epoch=ONE)
    assert [name for name, _ in calls] == ["groupadd", "useradd", "systemctl", "chroot"]
    assert all(env == {"SOURCE_DATE_EPOCH": str(ONE)} for _, env in calls)


def test_the_same_filesystems_from_an_explicit_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_ext4 and make_vfat take the epoch as an argument: bit-identical images, no environment needed."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("x")
    images: list[list[bytes]] = []
    for run in ("a", "b"):
        os.utime(tree / "file")  # "now": later than the epoch, clamped to it
        ext4, vfat = tmp_path / f"{run}.ext4", tmp_path / f"{run}.vfat"
        image.disk.make_ext4(ext4, tree, size_mib=16, label="t", seed="s", epoch=ONE)
        image.disk.make_vfat(vfat, {"f": tree / "file"}, size_mib=64, label="t", seed="s", epoch=ONE)
        images.append([ext4.read_bytes(), vfat.read_bytes()])
    assert images[0] == images[1]


def test_a_step_that_fails_says_so_and_stops_the_build(small_release: Path, tmp_path: Path,
                                                       keys: dict[str, tuple[Path, Path]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> str:
        raise UserError("expected one kernel in /boot, found []")

    monkeypatch.setattr(image.rootfs, "place_kernel", broken)
    said: list[str] = []
    with pytest.raises(UserError, match="expected one kernel"):
        _build(small_release, tmp_path, keys, progress=said.append, epoch=ONE)
    assert said[-1].startswith("layers: failed after") and not any(s.startswith("rootfs.ext4") for s in said)
    assert not (tmp_path / "out" / "1.0.0" / "manifest.json").exists()
