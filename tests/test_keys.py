"""Keys for verifying: public keys only, named by a fingerprint that other tools compute the same way."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from artifacts.keys import key_fingerprint, load_signer, load_verifier, signer_verifier
from ota_common.errors import BadSignature, KeyFormatError

from .conftest import make_payload


@pytest.mark.parametrize("name", ["ec", "rsa"])
def test_verifier_refuses_a_private_key(keys: dict[str, tuple[Path, Path]], name: str, tmp_path: Path) -> None:
    private = keys[name][0]
    with pytest.raises(KeyFormatError) as exc:
        load_verifier(private)
    assert str(exc.value) == f"{private}: is a private key; a device or a verifier must only hold public keys"
    # PKCS#8 too, and a public key glued to a private one
    pkcs8 = tmp_path / "pkcs8.pem"
    key = serialization.load_pem_private_key(private.read_bytes(), None)
    pkcs8.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    both = tmp_path / "both.pem"
    both.write_bytes(keys[name][1].read_bytes() + private.read_bytes())
    for path in (pkcs8, both):
        with pytest.raises(KeyFormatError, match="is a private key"):
            load_verifier(path)
    assert load_verifier(keys[name][1]).description.endswith(f"key {keys[name][1]}")


@pytest.mark.parametrize("name", ["ec", "rsa"])
def test_fingerprint_is_sha256_of_der_subject_public_key_info(keys: dict[str, tuple[Path, Path]], name: str) -> None:
    private, public = keys[name]
    # computed independently of our code: the body of a PEM "PUBLIC KEY" block is the DER SubjectPublicKeyInfo
    text = public.read_text()
    assert text.startswith("-----BEGIN PUBLIC KEY-----\n")
    der = base64.b64decode("".join(line for line in text.splitlines() if not line.startswith("-----")))
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    verifier = load_verifier(public)
    assert verifier.fingerprint == expected
    assert key_fingerprint(verifier.key) == expected
    assert key_fingerprint(load_signer(private).key) == expected  # a private key: its public half
    assert load_verifier(keys["ec2"][1]).fingerprint != expected
    assert len(expected) == len("sha256:") + 64


def test_verifier_pem_is_the_public_key_re_serialised(keys: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    padded = tmp_path / "padded.pem"
    padded.write_bytes(b"a comment before the key\n" + keys["ec"][1].read_bytes())
    pem = load_verifier(padded).public_key_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----\n") and b"comment" not in pem
    assert isinstance(serialization.load_pem_public_key(pem), ec.EllipticCurvePublicKey)


def test_signer_verifier_checks_what_the_signer_signs(keys: dict[str, tuple[Path, Path]]) -> None:
    signer = load_signer(keys["rsa"][0])
    v = signer_verifier(signer)
    v.verify(b"manifest", signer.sign(b"manifest"))
    with pytest.raises(BadSignature):
        v.verify(b"other", signer.sign(b"manifest"))
    assert v.fingerprint == load_verifier(keys["rsa"][1]).fingerprint


def test_cli_verify_and_delta_refuse_a_private_key_as_verifying_key(tmp_path: Path, run_cli,  # type: ignore[no-untyped-def]
                                                                    keys: dict[str, tuple[Path, Path]]) -> None:
    payload = make_payload(tmp_path / "rootfs.ext4", 50_000)
    art = tmp_path / "s.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "s", "-t", "q", "-k", keys["ec"][0],
            "-o", art, check=True)
    for args in (("artifact", "verify", art, "--key", keys["ec"][0]),
                 ("artifact", "show", art, "--key", keys["ec"][0]),
                 ("artifact", "delta", "--from", art, "--to", art, "--key", keys["ec"][0],
                  "--verify-key", keys["ec"][0], "-o", tmp_path / "d.mender")):
        p = run_cli(*args)
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip() == f"error: {keys['ec'][0]}: is a private key; a device or a verifier must only hold public keys"
    assert run_cli("artifact", "verify", art, "--key", keys["ec"][1]).returncode == 0
