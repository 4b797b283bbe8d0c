"""Installs that write only what differs (issue 19): the block writer, the slot's block index on /data, and the
streaming install using them, on file-backed slots. Every install here ends with the slot read back against the
signed checksum; the stories are the ways an index can be wrong (missing, stale, corrupt, of the other slot, a
slot changed under it, a forged one) and a slot left garbage or torn by a power cut."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import Compression, load_signer, load_verifier
from artifacts.blockwrite import BLOCK_SIZE, BlockWriter, SlotReadBack, block_digest
from artifacts.delta import DeltaError
from artifacts.writer import rootfs_image_spec, write_artifact
from device_hooks.blockindex import Binding, IndexFile, SlotIndex, binding_from_record, parse_index
from device_hooks.install import DeviceFacts, InstallResult, SlotVerifyError, stream_install

from .conftest import REPO

BS = BLOCK_SIZE
DEVICE = DeviceFacts(device_type="test-board", artifact_name="vv-1.0.0", provides={"rootfs-image.version": "1.0.0"})


def image(seed: int, blocks: int = 40, tail: int = 5000) -> bytes:
    """A slot-like image: 64 KiB blocks of zeros, text or random bytes, and a short last block."""
    rng = random.Random(seed)
    parts = []
    for _ in range(blocks):
        r = rng.random()
        parts.append(bytes(BS) if r < 0.35 else (b"systemd video slot " * 4000)[:BS] if r < 0.5 else rng.randbytes(BS))
    return b"".join(parts) + rng.randbytes(tail)


def changed(data: bytes, blocks: list[int], seed: int = 99) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for b in blocks:
        out[b * BS + 100 : b * BS + 4196] = rng.randbytes(4096)
    return bytes(out)


def nonzero_blocks(data: bytes) -> int:
    return sum(1 for i in range(0, len(data), BS) if any(data[i : i + BS]))


@pytest.fixture
def make_art(tmp_path: Path, keys):  # type: ignore[no-untyped-def]
    def make(data: bytes, version: str) -> Path:
        img = tmp_path / f"rootfs-{version}.ext4"
        img.write_bytes(data)
        out = tmp_path / f"vv-{version}.mender"
        write_artifact(rootfs_image_spec(file=img, name=f"vv-{version}", device_types=["test-board"],
                                         software_version=version),
                       out, compression=Compression.GZIP, signer=load_signer(keys["ec"][0]))
        return out

    return make


@pytest.fixture
def install(keys):  # type: ignore[no-untyped-def]
    def run(art: Path, slot: Path, index: SlotIndex | None, active: Path | None = None,
            device: DeviceFacts = DEVICE) -> InstallResult:
        with open(art, "rb") as f:
            return stream_install(f, verifiers=[load_verifier(keys["ec"][1])], device=device, target=slot,
                                  source_size=os.fstat(f.fileno()).st_size, index=index, active=active)

    return run


def slot_file(path: Path, content: bytes, capacity: int) -> Path:
    path.write_bytes(content + random.Random(5).randbytes(capacity - len(content)))
    return path


def bound(state: Path, slot: str, result: InstallResult) -> SlotIndex:
    """The index of ``slot`` as the agent binds it after ``result`` (what slots.json then records)."""
    assert result.index_generation is not None
    return SlotIndex(state, slot, Binding(result.sha256, result.index_generation))


# ---------------------------------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("knows", ["nothing", "slot-read-back"])
def test_block_writer_reproduces_the_image_whatever_the_chunks_and_old_content(tmp_path: Path, knows: str) -> None:
    rng = random.Random(3)
    for round_ in range(12):
        new = image(round_, blocks=rng.randint(0, 12), tail=rng.choice([0, 1, 4095, 4096, 30000]))
        old = changed(new, [b for b in range(len(new) // BS) if rng.random() < 0.5], seed=round_)
        slot = slot_file(tmp_path / "slot", old[: len(old) - rng.randint(0, 3000)], len(new) + 3 * BS)
        before = slot.read_bytes()
        fd, rfd = os.open(slot, os.O_WRONLY), os.open(slot, os.O_RDONLY)
        try:
            writer = BlockWriter(fd, old=SlotReadBack(rfd) if knows != "nothing" else None, digests=True)
            i = 0
            while i < len(new):  # data and zero runs of any size and alignment, as the decompressor and a delta give
                n = rng.randint(1, 3 * BS)
                piece = new[i : i + n]
                if not any(piece) and rng.random() < 0.7:
                    writer.zero(len(piece))
                else:
                    writer.write(memoryview(piece) if rng.random() < 0.3 else piece)
                i += n
            assert writer.finish() == len(new)
        finally:
            os.close(fd)
            os.close(rfd)
        assert slot.read_bytes()[: len(new)] == new
        assert writer.written + writer.zeroed + writer.skipped == len(new)
        assert writer.blocks == -(-len(new) // BS)
        assert bytes(writer.index) == b"".join(block_digest(new[j : j + BS]) for j in range(0, len(new), BS))
        if knows == "nothing":
            assert writer.skipped == 0
        else:  # the slot read back: exactly the blocks that were already right are skipped
            same = sum(1 for j in range(0, len(new), BS) if before[j : j + len(new[j : j + BS])] == new[j : j + BS])
            assert writer.skipped_blocks == same


# ---------------------------------------------------------------------------------------------------- the index


def test_index_file_round_trip_and_refusals(tmp_path: Path) -> None:
    ix = IndexFile("A", BS, 10 * BS, 3 * BS + 7, "ab" * 32, "cd" * 16, block_digest(b"x") * 4)
    data = ix.encode()
    assert parse_index(data) == ix
    for bad, why in [(data[:-1], "corrupt"), (data[:50], "truncated"), (b"\x00" * len(data), "not a block index"),
                     (data[:100] + bytes([data[100] ^ 1]) + data[101:], "corrupt")]:
        with pytest.raises(Exception, match=why):
            parse_index(bad)
    assert binding_from_record({"provides": {"rootfs-image.checksum": "ab" * 32}, "blockindex": "cd" * 16}) == \
        Binding("ab" * 32, "cd" * 16)
    assert binding_from_record({"provides": {"rootfs-image.checksum": "ab" * 32}}) is None
    assert binding_from_record({"provides": {"rootfs-image.checksum": "../x"}, "blockindex": "cd" * 16}) is None


# ---------------------------------------------------------------------------------------------------- installs


def test_garbage_slot_then_an_update_writes_only_what_differs(tmp_path: Path, make_art, install) -> None:  # type: ignore[no-untyped-def]
    v1 = image(1)
    v2 = changed(v1, [3, 17, 30])
    state = tmp_path / "data"
    state.mkdir()
    slot = slot_file(tmp_path / "slotB", b"", len(v1) + 4 * BS)  # garbage: random bytes everywhere
    first = install(make_art(v1, "1.0.0"), slot, SlotIndex(state, "B", None))
    assert slot.read_bytes()[: len(v1)] == v1
    assert "not used (missing)" in first.index_note
    assert first.skipped_blocks == 0 and first.written + first.zeroed == len(v1)
    assert parse_index((state / "blockindex-B.bin").read_bytes()).generation == first.index_generation

    second = install(make_art(v2, "2.0.0"), slot, bound(state, "B", first))
    assert slot.read_bytes()[: len(v2)] == v2
    assert "block index of slot B used" in second.index_note
    assert second.written == 3 * BS and second.zeroed == 0
    assert second.skipped_blocks == second.blocks - 3

    again = install(make_art(v2, "2.0.1"), slot, bound(state, "B", second))  # the same image: nothing written
    assert again.written == again.zeroed == 0 and again.skipped == len(v2)


def test_torn_slot_is_read_back_and_the_blocks_already_written_are_kept(tmp_path: Path, make_art, install) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = image(1), image(2)
    half = (len(v2) // BS // 2) * BS
    slot = slot_file(tmp_path / "slotA", v2[:half] + v1[half:], len(v2) + BS)  # a power cut in the middle
    state = tmp_path / "data"
    state.mkdir()
    result = install(make_art(v2, "2.0.0"), slot, SlotIndex(state, "A", None))
    assert slot.read_bytes()[: len(v2)] == v2
    assert result.skipped >= half


@pytest.mark.parametrize("story", ["stale-generation", "stale-checksum", "corrupt", "truncated", "other-slot",
                                   "slot-mounted-since", "no-record"])
def test_an_index_that_cannot_be_used_is_not_and_the_install_is_right(tmp_path: Path, make_art, install,  # type: ignore[no-untyped-def]
                                                                       story: str) -> None:
    v1 = image(1)
    v2 = changed(v1, [0, 5, 9])
    state = tmp_path / "data"
    state.mkdir()
    slot = slot_file(tmp_path / "slotB", b"", len(v1) + BS)
    first = install(make_art(v1, "1.0.0"), slot, SlotIndex(state, "B", None))
    index = bound(state, "B", first)
    path = state / "blockindex-B.bin"
    expect = {"stale-generation": "stale", "stale-checksum": "stale", "corrupt": "corrupt", "truncated": "truncated",
              "other-slot": "index of slot A", "slot-mounted-since": "changed since it was indexed",
              "no-record": "record names no indexed install"}[story]
    if story == "stale-generation":
        index = SlotIndex(state, "B", Binding(first.sha256, "00" * 16))
    elif story == "stale-checksum":
        index = SlotIndex(state, "B", Binding("00" * 32, str(first.index_generation)))
    elif story == "corrupt":
        data = bytearray(path.read_bytes())
        data[200] ^= 0x40
        path.write_bytes(bytes(data))
    elif story == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    elif story == "other-slot":
        (state / "blockindex-A.bin").write_bytes(path.read_bytes())
        path.unlink()
        install(make_art(v1, "1.0.1"), slot, SlotIndex(state, "A", Binding(first.sha256, str(first.index_generation))))
        (state / "blockindex-A.bin").rename(path)
        index = bound(state, "B", first)
    elif story == "slot-mounted-since":  # a read-write mount changes the superblock in the first block
        with open(slot, "r+b") as f:
            f.seek(1024 + 0x34)
            f.write(b"\x07\x00")
    elif story == "no-record":
        index = SlotIndex(state, "B", None)
    result = install(make_art(v2, "2.0.0"), slot, index)
    assert expect in result.index_note and "read and compared instead" in result.index_note
    assert slot.read_bytes()[: len(v2)] == v2
    assert result.written == 3 * BS, "the slot itself was compared: still only what differs is written"
    assert parse_index(path.read_bytes()).generation == result.index_generation  # a fresh index


def test_a_forged_index_costs_a_failed_install_never_a_wrong_slot(tmp_path: Path, make_art, install) -> None:  # type: ignore[no-untyped-def]
    """Someone with write access to /data writes an index (and slot record) claiming the slot already holds the
    new image, first block included: the install skips every block, the read-back refuses the slot, the index is
    gone, and the next install writes what is needed."""
    v1, v2 = image(1), image(2)
    state = tmp_path / "data"
    state.mkdir()
    slot = slot_file(tmp_path / "slotB", v2[:BS] + v1[BS:], len(v2) + BS)
    art = make_art(v2, "2.0.0")
    want = hashlib.sha256(v2).hexdigest()
    digests = b"".join(block_digest(v2[j : j + BS]) for j in range(0, len(v2), BS))
    (state / "blockindex-B.bin").write_bytes(
        IndexFile("B", BS, slot.stat().st_size, len(v2), want, "11" * 16, digests).encode())
    with pytest.raises(SlotVerifyError):
        install(art, slot, SlotIndex(state, "B", Binding(want, "11" * 16)))
    assert not (state / "blockindex-B.bin").exists()
    result = install(art, slot, SlotIndex(state, "B", Binding(want, "11" * 16)))
    assert slot.read_bytes()[: len(v2)] == v2 and result.written > 0


def test_disabled_index_writes_every_block_and_leaves_no_index(tmp_path: Path, make_art, install) -> None:  # type: ignore[no-untyped-def]
    v1 = image(1)
    state = tmp_path / "data"
    state.mkdir()
    slot = slot_file(tmp_path / "slotB", v1, len(v1) + BS)  # already holds it
    (state / "blockindex-B.bin").write_bytes(b"an old index")
    result = install(make_art(v1, "1.0.0"), slot, SlotIndex(state, "B", None, enabled=False))
    assert result.skipped == 0 and result.written + result.zeroed == len(v1)
    assert result.index_generation is None and not (state / "blockindex-B.bin").exists()


def test_delta_install_writes_only_what_differs(tmp_path: Path, make_art, install, keys) -> None:  # type: ignore[no-untyped-def]
    from artifacts.delta import write_delta_artifact

    v1 = image(1)
    v2 = changed(v1, [2, 11, 25, 33])
    state = tmp_path / "data"
    state.mkdir()
    old_art, new_art = make_art(v1, "1.0.0"), make_art(v2, "2.0.0")
    delta = tmp_path / "delta.mender"
    write_delta_artifact(old_art, new_art, signer=load_signer(keys["ec"][0]), out=delta)
    active = slot_file(tmp_path / "slotA", v1, len(v1) + BS)
    slot = slot_file(tmp_path / "slotB", b"", len(v1) + BS)
    first = install(old_art, slot, SlotIndex(state, "B", None))  # e.g. a rollback left 1.0.0 in slot B
    running = DeviceFacts("test-board", "vv-1.0.0", {"rootfs-image.version": "1.0.0",
                                                     "rootfs-image.checksum": hashlib.sha256(v1).hexdigest()})
    result = install(delta, slot, bound(state, "B", first), active=active, device=running)
    assert slot.read_bytes()[: len(v2)] == v2
    assert "block index of slot B used" in result.index_note
    assert result.written == 4 * BS and result.skipped_blocks == result.blocks - 4


def test_a_delta_reads_nothing_of_the_running_slot_for_blocks_the_slot_holds(tmp_path: Path, make_art, install,  # type: ignore[no-untyped-def]
                                                                              keys) -> None:
    """With the slot's index, the delta's digest table says which blocks the slot already holds: those are
    neither read from the running slot nor hashed. Shown by damaging the running slot's copy of every unique
    block the update leaves alone: the install still yields the signed image (and so does the next one, from the
    index it wrote without hashing). Without an index the same damage fails the install before it is armed."""
    from artifacts.delta import write_delta_artifact

    v1 = image(1)
    v2 = changed(v1, [2, 11])
    v3 = changed(v2, [25], seed=7)
    state = tmp_path / "data"
    state.mkdir()
    arts = {v: make_art(data, v) for v, data in (("1.0.0", v1), ("2.0.0", v2), ("3.0.0", v3))}
    d12, d23 = tmp_path / "d12.mender", tmp_path / "d23.mender"
    write_delta_artifact(arts["1.0.0"], arts["2.0.0"], signer=load_signer(keys["ec"][0]), out=d12)
    write_delta_artifact(arts["2.0.0"], arts["3.0.0"], signer=load_signer(keys["ec"][0]), out=d23)
    text = (b"systemd video slot " * 4000)[:BS]
    unique = [b for b in range(40) if b not in (2, 11, 25) and v1[b * BS : (b + 1) * BS] not in (bytes(BS), text)]
    assert len(unique) >= 10

    def damaged(data: bytes) -> bytes:
        out = bytearray(data)
        for b in unique:
            out[b * BS : (b + 1) * BS] = random.Random(b).randbytes(BS)
        return bytes(out)

    def running(version: str, data: bytes) -> DeviceFacts:
        return DeviceFacts("test-board", f"vv-{version}", {"rootfs-image.version": version,
                                                          "rootfs-image.checksum": hashlib.sha256(data).hexdigest()})

    slot = slot_file(tmp_path / "slotB", b"", len(v1) + BS)
    first = install(arts["1.0.0"], slot, SlotIndex(state, "B", None))
    active = slot_file(tmp_path / "slotA", damaged(v1), len(v1) + BS)
    second = install(d12, slot, bound(state, "B", first), active=active, device=running("1.0.0", v1))
    assert slot.read_bytes()[: len(v2)] == v2
    assert second.written == 2 * BS and second.skipped_blocks == second.blocks - 2
    # the index written from the digest table is right: the next delta uses it (and damage still does not matter)
    active.write_bytes(damaged(v2) + bytes(BS))
    third = install(d23, slot, bound(state, "B", second), active=active, device=running("2.0.0", v2))
    assert slot.read_bytes()[: len(v3)] == v3 and third.written == BS
    # without the index, the blocks must come from the running slot: its damage fails the install
    slot_file(slot, v2, len(v1) + BS)
    with pytest.raises(DeltaError):
        install(d23, slot, SlotIndex(state, "B", None), active=active, device=running("2.0.0", v2))


_KILLED = """
import os, sys
from pathlib import Path
from artifacts import load_verifier
from device_hooks.blockindex import Binding, SlotIndex
from device_hooks.install import DeviceFacts, stream_install
art, slot, state, pub, checksum, generation = sys.argv[1:]
with open(art, "rb") as f:
    stream_install(f, verifiers=[load_verifier(Path(pub))], device=DeviceFacts("test-board", "vv-1.0.0", {}), target=Path(slot),
                   index=SlotIndex(Path(state), "B", Binding(checksum, generation)))
print("not killed")
"""


def test_a_power_cut_mid_install_leaves_no_index_and_the_reinstall_is_right(tmp_path: Path, make_art, install,  # type: ignore[no-untyped-def]
                                                                            keys) -> None:
    v1, v2 = image(1, blocks=60), image(2, blocks=60)
    state = tmp_path / "data"
    state.mkdir()
    slot = slot_file(tmp_path / "slotB", b"", len(v1) + BS)
    first = install(make_art(v1, "1.0.0"), slot, SlotIndex(state, "B", None))
    art = make_art(v2, "2.0.0")
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(art), str(slot), str(state), str(keys["ec"][1]),
                           first.sha256, str(first.index_generation)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "OTA_AGENT_FAULT": f"install-write@{30 * BS}"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 99 and "fault injected at install-write" in proc.stderr, proc.stderr
    assert not (state / "blockindex-B.bin").exists(), "the index must be gone before the first write"
    torn = slot.read_bytes()
    same = sum(1 for j in range(0, len(v2), BS) if torn[j : j + len(v2[j : j + BS])] == v2[j : j + BS])
    assert torn[: len(v2)] != v2 and same >= 20, "torn: the first blocks written, the rest the old image"
    # the slot record still names 1.0.0's index (the agent records the new one only after the install)
    result = install(art, slot, bound(state, "B", first))
    assert "not used (missing)" in result.index_note
    assert slot.read_bytes()[: len(v2)] == v2
    assert result.skipped_blocks == same, "the blocks written before the cut are not written again"
