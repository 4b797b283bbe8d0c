"""Streaming behaviour: payloads never sit in memory, and big artifacts keep memory flat."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import ArtifactReader, Compression, load_signer, load_verifier
from artifacts.writer import rootfs_image_spec, write_artifact

from .conftest import REPO, make_payload


@pytest.mark.parametrize("compression", list(Compression))
def test_round_trip_streams_exact_bytes(tmp_path: Path, keys, compression: Compression) -> None:  # type: ignore[no-untyped-def]
    src = make_payload(tmp_path / "rootfs.ext4", 7_000_001, seed=9)  # several chunks, odd size
    out = tmp_path / "a.mender"
    write_artifact(rootfs_image_spec(file=src, name="a", device_types=["q"]), out, compression=compression,
                   signer=load_signer(keys["rsa"][0]))
    dst = tmp_path / "slot.img"
    with ArtifactReader.open(out, verifiers=[load_verifier(keys["rsa"][1])]) as r, open(dst, "wb") as slot:
        for f in r.files():
            sizes = []
            for chunk in f.chunks():
                sizes.append(len(chunk))
                slot.write(chunk)
        assert r.complete
    assert dst.read_bytes() == src.read_bytes()
    assert max(sizes) <= 4 << 20


def test_same_inputs_same_bytes_with_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_payload(tmp_path / "rootfs.ext4", 3_000_000)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a.mender", tmp_path / "b.mender"
    write_artifact(rootfs_image_spec(file=src, name="r", device_types=["q"]), a)
    os.utime(src, (1, 1))
    write_artifact(rootfs_image_spec(file=src, name="r", device_types=["q"]), b)
    assert a.read_bytes() == b.read_bytes()


_PEAK_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from ota_common.runtime import tune_malloc_for_streaming
tune_malloc_for_streaming()
from artifacts import load_signer, load_verifier, read_artifact
from artifacts.writer import rootfs_image_spec, write_artifact
mode, src, art, key = sys.argv[2:6]
if mode == "write":
    write_artifact(rootfs_image_spec(file=Path(src), name="big", device_types=["q"]), Path(art), signer=load_signer(Path(key)))
else:
    info = read_artifact(Path(art), [load_verifier(Path(key))])
    assert info.files[0].size == Path(src).stat().st_size
# VmHWM belongs to this process image (ru_maxrss would include the forking parent's RSS)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
import ctypes
sys.stderr.write(open("/proc/self/smaps_rollup").read())  # anonymous vs file vs huge pages
sys.stderr.flush()
ctypes.CDLL("libc.so.6").malloc_stats()  # to stderr: per-arena bytes, shown when the test fails
"""


def _peak_kib(mode: str, src: Path, art: Path, key: Path, stats: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(REPO), mode, str(src), str(art), str(key)],
                         capture_output=True, text=True, check=True)
    stats.append(f"{mode} {src.stat().st_size >> 20} MiB: {_compact_stats(out.stderr)}")
    return int(out.stdout.strip())


def _compact_stats(stderr: str) -> str:
    """One line of what CI shows of a failure: resident kinds (smaps_rollup, kB) and each malloc arena's
    system/in-use bytes (malloc_stats)."""
    kinds = ("Rss", "Anonymous", "AnonHugePages", "Private_Clean", "Private_Dirty", "Shared_Clean")
    parts = [line.split()[0] + line.split()[1] for line in stderr.splitlines() if line.split(":")[0] in kinds]
    arenas = " ".join(line.strip() for line in stderr.splitlines()
                      if line.startswith("Arena") or line.lstrip().startswith(("system bytes", "in use bytes", "Total")))
    return " ".join(parts) + " | " + " ".join(arenas.split())


def _sized_image(path: Path, size: int) -> Path:
    """A sparse file of ``size`` bytes with real-looking data spread over it (holes read as zeros)."""
    chunk = make_payload(path.with_suffix(".seed"), 4 << 20, seed=11).read_bytes()
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 64 << 20):
            f.seek(off)
            f.write(chunk)
    return path


@pytest.mark.slow
def test_memory_stays_flat_from_256_mib_to_2_gib(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    peaks = {}
    stats: list[str] = []
    for size in (256 << 20, 2 << 30):
        src = _sized_image(tmp_path / f"rootfs-{size}.ext4", size)
        art = tmp_path / f"a-{size}.mender"
        peaks[size] = (_peak_kib("write", src, art, keys["ec"][0], stats),
                       _peak_kib("verify", src, art, keys["ec"][1], stats))
        art.unlink()
        src.unlink()
    small, big = peaks[256 << 20], peaks[2 << 30]
    for s, b in zip(small, big, strict=True):
        # below 100 MB, and flat: 8x the data, (almost) the same memory. pytest.fail, not an assert message,
        # so that the statistics are printed whole (an assertion's message is cut to a line)
        if not (b < 100 * 1024 and b < s * 1.25 + 8 * 1024):
            pytest.fail(f"peak KiB (write, verify) by size: {peaks}\n" + "\n".join(stats), pytrace=False)
