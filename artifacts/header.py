"""The artifact header (``header.tar.*``): ``header-info``, state scripts, and per payload ``type-info`` and
``meta-data``. Frozen dataclasses, JSON written the way mender-artifact 3.9 (Go's ``encoding/json``) writes it,
and strict parsing of untrusted JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ota_common.errors import MalformedArtifact

from .format import (
    MAX_DEVICE_TYPES,
    MAX_JSON_SIZE,
    MAX_PAYLOADS,
    PAYLOAD_TYPE_RE,
    SBOM_SHA256_KEY,
    STATE_SCRIPT_RE,
    TOKEN_RE,
    Compression,
)

DependValue = str | tuple[str, ...]


@dataclass(frozen=True)
class HeaderInfo:
    """``header-info``: what the artifact is and which devices may install it."""

    artifact_name: str
    device_types: tuple[str, ...]
    payload_types: tuple[str, ...]
    artifact_group: str | None = None
    depends_artifact_names: tuple[str, ...] = ()
    depends_groups: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        provides: dict[str, Any] = {"artifact_name": self.artifact_name}
        if self.artifact_group:
            provides["artifact_group"] = self.artifact_group
        depends: dict[str, Any] = {}
        if self.depends_artifact_names:
            depends["artifact_name"] = list(self.depends_artifact_names)
        depends["device_type"] = list(self.device_types)
        if self.depends_groups:
            depends["artifact_group"] = list(self.depends_groups)
        return go_json(
            {
                "payloads": [{"type": t} for t in self.payload_types],
                "artifact_provides": provides,
                "artifact_depends": depends,
            }
        )


@dataclass(frozen=True)
class TypeInfo:
    """``headers/NNNN/type-info``: a payload's type, provides, depends and clears-provides."""

    type: str
    provides: Mapping[str, str] = field(default_factory=dict)
    depends: Mapping[str, DependValue] = field(default_factory=dict)
    clears_provides: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"type": self.type}
        if self.depends:
            doc["artifact_depends"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(self.depends.items())}
        if self.provides:
            doc["artifact_provides"] = dict(sorted(self.provides.items()))
        if self.clears_provides:
            doc["clears_artifact_provides"] = list(self.clears_provides)
        return go_json(doc)


@dataclass(frozen=True)
class ArtifactHeader:
    """Everything in ``header.tar.*``, validated."""

    info: HeaderInfo
    type_infos: tuple[TypeInfo, ...]
    meta_data: tuple[Mapping[str, Any] | None, ...]
    scripts: Mapping[str, bytes]
    compression: Compression

    def sbom_sha256(self) -> str | None:
        """The sha256 of the SBOM the signed header names for its first payload (:data:`SBOM_SHA256_KEY` in its
        meta-data), None when it names none. Raises :class:`MalformedArtifact` for a value that is not 64
        lowercase hex digits."""
        meta = self.meta_data[0] if self.meta_data else None
        if meta is None or SBOM_SHA256_KEY not in meta:
            return None
        value = meta[SBOM_SHA256_KEY]
        if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
            raise MalformedArtifact(f"headers/0000/meta-data: {SBOM_SHA256_KEY} is not a sha256 hex digest")
        return value


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def go_json(doc: Any) -> bytes:
    """JSON as Go's ``json.Marshal`` writes it: compact, UTF-8, HTML characters escaped."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


# ---------------------------------------------------------------------------------------------------------
# Parsing untrusted JSON


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_json_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_SIZE:
        raise MalformedArtifact(f"{what} is {len(data)} bytes, which is absurd")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedArtifact(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise MalformedArtifact(f"{what} must be a JSON object")
    return doc


def _token(value: Any, what: str) -> str:
    if not isinstance(value, str) or not TOKEN_RE.match(value):
        raise MalformedArtifact(f"{what} must be a non-empty string without control characters, got {value!r}")
    return value


def _token_list(value: Any, what: str, *, required: bool = False) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or (required and not value):
        raise MalformedArtifact(f"{what} must be a {'non-empty ' if required else ''}list of strings")
    if len(value) > MAX_DEVICE_TYPES:
        raise MalformedArtifact(f"{what} has {len(value)} entries, which is absurd")
    return tuple(_token(v, what) for v in value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedArtifact(f"{what} must be a JSON object")
    return value


def parse_header_info(data: bytes) -> HeaderInfo:
    doc = load_json_object(data, "header-info")
    payloads = doc.get("payloads")
    if not isinstance(payloads, list):
        raise MalformedArtifact("header-info: 'payloads' must be a list")
    if len(payloads) > MAX_PAYLOADS:
        raise MalformedArtifact(f"header-info lists {len(payloads)} payloads, which is absurd")
    types = []
    for i, p in enumerate(payloads):
        t = p.get("type") if isinstance(p, dict) else None
        if not isinstance(t, str) or not PAYLOAD_TYPE_RE.match(t):
            raise MalformedArtifact(f"header-info: payload {i} has an invalid type {t!r}")
        types.append(t)
    provides = _object(doc.get("artifact_provides"), "header-info artifact_provides")
    depends = _object(doc.get("artifact_depends"), "header-info artifact_depends")
    group = provides.get("artifact_group")
    return HeaderInfo(
        artifact_name=_token(provides.get("artifact_name"), "header-info artifact_provides.artifact_name"),
        artifact_group=None if group in (None, "") else _token(group, "artifact_group"),
        device_types=_token_list(depends.get("device_type"), "header-info artifact_depends.device_type", required=True),
        depends_artifact_names=_token_list(depends.get("artifact_name"), "header-info artifact_depends.artifact_name"),
        depends_groups=_token_list(depends.get("artifact_group"), "header-info artifact_depends.artifact_group"),
        payload_types=tuple(types),
    )


def parse_type_info(data: bytes, index: int, expected_type: str) -> TypeInfo:
    what = f"headers/{index:04d}/type-info"
    doc = load_json_object(data, what)
    t = doc.get("type")
    # mender-artifact 3.9 writes "" for rootfs-image payloads; header-info is authoritative then.
    if t in (None, ""):
        t = expected_type
    if t != expected_type:
        raise MalformedArtifact(f"{what}: type {t!r} differs from header-info's {expected_type!r}")
    provides: dict[str, str] = {}
    for k, v in _object(doc.get("artifact_provides"), f"{what} artifact_provides").items():
        provides[_token(k, f"{what} provides key")] = _token(v, f"{what} provides {k}")
    depends: dict[str, DependValue] = {}
    for k, v in _object(doc.get("artifact_depends"), f"{what} artifact_depends").items():
        key = _token(k, f"{what} depends key")
        depends[key] = _token_list(v, f"{what} depends {k}") if isinstance(v, list) else _token(v, f"{what} depends {k}")
    clears = _token_list(doc.get("clears_artifact_provides"), f"{what} clears_artifact_provides")
    return TypeInfo(type=t, provides=provides, depends=depends, clears_provides=clears)


def parse_meta_data(data: bytes, index: int) -> Mapping[str, Any] | None:
    if not data.strip():
        return None
    return load_json_object(data, f"headers/{index:04d}/meta-data")


def check_script_name(name: str) -> str:
    if not STATE_SCRIPT_RE.match(name):
        raise MalformedArtifact(f"invalid state script name {name!r}")
    return name
