from __future__ import annotations

import io
import tarfile

import pytest

from artifacts.manifest import Manifest
from artifacts.tarstream import ByteSource, TarReader, filler, member_header, write_member
from ota_common.errors import MalformedArtifact, TruncatedArtifact

A = "a" * 64
B = "b" * 64


def test_manifest_round_trip_is_sorted_and_newline_terminated() -> None:
    m = Manifest.build({"version": A, "data/0000/rootfs.img": B, "header.tar.gz": A})
    data = m.serialize()
    assert data.endswith(b"\n")
    assert [line.split(b"  ")[1] for line in data.splitlines()] == [b"data/0000/rootfs.img", b"header.tar.gz", b"version"]
    assert Manifest.parse(data) == m
    assert m.data_files(0) == {"rootfs.img": B}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (f"{A}  version".encode(), "newline"),
        (f"{A} version\n".encode(), "malformed"),
        (f"{A.upper()}  version\n".encode(), "malformed"),
        (f"{A}  version\n{B}  version\n".encode(), "twice"),
        (f"{A}  data/0000/../../etc/passwd\n".encode(), "unsafe"),
        (f"{A}  /etc/passwd\n".encode(), "unsafe"),
        (f"{A}  data/0000/\n".encode(), "unsafe"),
        (b"", "empty"),
        (f"{A}  version\n\n".encode(), "malformed"),
    ],
)
def test_manifest_refuses(data: bytes, message: str) -> None:
    with pytest.raises(MalformedArtifact, match=message):
        Manifest.parse(data)


def _archive(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    for name, data in members:
        write_member(buf, name, data)
    buf.write(bytes(1024))
    return buf.getvalue()


def test_our_tar_is_read_by_python_tarfile_and_back() -> None:
    raw = _archive(("version", b"hello"), ("data/0000.tar.gz", b"x" * 1000))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        assert [(m.name, m.size) for m in tf.getmembers()] == [("version", 5), ("data/0000.tar.gz", 1000)]
    r = TarReader(ByteSource(io.BytesIO(raw), "t"), "t")
    e = r.next()
    assert e is not None and (e.name, r.read_all()) == ("version", b"hello")
    e = r.next()
    assert e is not None and e.size == 1000
    assert r.next() is None


def test_filler_is_skipped_by_tarfile_and_by_us() -> None:
    for gap in (512, 1024, 4096):
        buf = io.BytesIO()
        write_member(buf, "version", b"v")
        buf.write(filler(gap))
        write_member(buf, "manifest", b"m")
        buf.write(bytes(1024))
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
            names = [m.name for m in tf.getmembers()]
        assert names == ["version", "manifest"]
        r = TarReader(ByteSource(io.BytesIO(buf.getvalue()), "t"), "t")
        assert [r.next().name, r.next().name] == ["version", "manifest"]  # type: ignore[union-attr]


def test_large_sizes_use_base256_or_pax() -> None:
    size = 9 << 30
    for single in (True, False):
        hdr = member_header("data/0000.tar", size, single_block=single)
        assert len(hdr) == (512 if single else 1536)
        r = TarReader(ByteSource(io.BytesIO(hdr), "t"), "t")
        e = r.next()
        assert e is not None and e.size == size


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b[:-1024], TruncatedArtifact),  # no end-of-archive blocks
        (lambda b: b[:700], TruncatedArtifact),
        (lambda b: b[:100], TruncatedArtifact),
        (lambda b: b[:520] + b"\x01" + b[521:], MalformedArtifact),  # data is fine, but padding is not zero
        (lambda b: b[:10] + b"X" + b[11:], MalformedArtifact),  # header checksum
        (lambda b: b + b"garbage", MalformedArtifact),
    ],
)
def test_tar_reader_is_strict(mutate, error) -> None:  # type: ignore[no-untyped-def]
    raw = _archive(("version", b"hello"))
    r = TarReader(ByteSource(io.BytesIO(mutate(raw)), "t"), "t")
    with pytest.raises(error):
        while r.next() is not None:
            r.read_all()


def test_tar_reader_refuses_links_and_directories() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("evil")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        tf.addfile(info)
    r = TarReader(ByteSource(io.BytesIO(buf.getvalue()), "t"), "t")
    with pytest.raises(MalformedArtifact, match="only regular files"):
        r.next()
