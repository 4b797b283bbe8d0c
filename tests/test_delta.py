"""Delta updates (payload type rootfs-delta): make/apply round trips on real ext4 images, every way a delta
can be wrong, the memory bound of applying, the signed delta artifact against the real mender-artifact 3.9,
the CLI, the release step, and the update server choosing a delta or the full artifact."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from artifacts import ArtifactReader, Compression, load_signer, load_verifier
from artifacts.delta.apply import apply_delta
from artifacts.delta.artifact import delta_artifact_spec, make_delta_payload, write_delta_artifact
from artifacts.delta.ext4 import Ext4FileBlocks
from artifacts.delta.format import (
    DELTA_PAYLOAD_TYPE,
    HEADER_SIZE,
    OP_COPY,
    OP_END,
    DeltaError,
    DeltaHeader,
    SameImageError,
    parse_header,
)
from artifacts.delta.make import _varint, make_delta
from artifacts.format import SBOM_SHA256_KEY
from artifacts.writer import module_image_spec, rootfs_image_spec, write_artifact
from image.release import check_previous_artifacts, write_release_deltas
from ota_common.errors import BadSignature, UserError

from .conftest import REPO
from .server_helpers import Device, Server, deploy, server_fixture, upload  # noqa: F401 - fixture

EPOCH = "1700000000"


def _ext4(path: Path, tree: Path, size_mib: int = 48) -> Path:
    """An ext4 image of ``tree`` built like a release slot (fixed UUID and hash seed)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    uid = "0b3cc5a4-95a2-4a43-9bbe-0d8c7d29c1f1"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), "-U", uid, "-E", f"hash_seed={uid},root_owner=0:0",
                    "-b", "4096", str(path)], check=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME=EPOCH))
    return path


def _tree(root: Path, seed: int, files: int = 60) -> Path:
    rng = random.Random(seed)
    words = [b"video", b"slot", b"delta", b"rootfs", b"systemd", b"\x00\x7fELF", b"libc.so.6"]
    for i in range(files):
        d = root / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice([100, 3000, 4096, 9000, 70_000, 300_000])
        data = b" ".join(rng.choice(words) for _ in range(size // 6))[:size] if i % 3 else rng.randbytes(size)
        (d / f"f{i}.bin").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``old``: a slot image; ``new``: the same tree with one file edited, one removed and new files (placed
    in the middle of the directory walk, so later files move); ``other``: an unrelated image."""
    d = tmp_path_factory.mktemp("images")
    t1 = _tree(d / "t1", 1)
    t2 = d / "t2"
    shutil.copytree(t1, t2)
    (t2 / "d3" / "f3.bin").write_bytes((t2 / "d3" / "f3.bin").read_bytes()[:-100] + b"edited" * 20)
    (t2 / "d1" / "f8.bin").unlink()
    _tree(t2 / "d2" / "new", 7, files=15)
    return {"old": _ext4(d / "old.ext4", t1), "new": _ext4(d / "new.ext4", t2),
            "other": _ext4(d / "other.ext4", _tree(d / "t3", 3))}


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while b := f.read(size):
            yield b


def _ragged(data: bytes, seed: int = 5) -> Iterator[bytes]:
    """``data`` in chunks of random sizes (1 byte to 200 KB), as a network stream might deliver them."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 4095, 4097, 65536, 200_000])
        yield data[pos : pos + n]
        pos += n


def _make(src: Path, tgt: Path, level: int = 6) -> bytes:
    buf = io.BytesIO()
    make_delta(_chunks(src), _chunks(tgt), buf, level=level)
    return buf.getvalue()


def _apply(delta: bytes | Iterator[bytes], src: Path, out: Path, **kw: Any) -> Any:
    chunks = _ragged(delta) if isinstance(delta, bytes) else delta
    sfd = os.open(src, os.O_RDONLY)
    tfd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return apply_delta(chunks, sfd, tfd, **kw)
    finally:
        os.close(sfd)
        os.close(tfd)


def test_the_device_side_does_not_load_the_make_side() -> None:
    """What the device imports for a delta (the package, its format, the apply) loads none of the make side,
    the artifact writer or a compression library beyond the standard library's."""
    script = ("import sys, artifacts.delta, artifacts.delta.apply; "
              "print(' '.join(sorted(m for m in sys.modules if m.startswith(('artifacts', 'zstandard', 'isal')))))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert proc.stdout.split() == ["artifacts", "artifacts.blockwrite", "artifacts.delta", "artifacts.delta.apply",
                                   "artifacts.delta.format", "artifacts.zeroing"]


@pytest.mark.parametrize("fast_zero", [True, False])
def test_round_trip_on_ext4_images(images: dict[str, Path], tmp_path: Path, fast_zero: bool) -> None:
    delta = _make(images["old"], images["new"])
    new = images["new"].read_bytes()
    assert len(delta) < len(new) // 20
    header = parse_header(delta)
    assert header.source_sha256 == hashlib.sha256(images["old"].read_bytes()).hexdigest()
    assert header.target_sha256 == hashlib.sha256(new).hexdigest() and header.target_size == len(new)
    # the target slot holds old data (here: the other image) that must all be overwritten
    out = tmp_path / "slot"
    shutil.copyfile(images["other"], out)
    calls: list[tuple[int, int]] = []
    chunks = [0]
    res = _apply(delta, images["old"], out, progress=lambda done, total: calls.append((done, total)),
                 on_chunk=lambda: chunks.__setitem__(0, chunks[0] + 1), fast_zero=fast_zero)
    assert out.read_bytes() == new
    assert res.target_sha256 == header.target_sha256 and res.source_sha256 == header.source_sha256
    assert res.target_size == len(new) == res.copied_bytes + res.literal_bytes + res.zero_bytes
    assert res.copied_bytes > res.literal_bytes > 0 and res.zero_bytes > len(new) // 2
    assert calls[-1] == (len(new), len(new)) and chunks[0] == len(calls) > 1


def test_errors_of_the_caller_and_of_the_stream_pass_through(images: dict[str, Path], tmp_path: Path) -> None:
    """on_chunk (fault injection) and the payload iterator (a dropped download) raise through apply_delta,
    and the reader thread is gone when it returns."""
    import threading

    delta = _make(images["old"], images["new"])
    before = threading.active_count()
    calls = [0]

    def boom() -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        _apply(delta, images["old"], tmp_path / "out", on_chunk=boom)

    def dropped() -> Iterator[bytes]:
        yield delta[: len(delta) // 2]
        raise ConnectionError("network drop")

    with pytest.raises(ConnectionError, match="network drop"):
        _apply(dropped(), images["old"], tmp_path / "out")
    assert threading.active_count() == before


def test_full_install_writer_without_fast_zero_writes_the_zeros(images: dict[str, Path], tmp_path: Path) -> None:
    """bench/delta.py compares the apply with the agent's own full-install writer, both with zeros written
    (``fast_zero=False``) and with zero runs left to the kernel: the slot gets the image either way."""
    from device_hooks.install import SlotWriter

    new = images["new"].read_bytes()
    slot = tmp_path / "slot"
    shutil.copyfile(images["other"], slot)
    fd = os.open(slot, os.O_WRONLY)
    try:
        writer = SlotWriter(fd, fast_zero=False)
        for chunk in _ragged(new):
            writer.write(chunk)
        assert writer.finish() == len(new) and writer.zeroed == 0 and writer.zeroer.mode is None
    finally:
        os.close(fd)
    assert slot.read_bytes()[: len(new)] == new


def test_odd_sizes_and_blocks_found_anywhere(tmp_path: Path) -> None:
    """Images that are not multiples of 4 KiB, blocks moved backwards and forwards, duplicates, zero runs."""
    rng = random.Random(9)
    blocks = [rng.randbytes(4096) for _ in range(40)]
    src = tmp_path / "src"
    src.write_bytes(b"".join(blocks) + bytes(8192) + b"tail of the source")
    tgt = tmp_path / "tgt"
    tgt.write_bytes(b"".join(blocks[20:] + blocks[:20] + blocks[5:8] * 3) + bytes(12288) + rng.randbytes(5000) + b"end")
    delta = _make(src, tgt, level=1)
    res = _apply(delta, src, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == tgt.read_bytes()
    assert res.copied_bytes == 49 * 4096 and res.zero_bytes == 12288 and res.literal_bytes == 5003
    # an empty target and a target made only of new data
    (tmp_path / "empty").write_bytes(b"")
    assert _apply(_make(src, tmp_path / "empty"), src, tmp_path / "out2").target_size == 0
    assert _apply(_make(tmp_path / "empty", tgt), tmp_path / "empty", tmp_path / "out3").copied_bytes == 0
    assert (tmp_path / "out3").read_bytes() == tgt.read_bytes()


def test_wrong_or_short_source_is_refused_with_the_reason(images: dict[str, Path], tmp_path: Path) -> None:
    delta = _make(images["old"], images["new"])
    with pytest.raises(DeltaError, match="not the image the delta was made from"):
        _apply(delta, images["other"], tmp_path / "out")
    # the same image with the data of a file the delta copies changed in place
    touched = tmp_path / "touched"
    shutil.copyfile(images["old"], touched)
    old, new = images["old"].read_bytes(), images["new"].read_bytes()
    blocks = [old[i : i + 4096] for i in range(0, len(old), 4096)]
    in_new = {new[i : i + 4096] for i in range(0, len(new), 4096)}
    files = Ext4FileBlocks(4096)
    for n, b in enumerate(blocks):
        files.feed(n, memoryview(b))
    pos = next(i * 4096 for i, b in enumerate(blocks)
               if files.is_file_data(i) and b in in_new and blocks.count(b) == 1)
    with open(touched, "r+b") as f:
        f.seek(pos)
        f.write(b"\xff" * 64)
    with pytest.raises(DeltaError, match="not the image the delta was made from"):
        _apply(delta, touched, tmp_path / "out")
    short = tmp_path / "short"
    short.write_bytes(images["old"].read_bytes()[: 8 << 20])
    with pytest.raises(DeltaError, match="the source ends at byte"):
        _apply(delta, short, tmp_path / "out")


def test_applies_to_a_source_slot_that_was_mounted_read_write(images: dict[str, Path], tmp_path: Path) -> None:
    """A device runs its root filesystem read-write: atimes, new files, directories, bitmaps, superblock and
    journal change. The delta copies only file data from the source, so it still applies."""
    delta = _make(images["old"], images["new"])
    used = tmp_path / "used.ext4"
    shutil.copyfile(images["old"], used)
    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    cmds = [f'sif "/d{i % 7}/f{i}.bin" atime @1800000000' for i in range(60) if i != 8]
    cmds += ["mkdir /var", f"write {tmp_path / 'machine-id'} /var/machine-id", f"write {tmp_path / 'machine-id'} /d2/new",
             "rm /d1/f15.bin", "ssv mnt_count 7", "ssv mtime @1800000000", "ssv state 0"]
    (tmp_path / "cmds").write_text("\n".join(cmds) + "\n")
    subprocess.run(["debugfs", "-w", "-f", str(tmp_path / "cmds"), str(used)], check=True, capture_output=True)
    changed = sum(a != b for a, b in zip(_chunks(images["old"], 4096), _chunks(used, 4096), strict=True))
    assert changed > 10
    res = _apply(delta, used, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == images["new"].read_bytes() and res.copied_bytes > 1 << 20


def _ops_delta(ops: bytes, *, source_size: int = 8192, target_size: int = 8192) -> bytes:
    h = DeltaHeader(1, 1, 4096, source_size, target_size, "00" * 32, "11" * 32)
    return h.pack() + lzma.compress(ops, format=lzma.FORMAT_XZ)


def test_malformed_deltas_raise_delta_error(images: dict[str, Path], tmp_path: Path) -> None:
    delta = _make(images["old"], images["new"])
    src = images["old"]
    out = tmp_path / "out"
    cases = {
        "empty": b"",
        "short header": delta[:50],
        "header only": delta[:HEADER_SIZE],
        "bad magic": b"X" + delta[1:],
        "version": delta[:8] + b"\x03\x00" + delta[10:],
        "truncated stream": delta[: HEADER_SIZE + (len(delta) - HEADER_SIZE) // 2],
        "last byte missing": delta[:-1],
        "flipped byte": delta[: len(delta) // 2] + bytes([delta[len(delta) // 2] ^ 0x40]) + delta[len(delta) // 2 + 1 :],
        "garbage after": delta + b"garbage",
        "a second stream after END": delta + lzma.compress(b"\x02\x01\x00", format=lzma.FORMAT_XZ),
        "copy past the source": _ops_delta(bytes([OP_COPY, 2, 4, OP_END])),  # blocks 2..3 of a 2-block source
        "unknown op": _ops_delta(bytes([9, 1, OP_END])),
        "ops past the target": _ops_delta(bytes([2, 3, OP_END])),
        "ops short of the target": _ops_delta(bytes([2, 1, OP_END])),
        "zero count": _ops_delta(bytes([2, 0, 2, 2, OP_END])),
        "no END": _ops_delta(bytes([2, 2])),
        "data cut short": _ops_delta(bytes([3, 2]) + bytes(5000)),
        "endless varint": _ops_delta(bytes([2]) + b"\xff" * 12),
    }
    for name, bad in cases.items():
        with pytest.raises(DeltaError) as e:
            _apply(bad, src, out)
        assert str(e.value).startswith(("delta", "not a rootfs delta")), (name, str(e.value))
    # a well-formed delta whose ops do not produce its target checksum
    with pytest.raises(DeltaError, match="must not be booted"):
        _apply(_ops_delta(bytes([2, 2, OP_END])), src, out)


def _table_delta(table: bytes, *, target_size: int = 8192) -> bytes:
    """A version-2 delta of a zero target: ``table`` (the digest table's encoded bytes), then ZERO, END."""
    h = DeltaHeader(2, 1, 4096, 8192, target_size, "00" * 32, hashlib.sha256(bytes(min(target_size, 8192))).hexdigest())
    return h.pack() + lzma.compress(table + bytes([2]) + _varint(-(-target_size // 4096)) + bytes([OP_END]),
                                    format=lzma.FORMAT_XZ)


def _split_v2(delta: bytes) -> tuple[DeltaHeader, int, bytes, bytes]:
    """A version-2 delta's header, digest table (block size, digests) and op bytes (decompressed)."""
    header = parse_header(delta)
    stream, rest = b"", delta[HEADER_SIZE:]
    while rest:
        d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        stream += d.decompress(rest)
        rest = d.unused_data
    pos, values = 0, []
    for _ in range(2):
        v = shift = 0
        while True:
            b = stream[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        values.append(v)
    block, count = values
    return header, block, stream[pos : pos + count * 16], stream[pos + count * 16 :]


def test_the_digest_table_is_the_block_index_of_the_target(images: dict[str, Path], tmp_path: Path) -> None:
    """Version 2 carries the digest of every 64 KiB of the target (the device's block index); version 1 deltas
    (no table) still apply."""
    from artifacts.blockwrite import BLOCK_SIZE as IBS
    from artifacts.blockwrite import block_digest

    delta = _make(images["old"], images["new"])
    header, block, table, ops = _split_v2(delta)
    assert header.version == 2 and block == IBS
    new = images["new"].read_bytes()
    assert table == b"".join(block_digest(new[i : i + IBS]) for i in range(0, len(new), IBS))
    v1 = DeltaHeader(1, *(getattr(header, f) for f in ("compression", "block_size", "source_size", "target_size",
                                                       "source_sha256", "target_sha256")))
    old_format = v1.pack() + lzma.compress(ops, format=lzma.FORMAT_XZ)
    out = tmp_path / "out"
    r = _apply(old_format, images["old"], out)
    assert out.read_bytes() == new and r.target_sha256 == header.target_sha256 and r.held_bytes == 0


def test_a_malformed_digest_table_is_refused(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.write_bytes(bytes(8192))
    good = _varint(65536) + _varint(1) + bytes(16)  # 64 KiB blocks, one digest
    assert _apply(_table_delta(good), src, out).target_size == 8192
    cases = {
        "block size not a power of two": _varint(12288) + _varint(1) + bytes(16),
        "block size too small": _varint(2048) + _varint(4) + bytes(64),
        "block size too large": _varint(32 << 20) + _varint(1) + bytes(16),
        "too many digests": _varint(65536) + _varint(2) + bytes(32),
        "no digest": _varint(65536) + _varint(0),
    }
    for name, table in cases.items():
        with pytest.raises(DeltaError, match="digest table") as e:
            _apply(_table_delta(table), src, out)
        assert e.value, name
    with pytest.raises(DeltaError, match="absurd"):  # a 1 TiB target in 4 KiB blocks: refused before it is read
        _apply(_table_delta(_varint(4096) + _varint(1 << 28), target_size=1 << 40), src, out)
    with pytest.raises(DeltaError, match="truncated"):  # the table ends inside its digests
        h = DeltaHeader(2, 1, 4096, 8192, 8192, "00" * 32, "11" * 32)
        _apply(h.pack() + lzma.compress(_varint(65536) + _varint(1) + bytes(10), format=lzma.FORMAT_XZ), src, out)


@pytest.mark.slow
def test_apply_streams_in_bounded_memory(tmp_path: Path) -> None:
    """Applying the delta of a 320 MiB image: peak RSS of the whole process (Python included) <= 64 MB."""
    rng = random.Random(3)
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    text = b" ".join(rng.choice([b"alpha", b"beta", b"gamma", b"video", b"\n"]) for _ in range(400_000))
    with open(src, "wb") as s, open(tgt, "wb") as t:
        for i in range(80):  # 80 x 4 MiB: shuffled runs of the source, new data, zeros
            block = hashlib.sha256(str(i).encode()).digest() * (4 << 15)
            s.write(block)
            t.write(block if i % 3 else text[: 4 << 20].ljust(4 << 20, b"."))
        t.write(bytes(16 << 20))
    delta = tmp_path / "d.delta"
    with open(delta, "wb") as f:
        make_delta(_chunks(src), _chunks(tgt), f, level=1)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from artifacts.delta.apply import apply_delta
        def chunks():
            with open({str(delta)!r}, "rb") as f:
                while b := f.read(1 << 20):
                    yield b
        src = os.open({str(src)!r}, os.O_RDONLY)
        out = os.open({str(tmp_path / "out.img")!r}, os.O_RDWR | os.O_CREAT, 0o644)
        r = apply_delta(chunks(), src, out, fast_zero=False)
        # VmHWM: this process's own peak (ru_maxrss would include the forked test process's pages)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(r.target_size, hwm.split()[1])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    size, rss_kib = map(int, proc.stdout.split())
    assert size == tgt.stat().st_size == 336 << 20
    assert rss_kib < 64 * 1024, f"peak RSS {rss_kib / 1024:.0f} MB"
    assert hashlib.sha256((tmp_path / "out.img").read_bytes()).digest() == hashlib.sha256(tgt.read_bytes()).digest()


# ---------------------------------------------------------------------------------------------------------
# Delta artifacts


#: the SBOM hash the signed header of the "new" artifact names (a delta to it must name it too)
NEW_SBOM = hashlib.sha256(b"the SBOM of rel-2.0").hexdigest()


@pytest.fixture(scope="module")
def artifacts_(images: dict[str, Path], keys: dict[str, tuple[Path, Path]],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("arts")
    signer = load_signer(keys["ec"][0])
    out = {}
    for name, image, version in (("old", "old", "1.0"), ("new", "new", "2.0"), ("other", "other", "3.0")):
        spec = rootfs_image_spec(file=images[image], name=f"rel-{version}", device_types=["qemu-virt", "rpi4"],
                                 software_version=version, sbom_sha256=NEW_SBOM if name == "new" else None)
        out[name] = write_artifact(spec, d / f"{name}.mender", signer=signer).path
    return out


def test_delta_artifact_validates_with_mender_artifact_and_installs(
        artifacts_: dict[str, Path], images: dict[str, Path], keys: dict[str, tuple[Path, Path]], tmp_path: Path,
        mender_artifact: str, run_cli: Any) -> None:
    out = tmp_path / "delta.mender"
    res = write_delta_artifact(artifacts_["old"], artifacts_["new"], signer=load_signer(keys["ec"][0]), out=out,
                               verifiers=[load_verifier(keys["ec"][1])])
    assert out.stat().st_size < artifacts_["new"].stat().st_size // 4
    old_sha, new_sha = (hashlib.sha256(images[k].read_bytes()).hexdigest() for k in ("old", "new"))
    assert (res.stats.source_sha256, res.stats.target_sha256) == (old_sha, new_sha)

    v = subprocess.run([mender_artifact, "validate", "-k", str(keys["ec"][1]), str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    r = subprocess.run([mender_artifact, "read", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "rootfs-delta" in r.stdout and "rel-2.0" in r.stdout
    assert run_cli("artifact", "verify", out, "-k", keys["ec"][1]).returncode == 0
    show = json.loads(run_cli("artifact", "show", out, "--json", check=True).stdout)
    assert show["name"] == "rel-2.0" and show["device_types"] == ["qemu-virt", "rpi4"] and show["compression"] == "none"
    (p,) = show["payloads"]
    assert p["type"] == DELTA_PAYLOAD_TYPE
    assert p["depends"] == {"rootfs-image.checksum": old_sha}
    assert p["provides"] == {"rootfs-image.checksum": new_sha, "rootfs-image.version": "2.0"}
    # the delta installs the target's image, so its signed meta-data names the target's SBOM (issue 17)
    assert p["meta_data"][SBOM_SHA256_KEY] == NEW_SBOM
    with ArtifactReader.open(out, verifiers=[load_verifier(keys["ec"][1])]) as reader:
        assert reader.read_header().sbom_sha256() == NEW_SBOM

    # what the device does: stream the verified payload into the inactive slot
    slot = tmp_path / "slot-b"
    shutil.copyfile(images["other"], slot)
    with ArtifactReader.open(out, verifiers=[load_verifier(keys["ec"][1])], payload_types={DELTA_PAYLOAD_TYPE}) as reader:
        reader.read_header()
        for pf in reader.files():
            applied = _apply(pf.chunks(), images["old"], slot)
        assert reader.complete
    assert applied.target_sha256 == new_sha and slot.read_bytes() == images["new"].read_bytes()


def test_cli_delta_and_its_errors(artifacts_: dict[str, Path], keys: dict[str, tuple[Path, Path]], tmp_path: Path,
                                  run_cli: Any, payload: Path) -> None:
    out = tmp_path / "d.mender"
    k = keys["ec"][0]
    ok = run_cli("artifact", "delta", "--from", artifacts_["old"], "--to", artifacts_["new"], "--key", k, "-o", out)
    assert ok.returncode == 0, ok.stderr
    assert "rel-1.0 -> rel-2.0" in ok.stdout and out.exists()

    def fails(code: int, message: str, *args: Any) -> None:
        p = run_cli("artifact", "delta", *args, "-o", tmp_path / "x.mender")
        assert p.returncode == code and message in p.stderr, (p.returncode, p.stderr)
        assert p.stderr.startswith("error: ") and not (tmp_path / "x.mender").exists()

    fails(2, "hold the same image", "--from", artifacts_["new"], "--to", artifacts_["new"], "--key", k)
    module = tmp_path / "module.mender"
    run_cli("artifact", "write", "module-image", "-T", "vv-app", "-f", payload, "-n", "m", "-t", "qemu-virt",
            "-k", k, "-o", module, check=True)
    fails(2, "not a full rootfs-image artifact (payload types: vv-app)", "--from", module, "--to", artifacts_["new"], "--key", k)
    fails(2, "not a full rootfs-image artifact (payload types: rootfs-delta)", "--from", artifacts_["old"], "--to", out, "--key", k)
    rpi3 = tmp_path / "rpi3.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "r3", "-t", "rpi3", "-k", k, "-o", rpi3, check=True)
    fails(2, "device type(s) rpi3", "--from", artifacts_["old"], "--to", rpi3, "--key", k)
    fails(1, "bad signature", "--from", artifacts_["old"], "--to", artifacts_["new"], "--key", keys["ec2"][0])
    # inputs signed by another key are fine when that key is trusted explicitly
    p = run_cli("artifact", "delta", "--from", artifacts_["old"], "--to", artifacts_["new"], "--key", keys["ec2"][0],
                "--verify-key", keys["ec"][1], "-o", tmp_path / "y.mender")
    assert p.returncode == 0, p.stderr
    unsigned = tmp_path / "unsigned.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "u", "-t", "qemu-virt", "-o", unsigned, check=True)
    fails(1, "not signed", "--from", unsigned, "--to", artifacts_["new"], "--key", k)
    tampered = tmp_path / "tampered.mender"
    data = bytearray(artifacts_["new"].read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    p = run_cli("artifact", "delta", "--from", artifacts_["old"], "--to", tampered, "--key", k, "-o", tmp_path / "x.mender")
    assert p.returncode == 1 and not (tmp_path / "x.mender").exists(), p.stderr


def test_release_deltas_one_per_board(artifacts_: dict[str, Path], keys: dict[str, tuple[Path, Path]],
                                      tmp_path: Path, mender_artifact: str) -> None:
    """``build.py release --previous``: delta-from-<old>-<board>.mender next to each board's full artifact;
    boards without a previous artifact get none."""
    prev = tmp_path / "1.0"
    prev.mkdir()
    manifest = {"version": "1.0", "artifact_name": "rel-1.0", "outputs": {}}
    (prev / "manifest.json").write_text(json.dumps(manifest))
    for board in ("qemu-virt", "rpi4"):
        shutil.copyfile(artifacts_["old"], prev / f"rel-1.0-{board}.mender")
    out = tmp_path / "2.0"
    out.mkdir()
    full = {b: artifacts_["new"] for b in ("qemu-virt", "rpi4", "rpi3")}
    messages: list[str] = []
    entries = write_release_deltas(prev, manifest, full, out, tmp_path / "work", signer=load_signer(keys["ec"][0]),
                                   verifiers=[load_verifier(keys["ec"][1])], progress=messages.append)
    assert set(entries) == {"qemu-virt", "rpi4"} and any("rpi3: no delta" in m for m in messages)
    for board in ("qemu-virt", "rpi4"):
        art = out / f"delta-from-1.0-{board}.mender"
        assert entries[board]["file"] == art.name and entries[board]["size"] == art.stat().st_size
        v = subprocess.run([mender_artifact, "validate", "-k", str(keys["ec"][1]), str(art)], capture_output=True)
        assert v.returncode == 0
    assert list((tmp_path / "work").iterdir()) == []  # the shared payload is removed
    # the same image as before: nothing to send, no delta
    assert write_release_deltas(prev, manifest, {"rpi4": artifacts_["old"]}, out, tmp_path / "work",
                                signer=None, progress=messages.append) == {}
    with pytest.raises(UserError, match="not the delta from"):
        write_delta_artifact(artifacts_["old"], artifacts_["other"], signer=None, out=tmp_path / "z.mender",
          payload=_payload_of(out / "delta-from-1.0-rpi4.mender", tmp_path))
    # checked before a release is built: signed by a trusted key, full rootfs-image artifacts
    check_previous_artifacts(prev, manifest, ["qemu-virt", "rpi4", "rpi3"], [load_verifier(keys["ec"][1])])
    with pytest.raises(BadSignature):
        check_previous_artifacts(prev, manifest, ["rpi4"], [load_verifier(keys["ec2"][1])])
    shutil.copyfile(out / "delta-from-1.0-rpi4.mender", prev / "rel-1.0-rpi4.mender")
    with pytest.raises(UserError, match="not a full rootfs-image artifact"):
        check_previous_artifacts(prev, manifest, ["rpi4"], [])


def test_same_image_is_its_own_error_and_library_messages_name_no_cli_flags(
        artifacts_: dict[str, Path], tmp_path: Path, payload: Path) -> None:
    """A release skips the delta of an unchanged image by the error's class, not by its text; the library says
    which input is wrong in words (the CLI's --from/--to are the CLI's)."""
    with pytest.raises(SameImageError, match="hold the same image") as same:
        make_delta_payload(artifacts_["new"], artifacts_["new"], tmp_path / "p.delta")
    assert isinstance(same.value, UserError)
    module = write_artifact(module_image_spec(module_type="vv-app", files=[payload], name="m",
                                              device_types=["qemu-virt"]), tmp_path / "m.mender", signer=None).path
    for old, new, role in ((module, artifacts_["new"], "source"), (artifacts_["old"], module, "target")):
        with pytest.raises(UserError) as e:
            write_delta_artifact(old, new, signer=None, out=tmp_path / "x.mender")
        assert str(e.value) == (f"the {role} artifact {module}: not a full rootfs-image artifact "
                                "(payload types: vv-app)")
        assert "--" not in str(e.value) and not isinstance(e.value, SameImageError)


def test_device_refuses_a_delta_whose_header_is_not_the_signed_target_before_opening_a_slot(
        artifacts_: dict[str, Path], images: dict[str, Path], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    """A signed delta artifact whose payload header names another target than the signed provides (a build
    bug, or a payload swapped before signing): the device reads the header first and writes nothing."""
    import dataclasses

    from device_hooks.install import DeviceFacts, stream_install

    payload = tmp_path / "rootfs.delta"
    stats, _, tgt = make_delta_payload(artifacts_["old"], artifacts_["new"], payload)
    lying = dataclasses.replace(stats, target_sha256=hashlib.sha256(b"another image").hexdigest())
    art = write_artifact(delta_artifact_spec(payload, lying, tgt), tmp_path / "d.mender",
                         signer=load_signer(keys["ec"][0]), compression=Compression.NONE).path
    slot = tmp_path / "slot-b"
    shutil.copyfile(images["other"], slot)
    before = slot.read_bytes()
    device = DeviceFacts("qemu-virt", "rel-1.0", {"rootfs-image.checksum": stats.source_sha256})
    with open(art, "rb") as f, pytest.raises(DeltaError, match="is not the signed one"):
        stream_install(f, verifiers=[load_verifier(keys["ec"][1])], device=device, target=slot,
                       active=tmp_path / "no-such-slot")
    assert slot.read_bytes() == before


def _payload_of(art: Path, tmp: Path) -> Path:
    with ArtifactReader.open(art) as r:
        for pf in r.files():
            path = tmp / pf.name
            path.write_bytes(b"".join(pf.chunks()))
            return path
    raise AssertionError("no payload")


# ---------------------------------------------------------------------------------------------------------
# Server: the delta for devices running its source, the full artifact for everyone else


def test_server_offers_the_delta_only_to_devices_running_its_source(
        server: Server, artifacts_: dict[str, Path], images: dict[str, Path], keys: dict[str, tuple[Path, Path]],
        tmp_path: Path) -> None:
    delta = tmp_path / "delta.mender"
    write_delta_artifact(artifacts_["old"], artifacts_["new"], signer=load_signer(keys["ec"][0]), out=delta)
    assert upload(server, artifacts_["new"]).status_code == 201
    r = upload(server, delta)
    assert r.status_code == 201, r.text
    delta_id = r.headers["Location"].rsplit("/", 1)[1]
    again = upload(server, delta)
    assert again.status_code == 409 and "a delta from image" in again.json()["error"]
    with server.admin() as a:
        listed = a.get("/api/management/v1/deployments/artifacts", params={"name": "rel-2.0"}).json()
    assert sorted(x["updates"][0]["type_info"]["type"] for x in listed) == ["rootfs-delta", "rootfs-image"]
    full_id = next(x["id"] for x in listed if x["id"] != delta_id)

    old_sha = hashlib.sha256(images["old"].read_bytes()).hexdigest()
    other_sha = hashlib.sha256(images["other"].read_bytes()).hexdigest()
    devices = {name: Device(server) for name in ("source", "other-image", "no-module", "no-checksum")}
    ids = {name: d.accept() for name, d in devices.items()}
    for name in ("source", "other-image", "no-checksum"):
        inv = [{"name": "update_modules", "value": ["rootfs-delta"]}, {"name": "device_type", "value": "qemu-virt"}]
        assert devices[name].http.put("/api/devices/v1/inventory/device/attributes", headers=devices[name].headers,
                                      json=inv).status_code == 200
    deploy(server, name="to 2.0", artifact_name="rel-2.0", devices=list(ids.values()))

    def offered(name: str, **provides: str) -> str:
        r = devices[name].next("rel-1.0", **provides)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["artifact"]["artifact_name"] == "rel-2.0"
        return str(body["artifact"]["id"])

    assert offered("source", **{"rootfs-image.checksum": old_sha}) == delta_id
    assert offered("other-image", **{"rootfs-image.checksum": other_sha}) == full_id
    assert offered("no-module", **{"rootfs-image.checksum": old_sha}) == full_id  # e.g. a stock Mender client
    assert offered("no-checksum") == full_id
    # the update module may also come in the provides themselves
    assert offered("no-module", **{"rootfs-image.checksum": old_sha, "update_modules": "rootfs-delta"}) == delta_id
    # the delta's link serves the delta
    uri = devices["source"].next("rel-1.0", **{"rootfs-image.checksum": old_sha}).json()["artifact"]["source"]["uri"]
    with server.client() as c:
        assert c.get(uri).content == delta.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# A delta-friendly build


def test_a_new_epoch_changes_only_the_inodes_of_files_the_build_touched(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two releases on the same base with different SOURCE_DATE_EPOCHs: files as the base has them (here
    from "after" both epochs, like a base bootstrapped after the commit) keep identical inodes; only what the
    build wrote gets the epoch. Before, every file newer than the epoch was clamped to it."""
    from image.disk import make_ext4
    from image.rootfs import normalise

    def blocks(p: Path) -> list[bytes]:
        data = p.read_bytes()
        return [data[i : i + 4096] for i in range(0, len(data), 4096)]

    out = {}
    for epoch, clamp_all in ((1_700_000_000, False), (1_700_086_400, False), (1_700_000_000, True), (1_700_086_400, True)):
        root = _tree(tmp_path / f"root-{epoch}-{clamp_all}", 4, files=200)
        (root / "etc" / "ssh").mkdir(parents=True)
        for p in [root, *root.rglob("*")]:
            os.utime(p, (1_750_000_000, 1_750_000_000))
        unpacked = time.time() - 2
        (root / "etc" / "layer.conf").write_text("written by a layer\n")  # touched by this build
        monkeypatch.setenv("SOURCE_DATE_EPOCH", str(epoch))
        normalise(root, epoch, touched_since=None if clamp_all else unpacked)
        assert os.lstat(root / "etc" / "layer.conf").st_mtime == epoch
        assert os.lstat(root / "d1" / "f1.bin").st_mtime == (epoch if clamp_all else 1_750_000_000)
        img = tmp_path / f"{epoch}-{clamp_all}.ext4"
        make_ext4(img, root, size_mib=32, label="rootfs", seed="delta-friendly", clamp_mtime=clamp_all)
        out[epoch, clamp_all] = blocks(img)
    now = sum(a != b for a, b in zip(out[1_700_000_000, False], out[1_700_086_400, False], strict=True))
    before = sum(a != b for a, b in zip(out[1_700_000_000, True], out[1_700_086_400, True], strict=True))
    assert now <= 8 < before, (now, before)  # superblocks, the touched file's and directories' inodes
