"""Helpers to take a valid artifact apart and put it back together with one thing wrong."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

from artifacts.keys import KeySigner
from artifacts.tarstream import write_member


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def pack(out: Path, items: list[tuple[str, bytes]]) -> Path:
    buf = io.BytesIO()
    for name, data in items:
        write_member(buf, name, data)
    buf.write(bytes(1024))
    out.write_bytes(buf.getvalue())
    return out


def resign(items: list[tuple[str, bytes]], signer: KeySigner) -> list[tuple[str, bytes]]:
    """Replace manifest.sig with a valid signature over the (possibly modified) manifest."""
    manifest = dict(items)["manifest"]
    sig = base64.b64encode(signer.sign(manifest))
    return [(n, sig if n == "manifest.sig" else d) for n, d in items]


def replace(items: list[tuple[str, bytes]], name: str, data: bytes) -> list[tuple[str, bytes]]:
    assert name in dict(items), name
    return [(n, data if n == name else d) for n, d in items]


def inner_tar(*files: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    for name, data in files:
        write_member(buf, name, data, mode=0o644)
    buf.write(bytes(1024))
    return buf.getvalue()
