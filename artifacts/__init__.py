"""Signed Mender artifact v3: writer, streaming verifying reader, keys.

Modules: :mod:`.format` (constants and limits), :mod:`.manifest`, :mod:`.header`, :mod:`.keys` (signers,
verifiers, key generation), :mod:`.tarstream` (strict tar), :mod:`.compression`, :mod:`.writer`,
:mod:`.reader`.
"""

from .format import Compression
from .keys import KeyType, Signer, Verifier, generate_keypair, load_signer, load_verifier, load_verifiers
from .reader import ArtifactInfo, ArtifactReader, PayloadFile, SignatureStatus, read_artifact
from .writer import ArtifactSpec, PayloadSpec, module_image_spec, rootfs_image_spec, sign_artifact, write_artifact

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
