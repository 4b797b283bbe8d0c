#!/usr/bin/env python3
"""Artifact write/verify speed against the real mender-artifact, measured side by side in one run.

Builds (once, cached) an ext4 image of about --size-mb holding about --fill-mb of real files copied from
/usr/share and /usr/lib, then runs each tool --repeat times, interleaved, and prints medians:

- our ``build.py artifact write rootfs-image`` (gzip, signed) vs ``mender-artifact write rootfs-image`` (gzip)
- our ``build.py artifact verify`` vs ``mender-artifact validate`` (each on its own and on the other's output)
- output sizes, peak memory (max RSS of the process) of both tools
- the floor: hashlib sha256 of the payload, single-threaded ISA-L deflate (levels 1, 2) and inflate

Targets (issue #2): write >= 4x faster at <= 1.1x the size, verify >= 3x faster, peak memory < 100 MB and
flat in the artifact size. This prints ratios; it asserts nothing (the machines are noisy).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vv-ota" / "bench"


def build_rootfs(cache: Path, size_mb: int, fill_mb: int) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"rootfs-{size_mb}-{fill_mb}.ext4"
    if out.exists():
        return out
    stage = cache / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    budget = fill_mb << 20
    copied = 0
    for root in (Path("/usr/share"), Path("/usr/lib")):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath) / name
                if src.is_symlink() or not src.is_file():
                    continue
                size = src.stat().st_size
                if copied + size > budget:
                    continue
                dst = stage / src.relative_to("/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(src, dst)
                except OSError:
                    continue
                copied += size
            if copied >= budget * 0.995:
                break
    print(f"building {out.name}: {copied >> 20} MiB of real files in a {size_mb} MiB ext4 ...", flush=True)
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(stage), "-E", "root_owner=0:0", str(tmp), f"{size_mb}M"], check=True
    )
    tmp.rename(out)
    shutil.rmtree(stage)
    return out


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of a command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    return elapsed, usage.ru_maxrss


def floor(path: Path) -> dict[str, float]:
    from isal import igzip_lib, isal_zlib

    res: dict[str, float] = {}
    t = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 << 20):
            h.update(b)
    res["sha256 (hashlib)"] = time.perf_counter() - t
    for level in (1, 2):
        t = time.perf_counter()
        size = 0
        comp = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
        tmp = path.with_name("floor.gz")
        with open(path, "rb") as f, open(tmp, "wb") as o:
            while b := f.read(4 << 20):
                o.write(comp.compress(b))
            o.write(comp.flush())
            size = o.tell()
        res[f"ISA-L deflate level {level}"] = time.perf_counter() - t
        res[f"ISA-L deflate level {level} size MB"] = size / 1e6
    t = time.perf_counter()
    d = igzip_lib.IgzipDecompressor(igzip_lib.DECOMP_GZIP)
    with open(tmp, "rb") as f:
        while b := f.read(1 << 20):
            d.decompress(b)
            while not d.needs_input and not d.eof:
                d.decompress(b"")
    res["ISA-L inflate"] = time.perf_counter() - t
    tmp.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1200)
    ap.add_argument("--fill-mb", type=int, default=850)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where the payload image is kept between runs (default: $XDG_CACHE_HOME/vv-ota/bench)")
    ap.add_argument("--quick", action="store_true",
                    help="seconds, for CI: a 48 MiB payload, one run, in a temporary directory (numbers mean little)")
    args = ap.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
            run(Path(tmp), 48, 24, 1)
    else:
        run(args.cache_dir or default_cache_dir(), args.size_mb, args.fill_mb, args.repeat)


def run(cache: Path, size_mb: int, fill_mb: int, repeat: int) -> None:
    if not shutil.which("mender-artifact"):
        raise SystemExit("mender-artifact is not installed (scripts/install.sh installs it)")

    rootfs = build_rootfs(cache, size_mb, fill_mb)
    work = cache / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    from artifacts import KeyType, generate_keypair

    private, public = generate_keypair(KeyType.ECDSA_P256, work / "key")
    py = [sys.executable, str(REPO / "build.py")]
    ours, theirs = work / "ours.mender", work / "theirs.mender"
    cmds = {
        "write: ours": [*py, "artifact", "write", "rootfs-image", "-f", str(rootfs), "-n", "bench", "-t", "qemu-virt",
                        "-k", str(private), "-o", str(ours)],
        "write: mender-artifact": ["mender-artifact", "write", "rootfs-image", "-f", str(rootfs), "-n", "bench", "-t",
                                   "qemu-virt", "-k", str(private), "--no-progress", "-o", str(theirs)],
        "verify: ours (own artifact)": [*py, "artifact", "verify", str(ours), "-k", str(public)],
        "verify: mender-artifact validate (own artifact)": ["mender-artifact", "validate", "-k", str(public), str(theirs)],
        "verify: ours (mender-artifact's artifact)": [*py, "artifact", "verify", str(theirs), "-k", str(public)],
        "verify: mender-artifact validate (our artifact)": ["mender-artifact", "validate", "-k", str(public), str(ours)],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, int] = dict.fromkeys(cmds, 0)
    for i in range(repeat):
        for name, cmd in cmds.items():
            if name.startswith("write"):
                Path(cmd[-1]).unlink(missing_ok=True)
                os.sync()
            elapsed, rss = timed(cmd)
            times[name].append(elapsed)
            peaks[name] = max(peaks[name], rss)
        print(f"run {i + 1}/{repeat} done", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    payload = rootfs.stat().st_size
    print(f"\npayload: {rootfs} ({payload / 1e6:.0f} MB), median of {repeat} interleaved runs\n")
    print(f"{'':52} {'time s':>8} {'peak MB':>8} {'runs':>24}")
    for k in cmds:
        runs = " ".join(f"{t:.2f}" for t in times[k])
        print(f"{k:52} {med[k]:8.2f} {peaks[k] / 1024:8.1f} {runs:>24}")
    so, st = ours.stat().st_size, theirs.stat().st_size
    print(f"\n{'size: ours':52} {so / 1e6:8.1f} MB")
    print(f"{'size: mender-artifact':52} {st / 1e6:8.1f} MB")
    print("\nratios (target):")
    print(f"  write speed  mender/ours  {med['write: mender-artifact'] / med['write: ours']:5.2f}x   (>= 4x)")
    print(f"  size         ours/mender  {so / st:5.3f}x   (<= 1.1x)")
    v_mender = med["verify: mender-artifact validate (own artifact)"]
    print(f"  verify speed mender/ours  {v_mender / med['verify: ours (own artifact)']:5.2f}x   (>= 3x; each on its own artifact)")
    print(f"  verify speed on mender's artifact  {v_mender / med['verify: ours (mender-artifact' + chr(39) + 's artifact)']:5.2f}x")
    print(f"  verify speed on our artifact       "
          f"{med['verify: mender-artifact validate (our artifact)'] / med['verify: ours (own artifact)']:5.2f}x")
    print(f"  peak memory  write {peaks['write: ours'] / 1024:.0f} MB, verify {peaks['verify: ours (own artifact)'] / 1024:.0f} MB   (< 100 MB)")
    print("\nfloor (single thread, same file):")
    for k, v in floor(rootfs).items():
        print(f"  {k:40} {v:8.2f}")
    shutil.rmtree(work)
    (rootfs.with_name("floor.gz")).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
