"""Signed Mender artifact v3: writer, streaming verifying reader, keys.

Modules: :mod:`.format` (constants and limits), :mod:`.manifest`, :mod:`.header`, :mod:`.keys` (signers,
verifiers, key generation), :mod:`.tarstream` (strict tar), :mod:`.compression`, :mod:`.writer`,
:mod:`.reader`. Names are imported lazily so that a verifier does not load the writer (start-up time counts
on a device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota_common.lazy import lazy_getattr

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use
    from .format import Compression
    from .keys import KeyType, Signer, Verifier, generate_keypair, load_signer, load_verifier, load_verifiers
    from .reader import ArtifactInfo, ArtifactReader, PayloadFile, SignatureStatus, read_artifact
    from .writer import ArtifactSpec, PayloadSpec, module_image_spec, rootfs_image_spec, sign_artifact, write_artifact

_EXPORTS = {
    "Compression": "format",
    "KeyType": "keys",
    "Signer": "keys",
    "Verifier": "keys",
    "generate_keypair": "keys",
    "load_signer": "keys",
    "load_verifier": "keys",
    "load_verifiers": "keys",
    "ArtifactInfo": "reader",
    "ArtifactReader": "reader",
    "PayloadFile": "reader",
    "SignatureStatus": "reader",
    "read_artifact": "reader",
    "ArtifactSpec": "writer",
    "PayloadSpec": "writer",
    "module_image_spec": "writer",
    "rootfs_image_spec": "writer",
    "sign_artifact": "writer",
    "write_artifact": "writer",
}

__all__ = [
    "ArtifactInfo",
    "ArtifactReader",
    "ArtifactSpec",
    "Compression",
    "KeyType",
    "PayloadFile",
    "PayloadSpec",
    "SignatureStatus",
    "Signer",
    "Verifier",
    "generate_keypair",
    "load_signer",
    "load_verifier",
    "load_verifiers",
    "module_image_spec",
    "read_artifact",
    "rootfs_image_spec",
    "sign_artifact",
    "write_artifact",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
