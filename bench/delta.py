#!/usr/bin/env python3
"""Delta updates (issue "Delta updates"): our rootfs-delta against xdelta3 and zstd --patch-from, on real
release pairs built by ``build.py release``, printed side by side in one run.

Release pairs (all qemu-virt, the default release's layers, built with a cache directory of their own):

- base: the default configuration, version 1.0.0;
- (a) app-only change: one file of the ``app`` layer edited (1.0.1);
- (b) 48 MB of new files: a ``bulk`` layer adding real x86_64 binaries and text from this machine (1.1.0);
- (c) one Debian package added: a layer adding ``curl`` (1.2.0; a new base bootstrap, ~8 minutes once);
- (d) a security update: the same release with its base rebuilt after one source package (openssl: ``openssl``
  and ``libssl3``) was upgraded. The archive does not move on demand, so the release *before* the update is
  simulated: its base pins the two packages to the point release's version (``pkg=version`` in a layer, one
  more base bootstrap) while bookworm-security has a newer one, which the default base (1.0.1, the same
  epoch) has. ``--pairs d`` after a point release that ships openssl's update: change :data:`PINNED`.

Each newer release is built with a later SOURCE_DATE_EPOCH than the base (a release is a later commit), as
``build.py release`` does from git. Releases are kept in the work directory and reused while their inputs
are unchanged. For every pair it prints: the full artifact, xdelta3 -9 (size, make time, apply time and
peak RSS), zstd --patch-from --long=31 (size, make time, apply peak RSS), ours (size, make time, apply time
and peak RSS), the time to write the full image to a file the way an install does (zeros written, and all-zero pieces
zeroed by the kernel as the agent does), and the ratios against the targets. Applies and installs run the
product's code (``artifacts.delta.apply``, ``device_hooks.install.SlotWriter``) with Debian's /usr/bin/python3
(what the device has) when it has python3-cryptography. It asserts nothing.

    .venv/bin/python bench/delta.py [--work DIR] [--cache-dir DIR] [--zstd-level 19] [--pairs a,b,c]

``--quick`` runs in seconds on synthetic pairs instead (no mmdebstrap, no images: small ext4 filesystems made
with mkfs.ext4 -d from generated trees, full artifacts written and signed here) and prints the same table:

    .venv/bin/python bench/delta.py --quick [--work DIR] [--pairs a,b,c]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BASE_EPOCH = 1700000000
NEXT_EPOCH = BASE_EPOCH + 86400
BULK_BYTES = 48_000_000
EXTRA_PACKAGE = "curl"
#: the versions the release before the security update had (bookworm 12.15's; bookworm-security has newer ones)
PINNED = {"openssl": "3.0.20-1~deb12u2", "libssl3": "3.0.20-1~deb12u2"}
ZSTD_LEVEL = 19


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vv-ota-delta"


# ---------------------------------------------------------------------------------------------------------
# Releases


@dataclass(frozen=True)
class Variant:
    label: str
    version: str
    epoch: int
    describe: str


VARIANTS = {
    "base": Variant("base", "1.0.0", BASE_EPOCH, "the default release"),
    "a": Variant("a", "1.0.1", NEXT_EPOCH, "app-only change (one file of the app layer edited)"),
    "b": Variant("b", "1.1.0", NEXT_EPOCH, "48 MB of new files (a layer of x86_64 binaries and text)"),
    "c": Variant("c", "1.2.0", NEXT_EPOCH, f"one Debian package added ({EXTRA_PACKAGE})"),
    "d0": Variant("d0", "1.0.0", BASE_EPOCH, "before a security update (openssl pinned to the point release's)"),
    "d": Variant("d", "1.0.1", BASE_EPOCH, "the same release, base rebuilt with openssl's security update"),
}
#: a pair's source release when it is not "base"
SOURCES = {"d": "d0"}


def _bulk_files(dest: Path) -> None:
    """About 48 MB of real files that are not in the arm64 image: half x86_64 shared libraries, half text."""
    sources = [(Path("/usr/lib/x86_64-linux-gnu"), BULK_BYTES // 2),
               (Path("/usr/share/perl"), BULK_BYTES // 4), (Path("/usr/share/i18n"), BULK_BYTES // 8),
               (Path("/usr/share/doc"), BULK_BYTES)]
    copied = 0
    for root, budget in sources:
        part = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath) / name
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if size > 4 << 20 or part + size > budget or copied + size > BULK_BYTES:
                    continue
                target = dest / root.name / src.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                part += size
                copied += size
        if copied >= BULK_BYTES * 0.999:
            break


def _config(work: Path, variant: Variant) -> Path:
    """A configuration directory for ``variant``: the repository's release.yaml and a copy of its layers,
    changed as the variant says."""
    import yaml

    cfg_dir = work / "config" / variant.label
    if cfg_dir.exists():
        shutil.rmtree(cfg_dir)
    cfg_dir.mkdir(parents=True)
    snapshot = work / "snapshot"
    shutil.copytree(snapshot / "layers", cfg_dir / "layers", symlinks=True)
    # the ota layer's trees point at ../device_hooks etc.
    for name in SNAPSHOT[1:]:
        (cfg_dir / name).symlink_to(snapshot / name)
    cfg = yaml.safe_load((REPO / "release.yaml").read_text())
    cfg.update(boards=["qemu-virt"], version=variant.version)
    if variant.label == "a":
        app = cfg_dir / "layers" / "app" / "files" / "vv-video-ai.py"
        app.write_text(app.read_text() + "\n# 1.0.1: one edited file in the app layer\n")
    elif variant.label == "b":
        files = work / "bulk-files"
        if not (files / ".done").exists():
            shutil.rmtree(files, ignore_errors=True)
            _bulk_files(files)
            (files / ".done").write_text("")
        (cfg_dir / "layers" / "bulk").mkdir()
        (cfg_dir / "layers" / "bulk" / "files").symlink_to(files)
        (cfg_dir / "layers" / "bulk.yaml").write_text(
            "description: 48 MB of data files (delta benchmark)\n"
            "trees:\n  - {src: bulk/files, dest: /opt/vv-data}\n")
        cfg["layers"] = [*cfg["layers"], "bulk"]
    elif variant.label == "d0":
        (cfg_dir / "layers" / "pinned.yaml").write_text(
            "description: openssl as the point release has it, before its security update (delta benchmark)\n"
            f"packages: [{', '.join(f'{k}={v}' for k, v in PINNED.items())}]\n")
        cfg["layers"] = [*cfg["layers"], "pinned"]
    elif variant.label == "c":
        (cfg_dir / "layers" / "extra.yaml").write_text(
            f"description: one more Debian package (delta benchmark)\npackages: [{EXTRA_PACKAGE}]\n")
        cfg["layers"] = [*cfg["layers"], "extra"]
    (cfg_dir / "release.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_dir / "release.yaml"


#: what the images are made of, copied once per work directory so that every release of a pair is built
#: from the same layers and agent code even when the repository changes in between (--refresh-snapshot)
SNAPSHOT = ("layers", "device_hooks", "artifacts", "ota_common")


def take_snapshot(work: Path, refresh: bool) -> None:
    snapshot = work / "snapshot"
    if snapshot.exists() and not refresh:
        return
    shutil.rmtree(snapshot, ignore_errors=True)
    for name in SNAPSHOT:
        shutil.copytree(REPO / name, snapshot / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _inputs_hash(cfg: Path, variant: Variant) -> str:
    """What the built release depends on here: the configuration tree (with the snapshot of the layers and
    agent code), the repository's image builder, and the epoch."""
    h = hashlib.sha256(f"{variant}".encode())
    for root in (cfg.parent, cfg.parent.parent.parent / "snapshot", REPO / "image"):
        for p in sorted(root.rglob("*")):
            if "__pycache__" in p.parts or "bulk-files" in p.parts:
                continue
            h.update(str(p.relative_to(root)).encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_releases(work: Path, cache: Path, key: Path, labels: Sequence[str], log: Callable[[str], None]) -> dict[str, Path]:
    """Build (or reuse) the base and the variants; return ``{label: release output directory}``."""
    out: dict[str, Path] = {}
    for label in dict.fromkeys(["base", *(SOURCES[x] for x in labels if x in SOURCES), *labels]):
        variant = VARIANTS[label]
        cfg = _config(work, variant)
        stamp = _inputs_hash(cfg, variant)
        rel_root = work / "releases" / label
        rel_dir = rel_root / variant.version
        stamp_file = rel_root / "inputs"
        if (rel_dir / "manifest.json").exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            log(f"release {label} ({variant.version}): reused {rel_dir}")
            out[label] = rel_dir
            continue
        shutil.rmtree(rel_root, ignore_errors=True)
        rel_root.mkdir(parents=True)
        log(f"release {label} ({variant.version}): building ({variant.describe}) ...")
        t = time.monotonic()
        cmd = [sys.executable, str(REPO / "build.py"), "release", "--config", str(cfg), "--board", "qemu-virt",
               "--key", str(key), "--out", str(rel_root), "--cache-dir", str(cache)]
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(variant.epoch), PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"release {label} failed:\n{proc.stderr[-4000:]}")
        # the disk images are not needed here: keep the rootfs and the artifact
        shutil.rmtree(rel_dir / "qemu-virt", ignore_errors=True)
        stamp_file.write_text(stamp)
        log(f"release {label}: built in {time.monotonic() - t:.0f} s")
        out[label] = rel_dir
    return out


#: the columns of the table
TITLES = {"a": "a) app-only change", "b": "b) 48 MB of new files", "c": "c) one package added",
          "d": "d) security update"}


def full_artifact(rel_dir: Path) -> Path:
    arts = sorted(rel_dir.glob("*-qemu-virt.mender"))
    arts = [a for a in arts if not a.name.startswith("delta-")]
    if len(arts) != 1:
        raise SystemExit(f"{rel_dir}: expected one full qemu-virt artifact, found {arts}")
    return arts[0]


# ---------------------------------------------------------------------------------------------------------
# --quick: synthetic pairs, in seconds

QUICK_TITLES = {"a": "a) one file edited", "b": "b) 2 MB of new files", "c": "c) a tenth rewritten"}
#: the size of the synthetic slots (filesystems)
QUICK_MIB = 32
QUICK_ZSTD_LEVEL = 9


def _quick_files(root: Path, seed: int, files: int, size: int) -> None:
    """``files`` files of ``size`` bytes on average: two in three text-like (compressible), the rest random."""
    rng = random.Random(seed)
    words = [b"video", b"slot", b"delta", b"rootfs", b"systemd", b"\x00\x7fELF", b"libc.so.6", b"\n"]
    for i in range(files):
        d = root / f"d{i % 9}"
        d.mkdir(parents=True, exist_ok=True)
        n = rng.randrange(size // 2, size * 3 // 2)
        data = b" ".join(rng.choice(words) for _ in range(n // 6))[:n] if i % 3 else rng.randbytes(n)
        (d / f"f{seed}-{i}.bin").write_bytes(data)


def quick_releases(work: Path, key: Path, labels: Sequence[str], log: Callable[[str], None]) -> dict[str, Path]:
    """Release-shaped directories (``rootfs.ext4`` and a signed full artifact, what :func:`measure_pair` reads)
    of a synthetic base (~7 MB of files) and its variants, made as a release makes them: ``image.disk.make_ext4``
    (mkfs.ext4 -d, inode times pinned to SOURCE_DATE_EPOCH, a later one for the variants: only what a variant
    changed gets it) and the artifact writer."""
    from artifacts import load_signer
    from artifacts.writer import rootfs_image_spec, write_artifact
    from image.disk import make_ext4

    base = work / "trees" / "base"
    _quick_files(base, 1, files=300, size=24_000)
    for p in sorted(base.rglob("*"), reverse=True) + [base]:  # files as an older base release had them
        os.utime(p, (BASE_EPOCH - 86400, BASE_EPOCH - 86400))
    out: dict[str, Path] = {}
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        for label in ["base", *labels]:
            tree = work / "trees" / label
            if label != "base":
                shutil.copytree(base, tree)
            if label == "a":
                edited = tree / "d3" / "f1-3.bin"
                edited.write_bytes(edited.read_bytes()[:-100] + b"edited" * 20)
            elif label == "b":
                _quick_files(tree / "d4" / "new", 7, files=80, size=24_000)
            elif label == "c":
                rng = random.Random(3)
                for f in sorted(tree.rglob("*.bin"))[::10]:
                    f.write_bytes(rng.randbytes(f.stat().st_size))
            rel = work / "releases" / label
            rel.mkdir(parents=True)
            os.environ["SOURCE_DATE_EPOCH"] = str(BASE_EPOCH if label == "base" else NEXT_EPOCH)
            make_ext4(rel / "rootfs.ext4", tree, size_mib=QUICK_MIB, label="rootfs", seed="bench-delta-quick")
            version = "1.0.0" if label == "base" else f"1.0.{ord(label) - ord('a') + 1}"
            spec = rootfs_image_spec(file=rel / "rootfs.ext4", name=f"quick-{version}", device_types=["qemu-virt"],
                                     software_version=version)
            write_artifact(spec, rel / f"quick-{version}-qemu-virt.mender", signer=load_signer(key))
            log(f"synthetic release {label} ({version}): {rel}")
            out[label] = rel
    finally:
        if saved is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = saved
    return out


def quick(work: Path, labels: Sequence[str], zstd_level: int) -> None:
    """The table on synthetic pairs; xdelta3's source window is the slot (the whole source, as 1 GiB is for
    the real pairs)."""
    from artifacts import KeyType, generate_keypair

    def log(msg: str) -> None:
        print(msg, flush=True)

    generate_keypair(KeyType.ECDSA_P256, work / "key")
    key = work / "key" / "private.pem"
    releases = quick_releases(work, key, labels, log)
    window = QUICK_MIB << 20
    rows = [measure_pair(label, QUICK_TITLES[label], releases["base"], releases[label], work, key, zstd_level, log,
                         xdelta_window=window) for label in labels]
    report(rows, zstd_level, what=f"synthetic pairs (--quick: {QUICK_MIB} MiB ext4 made by mkfs.ext4 -d)",
           targets=False, xdelta_window=window)


# ---------------------------------------------------------------------------------------------------------
# Measurements


def _drop_cache(*paths: Path) -> None:
    """Evict these files from the page cache (only them: the machine is shared), so that every tool reads
    its inputs from the disk, as a device reads its slot."""
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages stay cached: write them first (Linux syncs a read-only fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(cmd: Sequence[str | Path], *, stdout: Path | None = None) -> tuple[float, float, str]:
    """Wall time (s), peak RSS (MB) of ``cmd`` measured by /usr/bin/time, and its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        out = open(stdout, "wb") if stdout else subprocess.PIPE  # noqa: SIM115 - closed below
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", tf.name, *map(str, cmd)], stdout=out,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - t
        if stdout:
            out.close()  # type: ignore[union-attr]
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
        peak_kb = int(tf.read().split()[-1])
    return elapsed, peak_kb / 1024, (proc.stdout or b"").decode() if not stdout else ""


_APPLY = """
import hashlib, json, os, sys, time
sys.path.insert(0, {repo!r})
from artifacts import ArtifactReader
from artifacts.delta.apply import apply_delta
from device_hooks.install import SlotWriter
mode, art, source, slot, fast = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
t = time.perf_counter()
out = os.open(slot, os.O_WRONLY)
with ArtifactReader.open(art) as r:
    for pf in r.files():
        if mode == "delta":
            src = os.open(source, os.O_RDONLY)
            res = apply_delta(pf.chunks(), src, out, fast_zero=fast)
            sha = res.target_sha256
        else:  # a full install: the agent's slot writer (pwrite, fdatasync every 32 MiB; with fast, aligned
            # all-zero 64 KiB blocks zeroed by the kernel, as the agent does)
            writer = SlotWriter(out, fast_zero=fast)
            for chunk in pf.chunks():
                writer.write(chunk)
            writer.finish()
            sha = pf.sha256
    assert r.complete
print(json.dumps({{"seconds": time.perf_counter() - t, "sha256": sha}}))
"""


@dataclass
class Row:
    pair: str
    describe: str
    full_size: int
    xdelta: tuple[int, float, float, float, float] | None = None  # size, make s, make MB, apply s, apply MB
    zstd: tuple[int, float, float, float, float] | None = None
    ours: tuple[int, float, float, float, float] | None = None
    ours_fast_apply: float = 0.0
    ours_ops: str = ""
    ours_payload: int = 0
    full_install: tuple[float, float] | None = None  # s, MB
    full_install_fast: float = 0.0


def device_python() -> str:
    """Debian's python3 (the device's interpreter: no isal, no zstandard) if it can read artifacts."""
    py = "/usr/bin/python3"
    ok = os.path.exists(py) and subprocess.run([py, "-c", "import cryptography, lzma"], capture_output=True).returncode == 0
    return py if ok else sys.executable


def measure_pair(label: str, title: str, base: Path, rel: Path, work: Path, key: Path, zstd_level: int | None,
                 log: Callable[[str], None], xdelta_window: int = 1 << 30) -> Row:
    """Every candidate on one pair: ``base`` and ``rel`` are release directories (``rootfs.ext4`` and one full
    ``*-qemu-virt.mender``). A tool that is not installed is left out of the table."""
    src_img, tgt_img = base / "rootfs.ext4", rel / "rootfs.ext4"
    src_art, tgt_art = full_artifact(base), full_artifact(rel)
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    row = Row(label, title, tgt_art.stat().st_size)
    target_sha = hashlib.sha256()
    with open(tgt_img, "rb") as f:
        while b := f.read(4 << 20):
            target_sha.update(b)
    slot = scratch / "slot.img"

    def fresh_slot() -> None:
        """The inactive slot: a preallocated file of the slot's size holding other data (the source)."""
        shutil.copyfile(src_img, slot)
        _drop_cache(slot, src_img, tgt_img)

    def check(path: Path, what: str) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(4 << 20):
                h.update(b)
        if h.hexdigest() != target_sha.hexdigest():
            raise SystemExit(f"{what}: the result is not the target image")

    # xdelta3 (Debian's), -9 with a 1 GiB source window, as DESIGN.md measured it
    if shutil.which("xdelta3"):
        xd = scratch / "delta.xd3"
        log(f"({label}) xdelta3 -9 ...")
        _drop_cache(src_img, tgt_img)
        mk_s, mk_mb, _ = timed(["xdelta3", "-9", "-f", "-e", "-B", str(xdelta_window), "-s", src_img, tgt_img, xd])
        out = scratch / "xdelta.out"
        _drop_cache(src_img, xd)
        ap_s, ap_mb, _ = timed(["xdelta3", "-d", "-f", "-B", str(xdelta_window), "-s", src_img, xd, out])
        check(out, "xdelta3")
        row.xdelta = (xd.stat().st_size, mk_s, mk_mb, ap_s, ap_mb)
        out.unlink()
        xd.unlink()

    if zstd_level is not None and shutil.which("zstd"):
        zs = scratch / "delta.zst"
        log(f"({label}) zstd -{zstd_level} --patch-from --long=31 ...")
        _drop_cache(src_img, tgt_img)
        level = [f"-{zstd_level}"] if zstd_level <= 19 else ["--ultra", f"-{zstd_level}"]
        mk_s, mk_mb, _ = timed(["zstd", "-q", "-f", "-T0", *level, "--long=31", f"--patch-from={src_img}", tgt_img,
                                "-o", zs])
        out = scratch / "zstd.out"
        _drop_cache(src_img, zs)
        ap_s, ap_mb, _ = timed(["zstd", "-q", "-f", "-d", "--long=31", f"--patch-from={src_img}", zs, "-o", out])
        check(out, "zstd")
        row.zstd = (zs.stat().st_size, mk_s, mk_mb, ap_s, ap_mb)
        out.unlink()
        zs.unlink()

    # ours, from the two signed full artifacts (verified while read), as build.py release --previous does
    delta = scratch / "delta.mender"
    log(f"({label}) ours: build.py artifact delta ...")
    _drop_cache(src_art, tgt_art)
    mk_s, mk_mb, text = timed([sys.executable, REPO / "build.py", "artifact", "delta", "--from", src_art, "--to", tgt_art,
                               "--key", key, "-o", delta])
    row.ours_ops = text.split(": ", 1)[-1].strip()
    from artifacts import read_artifact

    row.ours_payload = read_artifact(delta).files[0].size
    script = scratch / "apply.py"
    script.write_text(_APPLY.format(repo=str(REPO)))
    fresh_slot()
    _drop_cache(delta)
    ap_s, ap_mb, text = timed([device_python(), script, "delta", delta, src_img, slot, "0"])
    doc = json.loads(text)
    if doc["sha256"] != target_sha.hexdigest():
        raise SystemExit("ours: wrong result")
    check(slot, "ours")
    row.ours = (delta.stat().st_size, mk_s, mk_mb, ap_s, ap_mb)
    fresh_slot()
    _drop_cache(delta)
    row.ours_fast_apply = timed([device_python(), script, "delta", delta, src_img, slot, "1"])[0]
    check(slot, "ours (fast zero)")

    # the full artifact installed the same way (verifying reader, pwrite, fdatasync every 32 MiB)
    fresh_slot()
    _drop_cache(tgt_art)
    fi_s, fi_mb, text = timed([device_python(), script, "full", tgt_art, src_img, slot, "0"])
    check(slot, "full install")
    row.full_install = (fi_s, fi_mb)
    fresh_slot()
    _drop_cache(tgt_art)
    row.full_install_fast = timed([device_python(), script, "full", tgt_art, src_img, slot, "1"])[0]
    check(slot, "full install (fast zero)")
    shutil.rmtree(scratch)
    return row


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def report(rows: Sequence[Row], zstd_level: int | None, *, what: str, targets: bool,
           xdelta_window: int = 1 << 30) -> None:
    """The table; ``targets`` adds the issue's targets to the ratios (they are for the real release pairs)."""
    print(f"\nDelta updates: {what}, side by side")
    print("sizes in MB/kB (10^6/10^3 bytes); times are wall seconds on this machine; peak = max RSS of the process;")
    print("ours = the signed delta artifact as downloaded (made from the two signed full artifacts, verified on the way);")
    print(f"applies and full installs: {device_python()} reading the artifact, writing a file of the slot's size\n")
    head = f"{'':42}" + "".join(f"{r.describe:>26}" for r in rows)
    print(head)

    def line(name: str, cells: list[str]) -> None:
        print(f"{name:42}" + "".join(f"{c:>26}" for c in cells))

    line("full artifact (gzip)", [_mb(r.full_size) for r in rows])
    line(f"xdelta3 -9 -B {xdelta_window >> 20}MiB: size", [_mb(r.xdelta[0]) if r.xdelta else "-" for r in rows])
    line("  make s / peak MB", [f"{r.xdelta[1]:.1f} s / {r.xdelta[2]:.0f} MB" if r.xdelta else "-" for r in rows])
    line("  apply s / peak MB", [f"{r.xdelta[3]:.1f} s / {r.xdelta[4]:.0f} MB" if r.xdelta else "-" for r in rows])
    z = f"zstd -{zstd_level} --patch-from --long=31" if zstd_level else "zstd --patch-from"
    line(z + ": size", [_mb(r.zstd[0]) if r.zstd else "-" for r in rows])
    line("  make s / peak MB", [f"{r.zstd[1]:.1f} s / {r.zstd[2]:.0f} MB" if r.zstd else "-" for r in rows])
    line("  apply s / peak MB", [f"{r.zstd[3]:.1f} s / {r.zstd[4]:.0f} MB" if r.zstd else "-" for r in rows])
    line("ours (delta artifact): size", [_mb(r.ours[0]) if r.ours else "-" for r in rows])
    line("  of which the delta payload", [_mb(r.ours_payload) for r in rows])
    line("  make s / peak MB", [f"{r.ours[1]:.1f} s / {r.ours[2]:.0f} MB" if r.ours else "-" for r in rows])
    line("  apply s / peak MB (zeros written)", [f"{r.ours[3]:.1f} s / {r.ours[4]:.0f} MB" if r.ours else "-" for r in rows])
    line("  apply s, kernel-zeroed runs", [f"{r.ours_fast_apply:.1f} s" for r in rows])
    line("full install s / peak MB (zeros written)",
         [f"{r.full_install[0]:.1f} s / {r.full_install[1]:.0f} MB" if r.full_install else "-" for r in rows])
    line("  full install s, kernel-zeroed", [f"{r.full_install_fast:.1f} s" for r in rows])
    print("\nours, what the delta holds:")
    for r in rows:
        print(f"  {r.pair}) {r.ours_ops}")
    print("\nagainst the targets:" if targets else "\nratios:")
    for r in rows:
        assert r.ours is not None and r.full_install is not None
        def target(text: str, applies: bool = True) -> str:
            return f" ({text})" if targets and applies else ""

        parts = [f"ours/full {100 * r.ours[0] / r.full_size:.2f} %" + target("<= 5 %", r.pair in "ab")]
        if r.xdelta:
            parts.append(f"ours/xdelta3 {r.ours[0] / r.xdelta[0]:.2f}x" + target("<= 1.2x", r.pair == "b"))
        if r.zstd:
            parts.append(f"ours/zstd {r.ours[0] / r.zstd[0]:.2f}x")
        parts += [f"make {r.ours[1]:.1f} s" + target("<= 60 s"), f"apply peak {r.ours[4]:.0f} MB" + target("<= 64 MB"),
                  f"apply/full install {r.ours[3] / r.full_install[0]:.2f}x" + target("<= 1") + " (kernel-zeroed "
                  f"{r.ours_fast_apply / r.full_install_fast:.2f}x)"]
        print(f"  {r.pair}) " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=default_cache(),
                    help="build cache for these releases (never one another build uses at the same time)")
    ap.add_argument("--work", type=Path, default=None, help="releases and scratch (default: CACHE/bench)")
    ap.add_argument("--pairs", default="a,b,c")
    ap.add_argument("--zstd-level", type=int, default=None,
                    help="zstd level (default 19, 9 with --quick; 19 takes ~7 minutes a real pair here)")
    ap.add_argument("--zstd-pairs", default="b", help="pairs to run zstd on ('' for none)")
    ap.add_argument("--refresh-snapshot", action="store_true",
                    help="copy the repository's layers and agent code again (rebuilds every release)")
    ap.add_argument("--prepare-only", action="store_true", help="build the releases and stop")
    ap.add_argument("--quick", action="store_true",
                    help="synthetic pairs in seconds (small ext4 images of generated files; zstd on every pair)")
    args = ap.parse_args()
    labels = [p for p in args.pairs.split(",") if p]
    if args.quick:
        if args.work is not None:
            quick_dir = args.work.absolute() / "quick"
            shutil.rmtree(quick_dir, ignore_errors=True)
            quick_dir.mkdir(parents=True)
            quick(quick_dir, labels, args.zstd_level or QUICK_ZSTD_LEVEL)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
                quick(Path(tmp), labels, args.zstd_level or QUICK_ZSTD_LEVEL)
        return
    zstd_level = args.zstd_level or ZSTD_LEVEL
    work = (args.work or args.cache_dir / "bench").absolute()
    work.mkdir(parents=True, exist_ok=True)
    from artifacts import KeyType, generate_keypair

    key = work / "key" / "private.pem"
    if not key.exists():
        generate_keypair(KeyType.ECDSA_P256, work / "key")
    take_snapshot(work, args.refresh_snapshot)
    releases = build_releases(work, args.cache_dir.absolute(), key, labels, lambda m: print(m, flush=True))
    if args.prepare_only:
        return
    rows = []
    for label in labels:
        level = zstd_level if label in args.zstd_pairs.split(",") else None
        rows.append(measure_pair(label, TITLES[label], releases[SOURCES.get(label, "base")], releases[label], work, key, level,
                                 lambda m: print(m, flush=True)))
    report(rows, zstd_level, what="release pairs built by build.py release (1.2 GiB ext4 slot, qemu-virt)",
           targets=True)


if __name__ == "__main__":
    main()
