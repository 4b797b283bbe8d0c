"""The boot-state environment: U-Boot's redundant environment in two files, byte-compatible with
libubootenv (``fw_printenv``/``fw_setenv``) and with the ``boot.scr`` that reads it.

Each copy: CRC32 (little endian) over the data area, one flags byte, then ``name=value\\0`` pairs, a final
``\\0`` and 0xff padding up to the environment size. Reading picks the valid copy; when both are valid, the
one with the larger flags byte, except that 0 beats 255 (wrap-around) and equal flags pick the first copy —
the rules libubootenv 0.3.2 applies (checked against it in the tests). Writing always goes to the *other*
copy with flags + 1, so a power cut during a write leaves the previous state readable.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ota_common.errors import BootEnvError

from . import boottune
from .faults import fault

ENV_SIZE = 0x4000
#: the state a freshly flashed device boots with: slot A, nothing on trial
INITIAL_STATE = {"mender_boot_part": "2", "upgrade_available": "0", "bootcount": "0", "bootlimit": "1"}
_HEADER = 5  # CRC32 + flags


def encode(variables: Mapping[str, str], flags: int, size: int = ENV_SIZE) -> bytes:
    """One copy of the environment, as ``fw_setenv`` writes it (variables sorted by name)."""
    for name, value in variables.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise BootEnvError(f"invalid environment variable {name!r}")
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(variables.items())) + b"\0"
    if len(data) > size - _HEADER:
        raise BootEnvError(f"environment needs {len(data)} bytes but holds {size - _HEADER}")
    data += b"\xff" * (size - _HEADER - len(data))
    return zlib.crc32(data).to_bytes(4, "little") + bytes([flags & 0xFF]) + data


@dataclass(frozen=True)
class Copy:
    valid: bool
    flags: int
    variables: dict[str, str]


def decode(blob: bytes, size: int = ENV_SIZE) -> Copy:
    """Parse one copy; ``valid`` is False for a short, torn or corrupt copy."""
    if len(blob) < size:
        return Copy(False, 0, {})
    blob = blob[:size]
    data = blob[_HEADER:]
    if zlib.crc32(data) != int.from_bytes(blob[:4], "little"):
        return Copy(False, blob[4], {})
    variables: dict[str, str] = {}
    for entry in data.split(b"\0"):
        if not entry:
            break
        name, sep, value = entry.partition(b"=")
        if sep:
            variables[name.decode(errors="replace")] = value.decode(errors="replace")
    return Copy(True, blob[4], variables)


def newer(a: Copy, b: Copy) -> int:
    """Index (0 or 1) of the copy libubootenv reads; raises :class:`BootEnvError` when neither is valid."""
    if a.valid and b.valid:
        if a.flags == 0xFF and b.flags == 0:
            return 1
        if b.flags == 0xFF and a.flags == 0:
            return 0
        return 1 if b.flags > a.flags else 0
    if a.valid:
        return 0
    if b.valid:
        return 1
    raise BootEnvError("both copies of the boot environment are invalid")


class BootEnv:
    """The two files of the redundant environment (``/etc/fw_env.config`` names them)."""

    def __init__(self, copies: Sequence[Path], size: int = ENV_SIZE) -> None:
        if len(copies) != 2:
            raise BootEnvError("a redundant environment needs exactly two copies")
        self.copies = (Path(copies[0]), Path(copies[1]))
        self.size = size

    @classmethod
    def from_fw_env_config(cls, config: Path = Path("/etc/fw_env.config")) -> BootEnv:
        entries = []
        for line in config.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                fields = line.split()
                if len(fields) < 3 or int(fields[1], 0) != 0:
                    raise BootEnvError(f"{config}: unsupported line {line!r} (need: file 0x0 size)")
                entries.append((Path(fields[0]), int(fields[2], 0)))
        if len(entries) != 2 or entries[0][1] != entries[1][1]:
            raise BootEnvError(f"{config}: expected two copies of the same size")
        return cls([entries[0][0], entries[1][0]], entries[0][1])

    def _copies(self) -> tuple[Copy, Copy]:
        out = []
        for path in self.copies:
            try:
                out.append(decode(path.read_bytes(), self.size))
            except FileNotFoundError:
                out.append(Copy(False, 0, {}))
        return out[0], out[1]

    def read(self) -> dict[str, str]:
        a, b = self._copies()
        return dict((a, b)[newer(a, b)].variables)

    def update(self, changes: Mapping[str, str | None], *, fault_point: str = "bootenv-write") -> dict[str, str]:
        """Set (or with ``None`` delete) variables in one write to the older copy. Returns the new state.
        ``fault_point`` names the write for the tests' power cuts (:mod:`.faults`). The local boot tuning
        (:mod:`.boottune`) is kept as it is and cannot be changed here: raises :class:`BootEnvError`."""
        tuning = sorted(set(changes) & set(boottune.NAMES))
        if tuning:
            raise BootEnvError(f"{', '.join(tuning)}: local boot tuning, set only with fw_setenv on the device")
        a, b = self._copies()
        current = newer(a, b)
        state = dict((a, b)[current].variables)
        for name, value in changes.items():
            if value is None:
                state.pop(name, None)
            else:
                state[name] = value
        flags = ((a, b)[current].flags + 1) & 0xFF
        self._write(1 - current, encode(state, flags, self.size), fault_point)
        return state

    def repair(self) -> str:
        """Rewrite an invalid copy from the valid one (a torn write, a bad sector), so the next power cut
        still finds a good copy. Returns what was done ("" when both were fine). Raises :class:`BootEnvError`
        when neither copy is valid (then :meth:`create` rebuilds the state)."""
        a, b = self._copies()
        good = newer(a, b)
        bad = 1 - good
        if (a, b)[bad].valid:
            return ""
        copy = (a, b)[good]
        self._write(bad, encode(copy.variables, (copy.flags + 1) & 0xFF, self.size))
        return f"copy {self.copies[bad].name} was invalid: rewritten from {self.copies[good].name}"

    @property
    def last_good_path(self) -> Path:
        """``lastgood`` beside the copies: the slot ``boot.scr`` boots when both copies are invalid."""
        return self.copies[0].parent / "lastgood"

    def record_last_good(self, part: int) -> None:
        """Remember ``part`` as the last committed slot (a text file ``boot.scr`` imports with ``env import
        -t``); written only when it changes, through a temporary file and a rename."""
        if part not in (2, 3):
            raise BootEnvError(f"not a slot partition: {part}")
        text = f"mender_boot_part={part}\n".encode()
        path = self.last_good_path
        try:
            if path.read_bytes() == text:
                return
        except FileNotFoundError:
            pass
        tmp = path.with_name(".lastgood.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def create(self, variables: Mapping[str, str]) -> None:
        """Write both copies (as ``mkenvimage -r`` does: flags 1 in each)."""
        blob = encode(variables, 1, self.size)
        for i in (0, 1):
            self._write(i, blob)

    def _write(self, index: int, blob: bytes, fault_point: str = "bootenv-write") -> None:
        path = self.copies[index]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if "OTA_AGENT_FAULT" in os.environ:  # tests: power lost in the middle of this write (the new
                os.pwrite(fd, blob[:_HEADER], 0)  # CRC and flags landed, the variables did not: a torn copy)
                os.fsync(fd)
                fault(fault_point)
            os.pwrite(fd, blob, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
