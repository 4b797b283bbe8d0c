"""What a release's image trusts, checked at build time without building: keys (trusted, revoked, the release
key), the server CA and URL, the security version, unsigned images, and the agent configuration rendered from
them (parsed with the agent's own parser)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from artifacts.keys import load_signer, load_verifier
from device_hooks.config import parse_config
from image.build import template_context
from image.config import ReleaseModel, load_release, with_overrides
from image.disk import plan_layout
from image.layers import load_layers, merge_layers
from image.release import DEFAULT_CONFIG, build_release
from image.rootfs import render_template
from image.trust import (
    REVOKED_KEYS,
    SERVER_CA,
    InsecureServerError,
    check_server_url,
    install_trust,
    load_server_ca,
    load_trust,
)
from ota_common.errors import KeyFormatError, UserError

LAYERS = DEFAULT_CONFIG.parent / "layers"
OTA_CONF = LAYERS / "ota" / "templates" / "ota.conf.j2"


def make_cert(tmp_path: Path, name: str = "ca", *, days: int = 30, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    """A self-signed certificate (PEM) in ``tmp_path/<name>.pem``; its key in ``<name>.key``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    return path


def _release(**values: Any) -> ReleaseModel:
    return with_overrides(load_release(DEFAULT_CONFIG), values)


def _ota_conf(release: ReleaseModel, *, signed: bool = True, server_ca: bool = False) -> str:
    merged = merge_layers(load_layers([LAYERS / f"{n}.yaml" for n in release.layers]))
    layout = plan_layout(slot_mib=release.slot_size_mib, seed=release.name)
    ctx = template_context(release, layout, {**merged.variables, **release.variables}, signed=signed,
                           config_variables=merged.config_variables, server_ca=server_ca,
                           required_config=merged.required_config, config_placeholders=merged.config_placeholders)
    return render_template(OTA_CONF, ctx)


# ---------------------------------------------------------------------------------------------------------
# release.yaml


def test_release_trust_settings_and_their_errors(tmp_path: Path) -> None:
    rel = load_release(DEFAULT_CONFIG)
    assert (rel.security_version, rel.server_ca, rel.insecure_http, rel.revoked_keys) == (0, "", False, ())
    p = tmp_path / "release.yaml"
    p.write_text("security_version: -1\ninsecure_http: 'maybe'\nrevoked_keys: old.pem\nserver_ca: [a]\n")
    with pytest.raises(UserError) as exc:
        load_release(p)
    msg = str(exc.value)
    for expected in ("security_version: Input should be greater than or equal to 0",
                     "insecure_http: Input should be a valid boolean", "revoked_keys: Input should be a valid tuple",
                     "server_ca: Input should be a valid string"):
        assert f"{p}: {expected}" in msg, msg
    p.write_text("security_version: '3'\n")  # a quoted number is a mistake worth hearing about
    with pytest.raises(UserError, match="security_version: Input should be a valid integer"):
        load_release(p)
    p.write_text("security_version: 12\ninsecure_http: true\nrevoked_keys: [old.pem]\nserver_ca: ca.pem\n")
    rel = load_release(p)
    assert (rel.security_version, rel.insecure_http, rel.revoked_keys, rel.server_ca) == (12, True, ("old.pem",), "ca.pem")
    assert with_overrides(rel, {"security_version": 13}).security_version == 13
    with pytest.raises(UserError, match="options: security_version: Input should be greater than or equal to 0"):
        with_overrides(rel, {"security_version": -2})


# ---------------------------------------------------------------------------------------------------------
# ota.conf, parsed by the agent's own parser


def test_ota_conf_of_a_signed_image() -> None:
    rel = _release(security_version=7, server_url="https://ota.example.com:8443")
    text = _ota_conf(rel, signed=True, server_ca=True)
    cfg = parse_config(text)
    assert cfg.device.security_version == 7
    assert cfg.device.config_variables == ("DEVICE_ID", "DVR_IP")
    assert cfg.device.unsigned is False
    assert cfg.server.url == "https://ota.example.com:8443"
    assert cfg.server.ca_file == SERVER_CA == "/etc/ota/server-ca.pem"
    assert cfg.server.insecure_http is False
    assert cfg.paths.trusted_keys == "/etc/ota/keys" and cfg.paths.revoked_keys == REVOKED_KEYS == "/etc/ota/keys.revoked"
    assert re.search(r"^config_variables = DEVICE_ID DVR_IP$", text, re.M)
    assert re.search(r"^security_version = 7$", text, re.M)


def test_ota_conf_of_an_unsigned_lab_image() -> None:
    rel = _release(server_url="http://10.0.2.2:8080", insecure_http=True)
    text = _ota_conf(rel, signed=False, server_ca=False)
    cfg = parse_config(text)
    assert cfg.device.unsigned is True and re.search(r"^unsigned = yes$", text, re.M)
    assert cfg.server.insecure_http is True and re.search(r"^insecure_http = yes$", text, re.M)
    assert cfg.server.ca_file == "" and cfg.device.security_version == 0
    # the defaults of the repository's release.yaml
    cfg = parse_config(_ota_conf(load_release(DEFAULT_CONFIG), signed=True))
    assert (cfg.server.url, cfg.server.ca_file, cfg.server.insecure_http, cfg.device.unsigned) == ("", "", False, False)


def test_ota_conf_config_variables_come_from_the_layers(tmp_path: Path) -> None:
    rel = load_release(DEFAULT_CONFIG)
    extra = tmp_path / "extra.yaml"
    extra.write_text("config_variables: [SITE_NAME, DVR_IP]\n")
    merged = merge_layers(load_layers([*(LAYERS / f"{n}.yaml" for n in rel.layers), extra]))
    ctx = template_context(rel, plan_layout(slot_mib=1024, seed="t"), merged.variables, signed=True,
                           config_variables=merged.config_variables)
    assert parse_config(render_template(OTA_CONF, ctx)).device.config_variables == ("DEVICE_ID", "DVR_IP", "SITE_NAME")
    none = template_context(rel, plan_layout(slot_mib=1024, seed="t"), merged.variables, signed=True)
    assert parse_config(render_template(OTA_CONF, none)).device.config_variables == ()


def test_ota_conf_requires_the_apps_configuration_with_the_layers_placeholders() -> None:
    """The health verdict's required configuration: the app layer's, with its own values as placeholders,
    whatever the release sets (a release's DVR_IP is a real value, not the placeholder)."""
    text = _ota_conf(_release(variables={"DVR_IP": "10.0.2.2"}))
    h = parse_config(text).health
    assert h.required_config == ("DEVICE_ID", "DVR_IP")
    assert h.config_placeholders == ("DEVICE_ID=unprovisioned", "DVR_IP=192.168.1.100")
    assert h.app_env == "/etc/vv-video-ai/.env"
    assert "DVR_IP" not in load_release(DEFAULT_CONFIG).variables, "the repository's release configures no DVR_IP"


# ---------------------------------------------------------------------------------------------------------
# keys


def _config_with(tmp_path: Path, **values: Any) -> tuple[ReleaseModel, Path]:
    cfg = tmp_path / "cfg"
    cfg.mkdir(exist_ok=True)
    path = cfg / "release.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_release(path), cfg


def _copy(src: Path, tmp_path: Path, rel: str, prefix: bytes = b"") -> str:
    """``src`` copied to ``rel`` in the configuration's directory (``tmp_path/cfg``); returns ``rel``."""
    dst = tmp_path / "cfg" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(prefix + src.read_bytes())
    return rel


def test_trusted_keys_are_installed_as_public_pem_and_revocations_listed(tmp_path: Path,
                                                                          keys: dict[str, tuple[Path, Path]]) -> None:
    # a trusted key file with text around the key: the device gets the key, re-serialised, not the file
    trusted = _copy(keys["rsa"][1], tmp_path, "keys/next.pem", b"the next release key (2027)\n")
    revoked = _copy(keys["ec2"][1], tmp_path, "keys/old.pem")
    rel, base = _config_with(tmp_path, trusted_keys=[trusted], revoked_keys=[revoked])
    signer = load_signer(keys["ec"][0])
    trust = load_trust(rel, base, signer)
    root = tmp_path / "root"
    (root / "etc/ota/keys").mkdir(parents=True)
    (root / "etc/ota/keys/stale.pem").write_text("left by a layer\n")
    install_trust(root, trust)
    installed = sorted(p.name for p in (root / "etc/ota/keys").iterdir())
    assert installed == ["release.pem", "trusted-0.pem"]
    assert (root / "etc/ota/keys/release.pem").read_bytes() == keys["ec"][1].read_bytes()
    next_pem = (root / "etc/ota/keys/trusted-0.pem").read_bytes()
    assert next_pem == keys["rsa"][1].read_bytes() and b"2027" not in next_pem
    assert b"PRIVATE" not in b"".join(p.read_bytes() for p in (root / "etc/ota/keys").iterdir())
    lines = (root / "etc/ota/keys.revoked").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1:] == [f"{load_verifier(keys['ec2'][1]).fingerprint} old.pem"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64} old\.pem", lines[1])
    # the agent's verifiers load what was installed
    assert [load_verifier(root / "etc/ota/keys" / n).fingerprint for n in installed] == \
        [load_verifier(keys["ec"][1]).fingerprint, load_verifier(keys["rsa"][1]).fingerprint]
    assert [v.fingerprint for v in trust.verifiers()] == [load_verifier(k[1]).fingerprint for k in (keys["ec"], keys["rsa"])]
    assert trust.manifest()["revoked_keys"] == [lines[1].split()[0]]


def test_no_revoked_keys_still_writes_the_list(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    rel, base = _config_with(tmp_path)
    root = tmp_path / "root"
    install_trust(root, load_trust(rel, base, load_signer(keys["ec"][0])))
    text = (root / "etc/ota/keys.revoked").read_text()
    assert [line for line in text.splitlines() if not line.startswith("#")] == [] and text.startswith("# ")


def test_private_keys_and_revoked_keys_are_refused(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signer = load_signer(keys["ec"][0])
    private = _copy(keys["rsa"][0], tmp_path, "keys/oops.pem")
    rel, base = _config_with(tmp_path, trusted_keys=[private])
    with pytest.raises(KeyFormatError) as exc:
        load_trust(rel, base, signer, config="release.yaml")
    assert str(exc.value) == (f"trusted_keys in release.yaml: {base / private}: is a private key; a device or a "
                              "verifier must only hold public keys")
    rel, base = _config_with(tmp_path, revoked_keys=[private])
    with pytest.raises(KeyFormatError, match="revoked_keys in .*oops.pem: is a private key"):
        load_trust(rel, base, signer)
    rel, base = _config_with(tmp_path, trusted_keys=["keys/missing.pem"])
    with pytest.raises(UserError, match="trusted_keys in .*: key file not found: .*missing.pem"):
        load_trust(rel, base, signer)
    # signing with a revoked key
    revoked = _copy(keys["ec"][1], tmp_path, "keys/old.pem")
    rel, base = _config_with(tmp_path, revoked_keys=[revoked])
    with pytest.raises(UserError) as exc:
        load_trust(rel, base, signer, config="release.yaml")
    assert "the release key" in str(exc.value) and "is revoked" in str(exc.value) and "old.pem" in str(exc.value)
    assert load_verifier(keys["ec"][1]).fingerprint in str(exc.value)
    load_trust(rel, base, load_signer(keys["ec2"][0]))  # another key signs: fine
    # trusted and revoked at once
    trusted = _copy(keys["ec"][1], tmp_path, "keys/same.pem")
    rel, base = _config_with(tmp_path, trusted_keys=[trusted], revoked_keys=[revoked])
    with pytest.raises(UserError, match=r"same\.pem is both trusted and revoked .*old\.pem"):
        load_trust(rel, base, load_signer(keys["ec2"][0]))


def test_an_unsigned_image_trusts_no_key(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    trusted = _copy(keys["rsa"][1], tmp_path, "keys/next.pem")
    rel, base = _config_with(tmp_path, trusted_keys=[trusted])
    trust = load_trust(rel, base, None)
    assert not trust.signed and trust.verifiers() == []
    assert any("not installed" in n for n in trust.notes)
    root = tmp_path / "root"
    install_trust(root, trust)
    assert list((root / "etc/ota/keys").iterdir()) == [] and (root / "etc/ota/keys.revoked").is_file()


# ---------------------------------------------------------------------------------------------------------
# server CA and URL


def test_server_ca_is_certificates_only(tmp_path: Path) -> None:
    ca = make_cert(tmp_path, "ca")
    assert load_server_ca(ca) == ca.read_bytes()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"# our CAs\n" + ca.read_bytes() + make_cert(tmp_path, "ca2").read_bytes())
    assert load_server_ca(bundle).count(b"BEGIN CERTIFICATE") == 2 and b"our CAs" not in load_server_ca(bundle)

    with_key = tmp_path / "with-key.pem"
    with_key.write_bytes(ca.read_bytes() + (tmp_path / "ca.key").read_bytes())
    pub = tmp_path / "pub.pem"
    pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    der = tmp_path / "ca.der"
    der.write_bytes(x509.load_pem_x509_certificate(ca.read_bytes()).public_bytes(serialization.Encoding.DER))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    for path, why in ((with_key, "holds a private key"), (tmp_path / "ca.key", "holds a private key"),
                      (pub, "holds a PEM PUBLIC KEY block"), (der, "not a PEM file of X.509 certificates"),
                      (broken, "not a valid X.509 certificate"), (tmp_path / "nope.pem", "server CA file not found")):
        with pytest.raises(UserError) as exc:
            load_server_ca(path)
        assert str(path) in str(exc.value) and why in str(exc.value), str(exc.value)


def test_server_ca_from_the_configuration_or_the_option(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    (tmp_path / "cfg").mkdir()
    make_cert(tmp_path / "cfg", "site-ca")
    other = make_cert(tmp_path, "other")
    rel, base = _config_with(tmp_path, server_ca="site-ca.pem")
    signer = load_signer(keys["ec"][0])
    assert load_trust(rel, base, signer).server_ca == (base / "site-ca.pem").read_bytes()
    assert load_trust(rel, base, signer, server_ca=other).server_ca == other.read_bytes()
    root = tmp_path / "root"
    install_trust(root, load_trust(rel, base, signer))
    assert (root / SERVER_CA.lstrip("/")).read_bytes() == (base / "site-ca.pem").read_bytes()
    rel, base = _config_with(tmp_path)
    install_trust(root, load_trust(rel, base, signer))
    assert not (root / SERVER_CA.lstrip("/")).exists()
    expired = make_cert(tmp_path, "expired", days=-1)
    assert any("expired" in n for n in load_trust(rel, base, signer, server_ca=expired).notes)


def test_server_url_rules() -> None:
    with pytest.raises(InsecureServerError) as exc:
        check_server_url("http://10.0.2.2:8080", insecure_http=False, server_ca=False, config="release.yaml")
    assert "plain http" in str(exc.value) and "insecure_http: true in release.yaml" in str(exc.value)
    assert "--" not in str(exc.value)  # the library names no command-line option
    assert "plain http allowed" in check_server_url("http://10.0.2.2:8080", insecure_http=True, server_ca=False,
                                                    config="c")[0]
    (note,) = check_server_url("https://ota.example.com", insecure_http=False, server_ca=False, config="c")
    assert "no server_ca" in note and "system's trust store" in note
    assert check_server_url("https://ota.example.com/x", insecure_http=False, server_ca=True, config="c") == []
    assert check_server_url("", insecure_http=False, server_ca=False, config="c") == []
    for bad in ("ftp://x", "ota.example.com", "https://", "https://a b"):
        with pytest.raises(UserError, match="must be an https:// URL"):
            check_server_url(bad, insecure_http=True, server_ca=False, config="c")


# ---------------------------------------------------------------------------------------------------------
# build_release refuses before it builds anything


class _Reached(Exception):
    pass


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_release must refuse before its preflight; reaching it fails the test at once (no real build)."""

    def reached() -> None:
        raise _Reached("build_release went past its checks")

    monkeypatch.setattr("image.release.preflight", reached)


def test_build_release_refuses_before_building(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                               no_build: None) -> None:
    common: dict[str, Any] = {"config": DEFAULT_CONFIG, "out": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    signer = load_signer(keys["ec"][0])
    with pytest.raises(UserError) as exc:
        build_release(**common)
    assert "no release key" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(UserError, match="choose one"):
        build_release(signer=signer, unsigned=True, **common)
    with pytest.raises(InsecureServerError, match="insecure_http: true"):
        build_release(signer=signer, server_url="http://10.0.2.2:8080", **common)
    with pytest.raises(UserError, match="holds a private key"):
        build_release(signer=signer, server_ca=keys["ec"][0], **common)
    with pytest.raises(UserError, match="options: security_version"):
        build_release(signer=signer, security_version=-1, **common)
    said: list[str] = []
    # what passes its checks reaches the build (stopped here), having said what matters
    with pytest.raises(_Reached):
        build_release(signer=signer, server_url="http://10.0.2.2:8080", insecure_http=True, progress=said.append,
                      **common)
    assert any("plain http allowed" in s for s in said)
    said.clear()
    with pytest.raises(_Reached):
        build_release(unsigned=True, server_url="https://ota.example.com", progress=said.append, **common)
    assert any("no server_ca" in s for s in said) and any(s.startswith("unsigned image") for s in said)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# the command line


def _error(p: Any) -> str:
    lines = p.stderr.strip().splitlines()
    assert lines and "Traceback" not in p.stderr, p.stderr
    return lines[-1]


def test_cli_needs_a_key_or_unsigned(tmp_path: Path, run_cli: Any, keys: dict[str, tuple[Path, Path]]) -> None:
    # a configuration that could not be built anyway (an unknown board): a check that let it through fails fast
    cfg = tmp_path / "release.yaml"
    cfg.write_text("boards: [nosuchboard]\n")
    base = ["--config", cfg, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"]
    for cmd in ("release", "image", "rootfs"):
        p = run_cli(cmd, *base)
        assert p.returncode == 2, p.stderr
        assert _error(p).startswith("error: no --key") and "--unsigned" in _error(p)
    p = run_cli("release", *base, "--key", keys["ec"][0], "--unsigned")
    assert p.returncode == 2 and "exclude each other" in _error(p)
    for extra in (("--unsigned",), ("--key", keys["ec"][0])):
        p = run_cli("release", *base, *extra)
        assert p.returncode == 2 and "unknown board 'nosuchboard'" in _error(p), p.stderr
    assert not (tmp_path / "out").exists()


def test_cli_server_checks(tmp_path: Path, run_cli: Any, keys: dict[str, tuple[Path, Path]]) -> None:
    cfg = tmp_path / "release.yaml"
    cfg.write_text("boards: [nosuchboard]\n")
    base = ["--config", cfg, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--key", keys["ec"][0]]
    p = run_cli("release", *base, "--server-url", "http://10.0.2.2:8080")
    assert p.returncode == 2
    assert "plain http" in _error(p) and "insecure_http: true in" in _error(p) and "--insecure-http" in _error(p)
    p = run_cli("release", *base, "--server-url", "http://10.0.2.2:8080", "--insecure-http")
    assert p.returncode == 2 and "unknown board" in _error(p) and "plain http allowed" in p.stderr
    p = run_cli("release", *base, "--server-url", "https://ota.example.com", "--server-ca", keys["ec"][0])
    assert p.returncode == 2 and _error(p) == (f"error: {keys['ec'][0]}: holds a private key; the server CA file goes "
                                               "onto every device and must hold only certificates")
    ca = make_cert(tmp_path, "ca")
    p = run_cli("release", *base, "--server-url", "https://ota.example.com", "--server-ca", ca)
    assert p.returncode == 2 and "unknown board" in _error(p) and "no server_ca" not in p.stderr
    p = run_cli("release", *base, "--server-url", "https://ota.example.com")
    assert p.returncode == 2 and "unknown board" in _error(p) and "no server_ca" in p.stderr
    p = run_cli("release", *base, "--security-version", "-1")
    assert p.returncode == 2 and "--security-version" in p.stderr
    # a CA path in the configuration is relative to it
    cfg.write_text("boards: [nosuchboard]\nserver_ca: nope.pem\n")
    p = run_cli("release", *base)
    assert p.returncode == 2 and _error(p) == f"error: server CA file not found: {tmp_path / 'nope.pem'}"
