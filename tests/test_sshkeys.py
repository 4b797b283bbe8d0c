"""ota_common.sshkeys: the operators' SSH keys, checked the same way by the server, the Ansible import and the
device before anything reaches the authorized_keys file that gives root a shell."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ota_common.sshkeys import MAX_KEYS, SSHKeyError, authorized_keys_text, check_value, parse_keys, parse_line


def openssh(key: object, comment: str = "") -> str:
    pub = key.public_key()  # type: ignore[attr-defined]
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


def _string(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def sk_ed25519_line() -> str:
    pk = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                        serialization.PublicFormat.Raw)
    blob = _string(b"sk-ssh-ed25519@openssh.com") + _string(pk) + _string(b"ssh:")
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} yubikey"


ED = ed25519.Ed25519PrivateKey.generate()


@pytest.mark.parametrize("make", [
    lambda: openssh(ED, "alice@laptop"),
    lambda: openssh(ec.generate_private_key(ec.SECP256R1())),
    lambda: openssh(ec.generate_private_key(ec.SECP384R1()), "ops"),
    lambda: openssh(ec.generate_private_key(ec.SECP521R1()), "ops"),
    lambda: openssh(rsa.generate_private_key(65537, 2048), "old laptop"),
    sk_ed25519_line,
], ids=["ed25519", "p256", "p384", "p521", "rsa2048", "sk-ed25519"])
def test_accepted_key_types_and_their_fingerprints(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line = make()
    key = parse_line(line)
    assert key.line == line
    assert key.fingerprint.startswith("SHA256:") and not key.fingerprint.endswith("=")
    if shutil.which("ssh-keygen"):
        f = tmp_path / "k.pub"
        f.write_text(line + "\n")
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(f)], capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == key.fingerprint


def test_a_value_holds_lines_separated_by_newlines_or_semicolons() -> None:
    a, b = openssh(ED, "a"), openssh(ec.generate_private_key(ec.SECP256R1()), "b")
    keys = parse_keys(f"# the operators\n{a}\r\n\n{b};{a}; ")
    assert [k.comment for k in keys] == ["a", "b"], "comments and blank lines dropped, duplicates once"
    assert authorized_keys_text(keys) == f"{a}\n{b}\n"
    assert parse_keys("") == []


def _forged_type_blob() -> str:
    """An ssh-rsa line whose blob is an ed25519 key."""
    return "ssh-rsa " + openssh(ED).split()[1]


def _truncated() -> str:
    t, b64 = openssh(ED).split()
    return f"{t} {base64.b64encode(base64.b64decode(b64)[:-5]).decode()}"


def _trailing() -> str:
    t, b64 = openssh(ED).split()
    return f"{t} {base64.b64encode(base64.b64decode(b64) + b'x').decode()}"


@pytest.mark.parametrize("line, why", [
    (f'command="/bin/sh -c evil" {openssh(ED)}', "not a key type"),
    (f"no-pty,from=\"10.0.0.0/8\" {openssh(ED)}", "not a key type"),
    (f'environment="LD_PRELOAD=/x" {openssh(ED)}', "not a key type"),
    (_forged_type_blob(), "the key blob is a 'ssh-ed25519' key, the line says ssh-rsa"),
    (_truncated(), "truncated"),
    (_trailing(), "bytes after the key"),
    ("ssh-ed25519 !!notbase64!!", "not base64"),
    ("ssh-ed25519", "need '<type> <base64 key> [comment]'"),
    (openssh(rsa.generate_private_key(65537, 1024)), "2048 to 16384 bits"),
    ("ssh-dss " + base64.b64encode(_string(b"ssh-dss") + _string(b"\x01" * 128)).decode(), "not a key type"),
    (openssh(ED, "evil\x1b[2J"), "printable ASCII"),
    (openssh(ED, "é"), "printable ASCII"),
], ids=["command", "from", "environment", "forged-type", "truncated", "trailing", "base64", "no-blob", "rsa1024",
        "dsa", "escape-in-comment", "non-ascii-comment"])
def test_refused_lines(line: str, why: str) -> None:
    with pytest.raises(SSHKeyError, match="key line 2: .*" + re.escape(why)):
        parse_keys(openssh(ED, "good") + "\n" + line)
    assert check_value(line) is not None


def test_at_most_100_keys() -> None:
    many = "\n".join(openssh(ed25519.Ed25519PrivateKey.generate()) for _ in range(MAX_KEYS + 1))
    assert check_value(many) == f"more than {MAX_KEYS} keys"
