"""The CLI contract, run as a user runs it: exit codes and one clear line on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import make_payload
from .tampering import members, pack, replace


def test_keys_generate_writes_mender_compatible_keys_and_never_overwrites(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    for kind, marker in (("ecdsa-p256", "EC PRIVATE KEY"), ("rsa-3072", "RSA PRIVATE KEY")):
        d = tmp_path / kind
        run_cli("keys", "generate", "--type", kind, "--out", d, check=True)
        assert f"-----BEGIN {marker}-----" in (d / "private.pem").read_text()
        assert "-----BEGIN PUBLIC KEY-----" in (d / "public.pem").read_text()
        assert (d / "private.pem").stat().st_mode & 0o077 == 0
        before = (d / "private.pem").read_bytes()
        p = run_cli("keys", "generate", "--type", kind, "--out", d)
        assert p.returncode == 2 and "refusing to overwrite" in p.stderr
        assert (d / "private.pem").read_bytes() == before


def test_write_verify_show_sign(tmp_path: Path, run_cli, payload: Path) -> None:  # type: ignore[no-untyped-def]
    run_cli("keys", "generate", "--out", tmp_path / "k", check=True)
    run_cli("keys", "generate", "--type", "rsa-3072", "--out", tmp_path / "k2", check=True)
    script = tmp_path / "ArtifactReboot_Leave_10_check"
    script.write_text("#!/bin/sh\nexit 0\n")
    art = tmp_path / "r.mender"
    run_cli("artifact", "write", "rootfs-image", "--file", payload, "--name", "vv-1.0", "--device-type", "rpi4",
            "--device-type", "qemu-virt", "--key", tmp_path / "k/private.pem", "--compression", "lzma",
            "--script", script, "--provides", "vv.version:1.0", "--depends", "board:rev2",
            "--depends-artifact", "vv-0.9", "-o", art, check=True)
    ok = run_cli("artifact", "verify", art, "--key", tmp_path / "k2/public.pem", "--key", tmp_path / "k/public.pem")
    assert ok.returncode == 0 and ok.stdout.startswith("OK")

    shown = json.loads(run_cli("artifact", "show", art, "--json", check=True).stdout)
    assert shown["name"] == "vv-1.0" and shown["format"] == "mender" and shown["version"] == 3
    assert shown["device_types"] == ["rpi4", "qemu-virt"]
    assert shown["depends"]["artifact_name"] == ["vv-0.9"]
    assert shown["compression"] == "lzma" and shown["signed"] is True
    assert shown["scripts"] == ["ArtifactReboot_Leave_10_check"]
    (p,) = shown["payloads"]
    assert p["type"] == "rootfs-image" and p["provides"]["vv.version"] == "1.0" and p["depends"] == {"board": "rev2"}
    assert p["files"] == [{"name": payload.name, "size": payload.stat().st_size, "sha256": p["provides"]["rootfs-image.checksum"]}]
    text = run_cli("artifact", "show", art, check=True).stdout
    assert "Artifact:      vv-1.0" in text and "Signature:     signed" in text

    resigned = tmp_path / "resigned.mender"
    run_cli("artifact", "sign", art, "--key", tmp_path / "k2/private.pem", "-o", resigned, check=True)
    assert run_cli("artifact", "verify", resigned, "--key", tmp_path / "k2/public.pem").returncode == 0
    bad = run_cli("artifact", "verify", resigned, "--key", tmp_path / "k/public.pem")
    assert bad.returncode == 1


def test_module_image(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    f1, f2 = make_payload(tmp_path / "a.bin", 1000), make_payload(tmp_path / "b.bin", 10, seed=3)
    art = tmp_path / "m.mender"
    run_cli("artifact", "write", "module-image", "--type", "vv-app", "--file", f1, "--file", f2, "--name", "app-3",
            "-t", "qemu-virt", "-o", art, check=True)
    shown = json.loads(run_cli("artifact", "show", art, "--json", check=True).stdout)
    assert [f["name"] for f in shown["payloads"][0]["files"]] == ["a.bin", "b.bin"]
    assert shown["signed"] is False


@pytest.fixture
def signed_art(tmp_path: Path, run_cli, payload: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    run_cli("keys", "generate", "--out", tmp_path / "k", check=True)
    art = tmp_path / "s.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "s", "-t", "q", "-k", tmp_path / "k/private.pem",
            "-o", art, check=True)
    return art, tmp_path / "k/public.pem"


def _one_error_line(proc) -> str:  # type: ignore[no-untyped-def]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_verify_names_each_problem_in_one_line(tmp_path: Path, run_cli, signed_art, payload: Path) -> None:  # type: ignore[no-untyped-def]
    art, pub = signed_art
    unsigned = tmp_path / "u.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "u", "-t", "q", "-o", unsigned, check=True)
    p = run_cli("artifact", "verify", unsigned, "--key", pub)
    assert p.returncode == 1 and "not signed" in _one_error_line(p)

    run_cli("keys", "generate", "--out", tmp_path / "other", check=True)
    p = run_cli("artifact", "verify", art, "--key", tmp_path / "other/public.pem")
    assert p.returncode == 1 and "bad signature" in _one_error_line(p)

    items = members(art)
    (tmp_path / "o").mkdir()
    other = tmp_path / "o" / payload.name
    other.write_bytes(bytes(reversed(payload.read_bytes())))
    o_art = tmp_path / "o.mender"
    run_cli("artifact", "write", "rootfs-image", "-f", other, "-n", "s", "-t", "q", "-o", o_art, check=True)
    mixed = pack(tmp_path / "mixed.mender", replace(items, "data/0000.tar.gz", dict(members(o_art))["data/0000.tar.gz"]))
    p = run_cli("artifact", "verify", mixed, "--key", pub)
    assert p.returncode == 1 and "checksum mismatch for data/0000/rootfs.ext4" in _one_error_line(p)

    trunc = tmp_path / "t.mender"
    trunc.write_bytes(art.read_bytes()[:3000])
    p = run_cli("artifact", "verify", trunc, "--key", pub)
    assert p.returncode == 1 and "truncated" in _one_error_line(p)

    junk = tmp_path / "junk.mender"
    junk.write_bytes(b"not an artifact at all" * 100)
    p = run_cli("artifact", "verify", junk, "--key", pub)
    assert p.returncode == 1 and "tar" in _one_error_line(p)

    ed = tmp_path / "ed.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    p = run_cli("artifact", "verify", art, "--key", ed)
    assert p.returncode == 2 and "unsupported key" in _one_error_line(p)


def test_write_refuses_bad_input_without_leaving_files(tmp_path: Path, run_cli, payload: Path) -> None:  # type: ignore[no-untyped-def]
    bad_script = tmp_path / "install.sh"
    bad_script.write_text("#!/bin/sh\n")
    out = tmp_path / "out" / "x.mender"
    out.parent.mkdir()
    p = run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "x", "-t", "q", "-s", bad_script, "-o", out)
    assert p.returncode == 2 and "invalid state script name" in _one_error_line(p)
    p = run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "x", "-t", "q", "--provides", "novalue", "-o", out)
    assert p.returncode == 2 and _one_error_line(p) == "error: --provides must be KEY:VALUE, got 'novalue'"
    p = run_cli("artifact", "write", "module-image", "-T", "m", "-f", payload, "-n", "x", "-t", "q", "-d", "k:",
                "-o", out)
    assert p.returncode == 2 and _one_error_line(p) == "error: --depends must be KEY:VALUE, got 'k:'"
    pub_as_private = tmp_path / "k"
    run_cli("keys", "generate", "--out", pub_as_private, check=True)
    p = run_cli("artifact", "write", "rootfs-image", "-f", payload, "-n", "x", "-t", "q", "-k", pub_as_private / "public.pem", "-o", out)
    assert p.returncode == 2 and "public key" in _one_error_line(p)
    assert list(out.parent.iterdir()) == []


def test_the_library_names_the_provide_not_the_option(payload: Path) -> None:
    """Library messages speak the library's terms; the option name is the CLI's to add (above)."""
    from artifacts.writer import module_image_spec, rootfs_image_spec
    from ota_common.errors import UserError

    with pytest.raises(UserError) as exc:
        rootfs_image_spec(file=payload, name="x", device_types=["q"], provides=["novalue"])
    assert str(exc.value) == "provides must be KEY:VALUE, got 'novalue'"
    with pytest.raises(UserError) as exc:
        module_image_spec(module_type="m", files=[payload], name="x", device_types=["q"], depends=[":v"])
    assert str(exc.value) == "depends must be KEY:VALUE, got ':v'"
