#!/usr/bin/env python3
"""Installs that write only what differs (issue 19): bytes written and install time of the product's install
(:func:`device_hooks.install.stream_install`: verify, write, read back against the signed checksum) before and
after the block index, on the release pairs of ``bench/delta.py``, side by side in one run.

For each pair the inactive slot (a file of the image's size) holds the pair's source image, as it does when the
device installs the next release into the slot it was updated from (or after a rollback). Each install runs:

- before: every block written (``[install] block_index = no``, today's install before issue 19);
- after, index: the slot's block index on /data says what the slot holds (the index the agent wrote when it
  installed the source image);
- after, no index: no usable index, so the slot is read and compared block by block (a slot written by the
  image builder, or after a power cut).

Both the full artifact and the delta artifact of the pair are installed. Page caches of the slot and the artifact
are dropped before each install. "written" counts bytes written with ``pwrite`` plus bytes zeroed by range
requests (the kernel may not write those at all: an upper bound). It asserts nothing.

    .venv/bin/python bench/blockwrite.py [--releases DIR] [--pairs a,d] [--work DIR]
    .venv/bin/python bench/blockwrite.py --quick     # synthetic pairs (bench/delta.py --quick's), seconds
    .venv/bin/python bench/blockwrite.py --qemu --work DIR   # the small update in QEMU on an SD-card-slow disk

``--qemu`` (``bench/_blockwrite_qemu.py``) builds two releases from this repository, boots one in QEMU with its
disk throttled to 20 MB/s and 500 writes/s, and installs the other's delta with and without the block index.

The release pairs are built by ``bench/delta.py --prepare-only --pairs a,d`` (into its cache directory, which
``--releases`` defaults to).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from artifacts import load_verifier  # noqa: E402
from artifacts.blockwrite import BLOCK_SIZE, block_digest  # noqa: E402
from device_hooks.blockindex import Binding, SlotIndex  # noqa: E402
from device_hooks.install import DeviceFacts, InstallResult, stream_install  # noqa: E402
from ota_common.files import sha256_file  # noqa: E402

#: pair -> (source release label, target release label), as bench/delta.py builds them
PAIRS = {"a": ("base", "a"), "b": ("base", "b"), "c": ("base", "c"), "d": ("d0", "d")}
TITLES = {"a": "a) app-only change", "b": "b) 48 MB of new files", "c": "c) one package added",
          "d": "d) security update (base rebuilt)"}
QUICK_TITLES = {"a": "a) one file edited", "b": "b) 2 MB of new files", "c": "c) a tenth rewritten"}
MODES = ("before", "index", "read")


def default_releases() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vv-ota-delta" / "bench"


def _load_delta_bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_delta", REPO / "bench" / "delta.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_delta"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _drop_cache(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd) if os.access(p, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _index_digests(image: Path) -> bytes:
    out = bytearray()
    with open(image, "rb") as f:
        while b := f.read(BLOCK_SIZE):
            out += block_digest(b)
    return bytes(out)


@dataclass
class Measured:
    written: int
    seconds: float
    skipped_blocks: int
    blocks: int


@dataclass
class Row:
    pair: str
    title: str
    full: dict[str, Measured] = field(default_factory=dict)
    delta: dict[str, Measured] = field(default_factory=dict)


def measure_pair(pair: str, title: str, src_dir: Path, tgt_dir: Path, work: Path, key_dir: Path,
                 log: Callable[[str], None]) -> Row:
    full_src = _full_artifact(src_dir)
    full_tgt = _full_artifact(tgt_dir)
    src_img = src_dir / "rootfs.ext4"
    delta = work / "deltas" / f"{pair}-{full_src.stem}-to-{full_tgt.stem}.mender"
    if not delta.exists() or delta.stat().st_mtime < max(full_src.stat().st_mtime, full_tgt.stat().st_mtime):
        log(f"({pair}) making the delta artifact ...")
        delta.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "build.py"), "artifact", "delta", "--from", str(full_src),
                        "--to", str(full_tgt), "--key", str(key_dir / "private.pem"), "-o", str(delta)],
                       check=True, capture_output=True)
    verifiers = [load_verifier(key_dir / "public.pem")]
    src_sha = sha256_file(src_img)
    digests = _index_digests(src_img)
    facts = DeviceFacts("qemu-virt", "source", {"rootfs-image.version": "0.0.1", "rootfs-image.checksum": src_sha})
    state = work / "data"
    slot = work / "slot.img"
    row = Row(pair, title)
    for kind, art in (("full", full_tgt), ("delta", delta)):
        for mode in MODES:
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True)
            shutil.copyfile(src_img, slot)  # the inactive slot holds the source release
            size = slot.stat().st_size
            index: SlotIndex | None = None
            if mode == "index":  # what the agent wrote after installing the source image into this slot
                index = SlotIndex(state, "A", None)
                generation = index.save(device_size=size, payload_size=src_img.stat().st_size, checksum=src_sha,
                                        digests=digests)
                assert generation is not None
                index = SlotIndex(state, "A", Binding(src_sha, generation))
            elif mode == "read":
                index = SlotIndex(state, "A", None)
            else:
                index = SlotIndex(state, "A", None, enabled=False)
            _drop_cache(slot, art, src_img)
            log(f"({pair}) {kind} install, {mode} ...")
            t = time.perf_counter()
            with open(art, "rb") as f:
                result: InstallResult = stream_install(f, verifiers=verifiers, device=facts, target=slot,
                                                       source_size=os.fstat(f.fileno()).st_size, index=index,
                                                       active=src_img, allow_downgrade=True)
            seconds = time.perf_counter() - t
            m = Measured(result.written + result.zeroed, seconds, result.skipped_blocks, result.blocks)
            (row.full if kind == "full" else row.delta)[mode] = m
    slot.unlink(missing_ok=True)
    shutil.rmtree(state, ignore_errors=True)
    return row


def _full_artifact(rel: Path) -> Path:
    arts = [a for a in sorted(rel.glob("*.mender")) if not a.name.startswith("delta-")]
    if len(arts) != 1:
        raise SystemExit(f"{rel}: expected one full artifact, found {[a.name for a in arts]}")
    return arts[0]


def _mb(n: int) -> str:
    return f"{n / 1e6:9.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:7.1f}x" if b > 0 else "    inf"


def report(rows: list[Row], what: str) -> None:
    print(f"\nBlock-index installs on {what}: the slot held the pair's source image; times include the read-back "
          "against the signed checksum")
    print(f"{'pair':34} {'install':6} {'written MB: before':>18} {'index':>9} {'read':>9} "
          f"{'time s: before':>15} {'index':>7} {'read':>7}   {'blocks skipped (index)':>22}")
    for row in rows:
        for kind, ms in (("full", row.full), ("delta", row.delta)):
            b, i, r = ms["before"], ms["index"], ms["read"]
            print(f"{row.title:34} {kind:6} {_mb(b.written):>18} {_mb(i.written)} {_mb(r.written)} "
                  f"{b.seconds:15.1f} {i.seconds:7.1f} {r.seconds:7.1f}   {i.skipped_blocks:>10} of {i.blocks:<9}")
    print("\nbytes written before/after and install time before/after (after = with the block index; "
          "in parentheses: without one, the slot read and compared)")
    for row in rows:
        for kind, ms in (("full", row.full), ("delta", row.delta)):
            b, i, r = ms["before"], ms["index"], ms["read"]
            print(f"  {row.title:34} {kind:6} bytes {_ratio(b.written, i.written)} ({_ratio(b.written, r.written)})"
                  f"   time {_ratio(b.seconds, i.seconds)} ({_ratio(b.seconds, r.seconds)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--releases", type=Path, default=default_releases(),
                    help="bench/delta.py's work directory (releases/<label>/<version>, key/)")
    ap.add_argument("--pairs", default="a,d")
    ap.add_argument("--work", type=Path, default=None, help="scratch (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="synthetic pairs (bench/delta.py --quick's): seconds")
    ap.add_argument("--qemu", action="store_true", help="the small update in QEMU on a throttled disk (needs --work:"
                                                        " releases are built and kept there)")
    args = ap.parse_args()
    if args.qemu:
        if args.work is None:
            raise SystemExit("--qemu needs --work DIR (the releases it builds are kept there)")
        import _blockwrite_qemu

        return _blockwrite_qemu.main(args.work, _drop_cache)
    labels = [p for p in args.pairs.split(",") if p]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-blockwrite-", dir=args.work) as tmp:
        work = Path(tmp)
        if args.quick:
            from artifacts import KeyType, generate_keypair

            bench_delta = _load_delta_bench()
            generate_keypair(KeyType.ECDSA_P256, work / "key")
            labels = [p for p in labels if p in QUICK_TITLES] or ["a", "c"]
            releases = bench_delta.quick_releases(work, work / "key" / "private.pem", labels, log)  # type: ignore[attr-defined]
            rows = [measure_pair(p, QUICK_TITLES[p], releases["base"], releases[p], work, work / "key", log)
                    for p in labels]
            report(rows, f"synthetic pairs (--quick: {bench_delta.QUICK_MIB} MiB ext4)")  # type: ignore[attr-defined]
            return 0
        rows = []
        for p in labels:
            if p not in PAIRS:
                raise SystemExit(f"unknown pair {p!r} (known: {', '.join(PAIRS)})")
            src, tgt = (sorted((args.releases / "releases" / label).glob("*/rootfs.ext4")) for label in PAIRS[p])
            if not src or not tgt:
                log(f"pair {p}: releases not built (bench/delta.py --prepare-only --pairs {p}): skipped")
                continue
            rows.append(measure_pair(p, TITLES[p], src[0].parent, tgt[0].parent, work, args.releases / "key", log))
        if not rows:
            raise SystemExit("no release pair is built: run bench/delta.py --prepare-only --pairs a,d first")
        report(rows, "release pairs (1.25 GiB ext4 slots, file-backed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
