"""``build.py release``: everything for a release into ``out/<version>/``.

Stages, each a small step: load and validate the configuration and layers (all errors at once) → check tools
→ bootstrap or reuse the cached base → rootfs tree (layers, kernel, normalisation) → ``rootfs.ext4`` (one
for every board) → per board: boot partition, ``disk.img``, ``disk.img.bmap``, ``disk.img.gz`` and the
signed artifact ``<name>-<version>-<board>.mender`` → ``manifest.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.compression import ParallelGzipEncoder
from artifacts.format import Compression
from artifacts.keys import Signer, Verifier
from ota_common.errors import UserError
from ota_common.files import sha256_file
from ota_common.progress import Steps
from ota_common.tools import require_tools

from . import rootfs as rootfs_mod
from .build import build_disk, firmware_files, template_context
from .config import load_board, load_release, with_overrides
from .disk import make_ext4, plan_layout
from .layers import Layer, load_layers, merge_layers
from .trust import check_server_url, install_trust, load_trust

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "release.yaml"
TOOLS = ["mmdebstrap", "mkfs.ext4", "debugfs", "mkfs.vfat", "mcopy", "mmd", "sfdisk", "bmaptool", "mkimage", "dpkg-deb"]


def preflight() -> None:
    """What a build needs, checked in a fraction of a second before any work: the programs (with the packages
    that provide them) and arm64 emulation. Raises :class:`ToolError`."""
    require_tools(TOOLS, "building a release")
    rootfs_mod.check_arm64_emulation()


@contextmanager
def cache_lock(cache: Path, progress: Callable[[str], None] = lambda msg: None) -> Iterator[None]:
    """One build at a time per build cache: two would share its work tree and its bootstrap's temporary tar.
    A second build waits (and says so) until the first is done."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build that uses the build cache {cache}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vv-ota"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the time of the last git commit, else now."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        return int(sde)
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=REPO, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(time.time())


@dataclass
class ReleaseResult:
    version: str
    out_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def layer_hash(layer: Layer) -> str:
    """Hash of a layer file and every source it references."""
    h = hashlib.sha256(layer.path.read_bytes())
    m = layer.model
    for entry in (*m.files, *m.templates):
        h.update(entry.src.encode() + b"\0" + layer.source(entry.src).read_bytes())
    for tree in m.trees:
        src = layer.source(tree.src)
        for p in sorted(src.rglob("*")):
            h.update(str(p.relative_to(src)).encode() + b"\0")
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def build_release(
    *,
    config: Path = DEFAULT_CONFIG,
    version: str | None = None,
    boards: Sequence[str] = (),
    signer: Signer | None = None,
    unsigned: bool = False,
    out: Path = Path("out"),
    cache_dir: Path | None = None,
    server_url: str | None = None,
    security_version: int | None = None,
    server_ca: Path | None = None,
    insecure_http: bool | None = None,
    progress: Callable[[str], None] = lambda msg: None,
    stages: frozenset[str] = frozenset({"rootfs", "images", "artifacts"}),
    previous: Path | None = None,
) -> ReleaseResult:
    """Build a release, or only its first ``stages`` (``rootfs``; ``rootfs`` + ``images``) for debugging.

    The image trusts ``signer``'s public key (and the configuration's ``trusted_keys``). Without a signer the
    image trusts no key and refuses every update, so that must be asked for with ``unsigned=True``.
    ``security_version``, ``server_ca`` (a PEM file of certificates) and ``insecure_http`` replace the
    configuration's values when given. Raises :class:`UserError` for bad configuration, keys or server settings
    (:class:`image.trust.InsecureServerError` for a plain http server URL that is not allowed), all before
    anything is built; :class:`ToolError` for tools."""
    if signer is None and not unsigned:
        raise UserError("no release key to sign with: an image built without one trusts no release key and refuses "
                        "every update; give a signer, or ask for an unsigned image explicitly (unsigned=True)")
    if signer is not None and unsigned:
        raise UserError("an unsigned image was asked for, but with a release key to sign it: choose one")
    with cache_lock(cache_dir or default_cache_dir(), progress):
        from artifacts.writer import SECURITY_VERSION_KEY, rootfs_image_spec, write_artifact

        t0 = time.monotonic()
        release = load_release(config)
        overrides: dict[str, Any] = {}
        if version:
            overrides["version"] = version
        if boards:
            overrides["boards"] = tuple(boards)
        if server_url is not None:
            overrides["server_url"] = server_url
        if security_version is not None:
            overrides["security_version"] = security_version
        if insecure_http is not None:
            overrides["insecure_http"] = insecure_http
        release = with_overrides(release, overrides)
        trust = load_trust(release, config.parent, signer, server_ca=server_ca, config=str(config))
        for line in (*check_server_url(release.server_url, insecure_http=release.insecure_http,
                                       server_ca=trust.server_ca is not None, config=str(config)), *trust.notes):
            progress(line)
        if not trust.signed:
            progress("unsigned image: it trusts no release key and refuses every update (its boot script and "
                     "ota.conf say so)")
        board_models = {b: load_board(b) for b in release.boards}
        layers_dir = config.parent / "layers"
        layers = load_layers([layers_dir / f"{n}.yaml" for n in release.layers])
        merged = merge_layers(layers)
        previous_manifest = _previous_release(previous) if previous else None
        if previous is not None and previous_manifest is not None and "artifacts" in stages:
            # fail before the build, not after it, when a delta could not be made from the previous artifacts
            check_previous_artifacts(previous, previous_manifest, board_models, trust.verifiers())
        preflight()
        cache = cache_dir or default_cache_dir()
        epoch = source_date_epoch()
        os.environ["SOURCE_DATE_EPOCH"] = str(epoch)
        out_dir = (out / release.version).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        result = ReleaseResult(release.version, out_dir)

        steps = Steps(progress)
        with steps.step("base rootfs") as note:
            spec = rootfs_mod.base_spec(release.suite, release.mirror, merged)
            base = rootfs_mod.bootstrap(spec, cache, progress=note)

        with steps.step("layers"):
            layout = plan_layout(slot_mib=release.slot_size_mib, boot_mib=release.boot_size_mib,
                                 data_mib=release.data_size_mib, seed=release.name)
            work = cache / "work" / release.name
            root = work / "root"
            unpacked = time.time() - 2  # file times have a coarse clock: anything from here on is this build's
            rootfs_mod.extract(base, root)
            variables = {**merged.variables, **release.variables}
            context = template_context(release, layout, variables, signed=trust.signed,
                                       config_variables=merged.config_variables,
                                       server_ca=trust.server_ca is not None)
            rootfs_mod.apply_layers(root, merged, context)
            install_trust(root, trust)
            kernel = rootfs_mod.place_kernel(root)
            packages = rootfs_mod.package_list(root)
            rootfs_mod.normalise(root, epoch, touched_since=unpacked)

        with steps.step("rootfs.ext4"):
            rootfs_img = out_dir / "rootfs.ext4"
            make_ext4(rootfs_img, root, size_mib=release.slot_size_mib, label="rootfs", seed=f"{release.name}:rootfs",
                      clamp_mtime=False)
            result.outputs["rootfs.ext4"] = rootfs_img

        artifact_name = f"{release.name}-{release.version}"
        # what the agent knows about the factory slot A (an installed slot gets the same record from its artifact)
        slot_a = {"artifact_name": artifact_name,
                  "provides": {"artifact_name": artifact_name, "rootfs-image.version": release.version,
                               SECURITY_VERSION_KEY: str(release.security_version),
                               "rootfs-image.checksum": sha256_file(rootfs_img)}}
        data_files = {"ota/slots.json": (json.dumps({"2": slot_a}, indent=1, sort_keys=True) + "\n").encode()}
        for board_name, board in board_models.items():
            if "images" not in stages:
                break
            with steps.step(f"{board_name}: disk image"):
                files = firmware_files(board, work / board_name, cache, root=root, mirror=release.mirror,
                                       suite=release.suite)
                image = build_disk(board_name=board_name, board=board, layout=layout, rootfs_image=rootfs_img,
                                   boot_files=files, out_dir=out_dir / board_name, seed=release.name,
                                   signed=trust.signed, data_files=data_files)
                gz = image.disk.with_name("disk.img.gz")
                _gzip(image.disk, gz)
                result.outputs.update({f"{board_name}/disk.img": image.disk, f"{board_name}/disk.img.bmap": image.bmap,
                                       f"{board_name}/disk.img.gz": gz})
            if "artifacts" not in stages:
                continue
            with steps.step(f"{board_name}: artifact"):
                art = out_dir / f"{artifact_name}-{board_name}.mender"
                write_artifact(rootfs_image_spec(file=rootfs_img, name=artifact_name, device_types=[board.device_type],
                                                 software_version=release.version,
                                                 security_version=release.security_version),
                               art, compression=Compression(release.compression), signer=signer)
                result.outputs[art.name] = art

        deltas: dict[str, dict[str, Any]] = {}
        if previous is not None and previous_manifest is not None:
            full = {b: result.outputs[f"{artifact_name}-{b}.mender"] for b in board_models
                    if f"{artifact_name}-{b}.mender" in result.outputs}
            deltas = write_release_deltas(previous, previous_manifest, full, out_dir, work / "delta", signer=signer,
                                          verifiers=trust.verifiers(), steps=steps)
            result.outputs.update({entry["file"]: out_dir / entry["file"] for entry in deltas.values()})
        manifest = {
            "name": release.name,
            "version": release.version,
            "artifact_name": artifact_name,
            "boards": {b: {"device_type": m.device_type} for b, m in board_models.items()},
            "source_date_epoch": epoch,
            "built_at": int(time.time()),
            "build_seconds": round(time.monotonic() - t0, 1),
            "signed": signer is not None,
            "security_version": release.security_version,
            # fingerprints (sha256 of the DER SubjectPublicKeyInfo) of the keys the image trusts and revokes
            "trust": {**trust.manifest(), "server_url": release.server_url, "insecure_http": release.insecure_http,
                      "config_variables": list(merged.config_variables)},
            # the release this one updates from, and the delta artifacts from it (delta-from-<old>-<board>.mender)
            "previous": None if previous_manifest is None else {
                "version": previous_manifest.get("version"), "artifact_name": previous_manifest.get("artifact_name"),
                "rootfs_sha256": previous_manifest.get("outputs", {}).get("rootfs.ext4", {}).get("sha256"),
                "deltas": deltas},
            "kernel": kernel,
            "disk": {"disk_id": f"{layout.disk_id:08x}", "slot_mib": release.slot_size_mib},
            "layers": {layer.name: layer_hash(layer) for layer in layers},
            "base": {"key": spec.key, "suite": release.suite, "mirror": release.mirror or "(apt default)"},
            "outputs": {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in sorted(result.outputs.items())},
            "packages": packages,
            "tools": {
                "python": platform.python_version(),
                "mmdebstrap": _tool_version(["mmdebstrap", "--version"]),
                "mke2fs": _tool_version(["mke2fs", "-V"]),
                "mkimage": _tool_version(["mkimage", "-V"]),
            },
            "timings": {k: round(v, 1) for k, v in steps.timings.items()},
        }
        result.timings.update(steps.timings)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        result.outputs["manifest.json"] = out_dir / "manifest.json"
        return result


def _previous_release(path: Path) -> dict[str, Any]:
    manifest = path / "manifest.json"
    try:
        doc = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise UserError(f"--previous {path}: no manifest.json there; pass a release output directory (OUT/<version>)") from None
    except ValueError:
        raise UserError(f"--previous {path}: manifest.json is not valid JSON") from None
    if not isinstance(doc, dict) or "version" not in doc:
        raise UserError(f"--previous {path}: manifest.json is not a release manifest")
    return doc


def check_previous_artifacts(previous: Path, previous_manifest: dict[str, Any], boards: Iterable[str],
                             verifiers: Sequence[Verifier]) -> None:
    """The previous release's full artifacts that deltas will be made from must be full rootfs-image
    artifacts signed by a key the devices trust (header only: quick). Raises UserError or ArtifactError."""
    from artifacts.reader import ArtifactReader

    for board in boards:
        art = previous / f"{previous_manifest.get('artifact_name')}-{board}.mender"
        if not art.is_file():
            continue
        with ArtifactReader.open(art, verifiers=verifiers, require_signature=bool(verifiers)) as r:
            types = r.read_header().info.payload_types
        if types != ("rootfs-image",):
            raise UserError(f"--previous {previous}: {art.name} is not a full rootfs-image artifact ({', '.join(types)})")


def write_release_deltas(
    previous: Path,
    previous_manifest: dict[str, Any],
    full: dict[str, Path],
    out_dir: Path,
    work: Path,
    *,
    signer: Signer | None,
    verifiers: Sequence[Verifier] = (),
    steps: Steps | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, dict[str, Any]]:
    """For each board's new full artifact (``full``: board → path), ``delta-from-<old>-<board>.mender`` in
    ``out_dir`` from the previous release's full artifact of the same board. The images are the same for every
    board, so the delta payload is made once (in ``work``) and reused. A board without a previous artifact,
    or with the same image as before, gets none. Steps are timed in ``steps`` (else reported to ``progress``).
    Returns the manifest entries, by board."""
    from artifacts.delta import make_delta_payload, write_delta_artifact

    old_version = str(previous_manifest.get("version"))
    steps = steps or Steps(progress, heartbeat=None)
    out: dict[str, dict[str, Any]] = {}
    payloads: dict[tuple[str | None, str | None], tuple[Path, Any]] = {}
    work.mkdir(parents=True, exist_ok=True)
    try:
        for board, art in full.items():
            old_art = previous / f"{previous_manifest.get('artifact_name')}-{board}.mender"
            if not old_art.is_file():
                steps.emit(f"{board}: no delta: the previous release has no artifact {old_art.name}")
                continue
            old_sha = previous_manifest.get("outputs", {}).get("rootfs.ext4", {}).get("sha256")
            with steps.step(f"{board}: delta from {old_version}") as note:
                key = (old_sha, None)
                if key not in payloads:
                    payload = work / f"rootfs-{len(payloads)}.delta"
                    try:
                        stats, _, _ = make_delta_payload(old_art, art, payload, verifiers=tuple(verifiers))
                    except UserError as e:
                        if "the same image" not in str(e):
                            raise
                        note(f"no delta: the image is the same as {old_version}'s")
                        continue
                    payloads[key] = (payload, stats)
                payload, stats = payloads[key]
                target = out_dir / f"delta-from-{old_version}-{board}.mender"
                res = write_delta_artifact(old_art, art, signer=signer, out=target, verifiers=tuple(verifiers),
                                           payload=payload)
                out[board] = {"file": target.name, "from": old_art.name, "size": res.artifact.size,
                              "literal_bytes": stats.literal_bytes, "copied_bytes": stats.copied_bytes,
                              "zero_bytes": stats.zero_bytes}
    finally:
        for payload, _ in payloads.values():
            payload.unlink(missing_ok=True)
    return out


def _gzip(src: Path, dst: Path) -> None:
    """A compressed image for flashing (gzip: bmaptool, zcat and Raspberry Pi Imager read it), on all cores."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        enc = ParallelGzipEncoder(out)
        while b := f.read(4 << 20):
            enc.write(b)
        enc.close()


__all__ = ["DEFAULT_CONFIG", "build_release", "default_cache_dir", "sha256_file", "write_release_deltas"]
