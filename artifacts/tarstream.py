"""A small, strict, streaming tar reader and writer for artifact containers.

Python's :mod:`tarfile` is lenient (it skips bad headers, ignores padding) and hides where bytes come from;
an artifact is untrusted input, so this module parses exactly the subset that mender-artifact (Go's
``archive/tar``) writes and refuses everything else with :class:`MalformedArtifact`:

- USTAR or GNU headers with a valid checksum, regular files only, PAX (``x``) and GNU long-name (``L``)
  extension records;
- padding after each member and the end-of-archive blocks must be zero (so a flipped bit there is caught);
- the archive must end with two zero blocks; only zeros may follow them.

The writer produces the same USTAR headers as Go's ``archive/tar`` (PAX only for sizes ≥ 8 GiB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ota_common.errors import MalformedArtifact, TruncatedArtifact

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
_ZERO_BLOCK = bytes(BLOCK)
_MAX_OCTAL_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
_MAX_PAX_SIZE = 64 << 10
#: PAX records that may appear (POSIX keys); anything else, GNU sparse files in particular, is refused
_PAX_KEYS = frozenset(
    {"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime", "atime", "ctime", "comment", "charset", "hdrcharset"}
)
_PAX_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_NUMERIC_RE = re.compile(rb"^ *([0-7]*)[ \x00]*$")
_CHKSUM_RE = re.compile(rb"^([0-7]{6})\x00 $|^([0-7]{7})\x00$|^([0-7]{6}) \x00$")


def padding(size: int) -> int:
    """Bytes of zero padding after a member of ``size`` bytes."""
    return -size % BLOCK


# ---------------------------------------------------------------------------------------------------------
# Writing


def _octal(value: int, width: int) -> bytes:
    """A NUL-terminated octal field of ``width`` bytes, as Go writes it."""
    return b"%0*o\x00" % (width - 1, value)


def _raw_header(name: bytes, size: int, mode: int, mtime: int, typeflag: bytes, uname: str, gname: str) -> bytes:
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    ub, gb = uname.encode(), gname.encode()
    h[265 : 265 + len(ub)] = ub
    h[297 : 297 + len(gb)] = gb
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def member_header(
    name: str, size: int, *, mode: int = 0o600, mtime: int = 0, uname: str = "", gname: str = "", single_block: bool = False
) -> bytes:
    """Header block(s) for a regular file member. Sizes ≥ 8 GiB get a PAX ``size`` record, as Go does, or,
    with ``single_block``, a GNU base-256 size field so that the header stays one block (Go, GNU tar and
    Python's tarfile all read it)."""
    if size < 0 or mtime < 0:
        raise ValueError("negative size or mtime")
    bname = name.encode()
    out = b""
    header_size = size
    if size > _MAX_OCTAL_SIZE and single_block:
        h = bytearray(_raw_header(bname, 0, mode, mtime, b"0", uname, gname))
        h[124:136] = (size | (0x80 << 88)).to_bytes(12, "big")
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\x00 " % sum(h)
        return bytes(h)
    if size > _MAX_OCTAL_SIZE:
        pax = _pax_record("size", str(size))
        out += _raw_header(b"PaxHeaders.0/" + bname[-87:], len(pax), 0o644, mtime, b"x", "", "")
        out += pax + bytes(padding(len(pax)))
        header_size = 0
    return out + _raw_header(bname, header_size, mode, mtime, b"0", uname, gname)


def filler(n: int, mtime: int = 0) -> bytes:
    """Exactly ``n`` bytes (a multiple of 512) that tar readers skip: a PAX extended header holding only a
    ``comment`` record, which applies to the member that follows. Used to fill reserved space."""
    if n % BLOCK:
        raise ValueError("filler size must be a multiple of 512")
    if n == 0:
        return b""
    length = n - BLOCK
    if length == 0:
        return _raw_header(b"PaxHeaders.0/filler", 0, 0o644, mtime, b"x", "", "")
    value = "x" * (length - len(str(length)) - len(" comment=\n"))
    record = _pax_record("comment", value)
    assert len(record) == length, (len(record), length)
    return _raw_header(b"PaxHeaders.0/filler", length, 0o644, mtime, b"x", "", "") + record


def write_member(out: BinaryIO, name: str, data: bytes, **kw: int | str) -> None:
    """Write a whole member (header, data, padding)."""
    out.write(member_header(name, len(data), **kw))  # type: ignore[arg-type]
    out.write(data)
    out.write(bytes(padding(len(data))))


# ---------------------------------------------------------------------------------------------------------
# Reading


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class ByteSource:
    """Sequential reads from an untrusted stream, with the position kept and short reads turned into
    :class:`TruncatedArtifact`."""

    def __init__(self, stream: Readable, what: str) -> None:
        self._stream = stream
        self.what = what
        self.pos = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        if n <= 0:
            return b""
        data = self._stream.read(n)
        if len(data) < n and data:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._stream.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes (whatever one read of the stream gives); ``b""`` only at its end."""
        data = self._stream.read(n) if n > 0 else b""
        self.pos += len(data)
        return data

    def read_exact(self, n: int, context: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise TruncatedArtifact(f"{self.what} is truncated: {context} ends after {len(data)} of {n} bytes")
        return data


def _parse_numeric(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        if field[0] & 0x40:
            raise MalformedArtifact(f"negative number in tar header field {what}")
        return value
    m = _NUMERIC_RE.match(field)
    if not m:
        raise MalformedArtifact(f"invalid number in tar header field {what}: {field!r}")
    return int(m.group(1) or b"0", 8)


def _cstring(field: bytes, what: str) -> str:
    raw = field.split(b"\x00", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedArtifact(f"tar member {what} is not valid UTF-8: {raw!r}") from None


def _parse_pax(data: bytes, what: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            raise MalformedArtifact(f"{what}: malformed PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise MalformedArtifact(f"{what}: malformed PAX record length") from None
        rec = data[pos : pos + length]
        if length <= sp - pos or len(rec) != length or not rec.endswith(b"\n") or b"=" not in rec:
            raise MalformedArtifact(f"{what}: malformed PAX record")
        key, _, value = rec[sp - pos + 1 : -1].partition(b"=")
        try:
            records[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise MalformedArtifact(f"{what}: PAX record is not UTF-8") from None
        pos += length
    return records


def _check_unused_numeric(block: bytes) -> None:
    """Fields we do not use must still be well-formed numbers: garbage there is corruption."""
    for what, field in (("uid", block[108:116]), ("gid", block[116:124]), ("devmajor", block[329:337]),
                        ("devminor", block[337:345])):
        _parse_numeric(field, what)


@dataclass(frozen=True)
class TarEntry:
    name: str
    size: int
    mode: int
    mtime: int
    uname: str
    gname: str


class TarReader:
    """Iterates the members of a tar stream, strictly. Use :meth:`next` then :meth:`read` for each member;
    unread member data is skipped (still read, so the stream stays sequential)."""

    def __init__(self, src: ByteSource, what: str, *, max_member_size: int | None = None) -> None:
        self._src = src
        self.what = what
        self._max = max_member_size
        self._remaining = 0  # unread data bytes of the current member
        self._pad = 0
        self._ended = False
        self.entry: TarEntry | None = None

    # -- members
    def next(self) -> TarEntry | None:
        """The next member, or ``None`` after the end-of-archive blocks (then only zeros may follow)."""
        if self._ended:
            return None
        self._skip_rest()
        pax: dict[str, str] = {}
        long_name: str | None = None
        while True:
            block = self._src.read(BLOCK)
            if len(block) == 0:
                raise TruncatedArtifact(f"{self.what} is truncated: it ends without the end-of-archive blocks")
            if len(block) < BLOCK:
                raise TruncatedArtifact(f"{self.what} is truncated inside a tar header")
            if block == _ZERO_BLOCK:
                self._end_of_archive(bool(pax) or long_name is not None)
                return None
            self._check_checksum(block)
            magic = block[257:265]
            gnu = magic == b"ustar  \x00"
            if magic != b"ustar\x0000" and not gnu:
                raise MalformedArtifact(f"{self.what}: not a USTAR tar header (magic {magic!r})")
            typeflag = block[156:157]
            size = _parse_numeric(block[124:136], "size")
            if typeflag in (b"x", b"L"):
                if size > _MAX_PAX_SIZE:
                    raise MalformedArtifact(f"{self.what}: extended header of {size} bytes is absurd")
                data = self._src.read_exact(size + padding(size), "an extended header")
                self._check_zero(data[size:], "extended header padding")
                if typeflag == b"x":
                    records = _parse_pax(data[:size], self.what)
                    # Our writer fills reserved space with a comment of "x"s; nothing else puts comments in
                    # artifacts. Checking it leaves no unverified bytes there (a flipped bit is refused).
                    if records.get("comment", "x").strip("x"):
                        raise MalformedArtifact(f"{self.what}: unexpected PAX comment (corrupted filler)")
                    unknown = [k for k in records if k not in _PAX_KEYS and not k.startswith(_PAX_XATTR_PREFIXES)]
                    if unknown:
                        raise MalformedArtifact(f"{self.what}: unsupported PAX record {unknown[0]!r}")
                    pax.update(records)
                else:
                    long_name = _cstring(data[:size], "long name")
                continue
            if typeflag not in (b"0", b"\x00"):
                raise MalformedArtifact(
                    f"{self.what}: member {_cstring(block[:100], 'name')!r} has tar type {typeflag!r}; "
                    "only regular files are allowed"
                )
            name = _cstring(block[0:100], "name")
            prefix = "" if gnu else _cstring(block[345:500], "prefix")
            if prefix:
                name = prefix + "/" + name
            if long_name is not None:
                name = long_name
            if "path" in pax:
                name = pax["path"]
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise MalformedArtifact(f"{self.what}: PAX size is not a number") from None
            if not name:
                raise MalformedArtifact(f"{self.what}: member with an empty name")
            if size < 0:
                raise MalformedArtifact(f"{self.what}: member {name!r} has a negative size")
            if self._max is not None and size > self._max:
                raise MalformedArtifact(f"{self.what}: member {name!r} claims {size} bytes, which is absurd")
            _check_unused_numeric(block)
            self.entry = TarEntry(
                name=name,
                size=size,
                mode=_parse_numeric(block[100:108], "mode"),
                mtime=_parse_numeric(block[136:148], "mtime"),
                uname=_cstring(block[265:297], "uname"),
                gname=_cstring(block[297:329], "gname"),
            )
            self._remaining = size
            self._pad = padding(size)
            return self.entry

    # -- data of the current member
    @property
    def remaining(self) -> int:
        return self._remaining

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member; ``b""`` at its end."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        entry = self.entry
        data = self._src.read_exact(n, f"member {entry.name if entry else '?'}")
        self._remaining -= n
        return data

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member, as they come (no copying into a bigger buffer)."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._src.read_some(n)
        if not data:
            entry = self.entry
            raise TruncatedArtifact(f"{self._src.what} is truncated inside member {entry.name if entry else '?'}")
        self._remaining -= len(data)
        return data

    def read_all(self) -> bytes:
        return self.read(self._remaining)

    def finish_member(self) -> None:
        """Consume what is left of the current member and check its padding."""
        self._skip_rest()

    def close(self) -> None:
        """Check that the archive ended properly (call after :meth:`next` returned ``None``)."""
        if not self._ended:
            raise MalformedArtifact(f"{self.what}: unexpected member after the expected ones")

    # -- internals
    def _skip_rest(self) -> None:
        while self._remaining:
            self.read(min(self._remaining, 1 << 20))
        if self._pad:
            self._check_zero(self._src.read_exact(self._pad, "member padding"), "member padding")
            self._pad = 0

    def _end_of_archive(self, pending_extension: bool) -> None:
        if pending_extension:
            raise MalformedArtifact(f"{self.what}: extended header without a member")
        second = self._src.read(BLOCK)
        if len(second) < BLOCK:
            raise TruncatedArtifact(f"{self.what} is truncated in its end-of-archive blocks")
        self._check_zero(second, "end-of-archive block")
        while chunk := self._src.read(1 << 16):
            self._check_zero(chunk, "data after the end of the archive")
        self._ended = True
        self.entry = None

    def _check_zero(self, data: bytes, what: str) -> None:
        if data.count(0) != len(data):
            raise MalformedArtifact(f"{self.what}: non-zero bytes in {what}")

    def _check_checksum(self, block: bytes) -> None:
        field = block[148:156]
        m = _CHKSUM_RE.match(field)
        if not m:
            raise MalformedArtifact(f"{self.what}: malformed tar header checksum field {field!r}")
        stored = int(next(g for g in m.groups() if g), 8)
        blanked = block[:148] + b" " * 8 + block[156:]
        # the unsigned sum only: every writer of artifacts (Go, GNU tar, Python) uses it, and also accepting
        # the historical signed sum would let some two-byte corruptions pass
        if stored != sum(blanked):
            raise MalformedArtifact(f"{self.what}: tar header checksum mismatch (corrupted header)")
