from __future__ import annotations

import gzip
import io
import threading
import time
import zlib

import pytest

from artifacts.compression import CHUNK, OrderedWork, ParallelGzipEncoder, iter_decompressed
from artifacts.format import Compression
from ota_common.errors import MalformedArtifact


def _gzip_ours(data: bytes) -> bytes:
    out = io.BytesIO()
    enc = ParallelGzipEncoder(out)
    for i in range(0, len(data), 300_000):  # writes that do not line up with members
        enc.write(data[i : i + 300_000])
    enc.close()
    return out.getvalue()


def test_parallel_gzip_is_plain_gzip_with_zero_chunks_and_odd_sizes() -> None:
    data = bytes(CHUNK) + b"abc" * 700_000 + bytes(CHUNK) * 2 + b"tail"
    blob = _gzip_ours(data)
    assert gzip.decompress(blob) == data  # any gzip reader
    assert zlib.decompress(blob[: len(blob)], 31)  # the first member alone is a valid gzip stream
    assert b"".join(iter_decompressed(Compression.GZIP, io.BytesIO(blob), "t")) == data


def test_empty_input_gives_a_valid_gzip_stream() -> None:
    blob = _gzip_ours(b"")
    assert gzip.decompress(blob) == b""
    assert b"".join(iter_decompressed(Compression.GZIP, io.BytesIO(blob), "t")) == b""


def test_foreign_gzip_streams_are_read_sequentially_including_multi_member() -> None:
    data = b"x" * 5_000_000
    blob = gzip.compress(data[:1000]) + gzip.compress(data[1000:])
    assert b"".join(iter_decompressed(Compression.GZIP, io.BytesIO(blob), "t")) == data


@pytest.mark.parametrize("cut", [5, 30, 1000])
def test_truncated_or_trailing_garbage_gzip_is_refused(cut: int) -> None:
    blob = _gzip_ours(b"hello" * 100_000)
    with pytest.raises(MalformedArtifact):
        b"".join(iter_decompressed(Compression.GZIP, io.BytesIO(blob[:-cut]), "t"))
    with pytest.raises(MalformedArtifact):
        b"".join(iter_decompressed(Compression.GZIP, io.BytesIO(blob + b"\x00" * cut), "t"))


def test_ordered_work_keeps_order_steals_work_and_delivers_errors_in_turn() -> None:
    callers: set[str] = set()

    def job(i: int) -> bytes:
        callers.add(threading.current_thread().name)
        time.sleep(0.02)  # slower than the caller: queued jobs are there to steal
        if i == 7:
            raise ValueError("job 7 failed")
        return str(i).encode()

    work = OrderedWork(job, 1, 4, "t")
    got = []
    with pytest.raises(ValueError, match="job 7"):
        for i in range(20):
            work.submit(i)
            while work.full():
                got.append(work.pop())
        while len(work):
            got.append(work.pop())
    work.close()
    assert got == [str(i).encode() for i in range(7)]
    assert threading.current_thread().name in callers  # the caller helped
