"""The update server over HTTPS (``build.py server --tls-cert/--tls-key``), the TLS library
(``ota_common.tls``) and ``build.py keys tls-ca/tls-server``: real uvicorn on 127.0.0.1, real clients."""

from __future__ import annotations

import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from ota_common.errors import UserError
from ota_common.tls import check_server_tls, make_ca, make_server_cert

from .server_helpers import Device, Server, deploy, upload, write_artifact
from .test_server_cli import one_error, run

NEXT = "/api/devices/v2/deployments/device/deployments/next"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's CA and server certificates: good (127.0.0.1, localhost), wrong name, expired, not yet valid."""
    base = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(base / "ca")
    out = {"ca": ca, "ca_key": ca_key}
    now = datetime.now(UTC)
    for name, names, kwargs in (
        ("good", ["127.0.0.1", "localhost"], {}),
        ("wrong_name", ["ota.example.com", "10.1.2.3"], {}),
        ("expired", ["127.0.0.1"], {"days": 1, "not_before": now - timedelta(days=3)}),
        ("future", ["127.0.0.1"], {"not_before": now + timedelta(days=2)}),
    ):
        out[name], out[f"{name}_key"] = make_server_cert(ca, ca_key, base / name, names, **kwargs)
    return out


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]],
               pki: dict[str, Path]) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("tls-server"), "--release-key", str(keys["ec"][1]),
               tls=(pki["good"], pki["good_key"]), ca_file=pki["ca"]).start()
    yield s
    s.stop()


def next_body(artifact_name: str = "old") -> dict[str, Any]:
    return {"device_provides": {"device_type": "qemu-virt", "artifact_name": artifact_name},
            "update_control_map": False}


def test_device_over_https_gets_https_download_link(tls_server: Server, keys: dict[str, tuple[Path, Path]],
                                                    run_cli: Callable[..., Any], tmp_path: Path) -> None:
    assert tls_server.url.startswith("https://127.0.0.1:")
    dev = Device(tls_server)
    dev_id = dev.accept()  # signed auth request over HTTPS: 401 pending, accepted, then a token
    assert dev.next().status_code == 204

    art = write_artifact(run_cli, tmp_path / "a.mender", "tls-app-1", key=keys["ec"][0])
    assert upload(tls_server, art).status_code == 201
    dep_id = deploy(tls_server, name="over tls", artifact_name="tls-app-1", devices=[dev_id])
    r = dev.next()
    assert r.status_code == 200, r.text
    assert r.json()["id"] == dep_id
    uri = r.json()["artifact"]["source"]["uri"]
    assert uri.startswith(f"https://127.0.0.1:{tls_server.port}/api/devices/v1/download/"), uri
    # the signed link works without Authorization, over the same TLS
    with httpx.Client(verify=tls_server.verify, timeout=30) as c:
        got = c.get(uri)
    assert got.status_code == 200 and got.content == art.read_bytes()
    assert int(got.headers["content-length"]) == art.stat().st_size
    # the DNS name in the certificate works too
    with httpx.Client(verify=tls_server.verify, timeout=30) as c:
        assert c.get(f"https://localhost:{tls_server.port}/health").status_code == 200


def test_client_without_the_ca_is_refused(tls_server: Server) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls_server.url + "/health", timeout=10)  # the system's CAs only


def test_plain_http_to_the_tls_port_gets_no_http_answer(tls_server: Server) -> None:
    start = time.monotonic()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=10)
    assert time.monotonic() - start < 9, "the server must drop the connection, not leave it hanging"


def test_certificate_without_the_address_fails_hostname_verification(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], pki: dict[str, Path]
) -> None:
    s = Server(tmp_path, "--release-key", str(keys["ec"][1]), tls=(pki["wrong_name"], pki["wrong_name_key"]),
               ca_file=pki["ca"])
    lenient = ssl.create_default_context(cafile=str(pki["ca"]))
    lenient.check_hostname = False  # still checks the chain: only the name is wrong
    s.verify = lenient
    s.start()
    try:
        assert httpx.get(s.url + "/health", verify=lenient, timeout=10).status_code == 200
        strict = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises(httpx.ConnectError, match="IP address mismatch"):
            httpx.get(s.url + "/health", verify=strict, timeout=10)
    finally:
        assert s.stop() == 0


def test_sigterm_with_idle_tls_clients_stops_promptly(tmp_path: Path, pki: dict[str, Path]) -> None:
    """Idle keep-alive TLS connections (as devices keep them) do not hold the stop for uvicorn's 10 s."""
    s = Server(tmp_path, "--allow-unsigned", tls=(pki["good"], pki["good_key"]), ca_file=pki["ca"], workers=2).start()
    clients = [s.client() for _ in range(3)]
    try:
        for c in clients:
            assert c.get("/health").status_code == 200
        start = time.monotonic()
        assert s.stop() == 0
        assert time.monotonic() - start < 5, s.log_path.read_text()
        assert "timeout graceful shutdown exceeded" not in s.log_path.read_text()
    finally:
        for c in clients:
            c.close()
        s.stop()


def test_forwarded_proto_from_a_trusted_proxy(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                              run_cli: Callable[..., Any]) -> None:
    """Plain HTTP behind a TLS-terminating proxy: X-Forwarded-Proto from 127.0.0.1 (trusted by default) makes
    https links; a server told to trust another address ignores the header."""
    art = write_artifact(run_cli, tmp_path / "a.mender", "proxied-1", key=keys["ec"][0])
    for trusted, scheme in ((None, "https"), ("10.9.8.7", "http")):
        extra = ("--forwarded-allow-ips", trusted) if trusted else ()
        s = Server(tmp_path / scheme, "--release-key", str(keys["ec"][1]), *extra).start()
        try:
            assert upload(s, art).status_code == 201
            dev = Device(s)
            dep = deploy(s, name="p", artifact_name="proxied-1", devices=[dev.accept()])
            r = dev.http.post(NEXT, json=next_body(), headers={**dev.headers, "X-Forwarded-Proto": "https"})
            assert r.status_code == 200 and r.json()["id"] == dep, r.text
            assert r.json()["artifact"]["source"]["uri"].startswith(f"{scheme}://127.0.0.1:{s.port}/"), r.text
        finally:
            assert s.stop() == 0


@pytest.mark.parametrize("case, expected", [
    ("mismatch", "does not match"),
    ("expired", "expired"),
    ("future", "not valid before"),
    ("cert_only", "--tls-cert and --tls-key"),
    ("key_only", "--tls-cert and --tls-key"),
    ("missing", "not found"),
    ("not_pem", "is not a PEM certificate"),
    ("cert_as_key", "is not a private key"),
])
def test_bad_tls_options_exit_2(tmp_path: Path, pki: dict[str, Path], case: str, expected: str) -> None:
    (tmp_path / "junk.pem").write_text("junk\n")
    tls = {
        "mismatch": ["--tls-cert", pki["good"], "--tls-key", pki["expired_key"]],
        "expired": ["--tls-cert", pki["expired"], "--tls-key", pki["expired_key"]],
        "future": ["--tls-cert", pki["future"], "--tls-key", pki["future_key"]],
        "cert_only": ["--tls-cert", pki["good"]],
        "key_only": ["--tls-key", pki["good_key"]],
        "missing": ["--tls-cert", tmp_path / "nope.pem", "--tls-key", pki["good_key"]],
        "not_pem": ["--tls-cert", tmp_path / "junk.pem", "--tls-key", pki["good_key"]],
        "cert_as_key": ["--tls-cert", pki["good"], "--tls-key", pki["good"]],
    }[case]
    p = run("server", "--storage", tmp_path / "s", "--db", f"sqlite:///{tmp_path}/db.sqlite", *tls,
            env={"OTA_ADMIN_TOKEN": "t"}, timeout=30)
    assert p.returncode == 2, p.stderr
    assert expected in one_error(p), p.stderr
    assert not (tmp_path / "s").exists(), "refused before anything was created"


def test_bad_forwarded_allow_ips(tmp_path: Path) -> None:
    p = run("server", "--storage", tmp_path / "s", "--db", f"sqlite:///{tmp_path}/db.sqlite",
            "--forwarded-allow-ips", "127.0.0.1,proxy.lan", env={"OTA_ADMIN_TOKEN": "t"}, timeout=30)
    assert p.returncode == 2 and "proxy.lan" in one_error(p), p.stderr


def test_keys_tls_ca_and_server_cli(tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    ca_dir, srv_dir = tmp_path / "ca", tmp_path / "srv"
    run_cli("keys", "tls-ca", "--out", ca_dir, "--name", "Lab CA", check=True)
    run_cli("keys", "tls-server", "--ca-dir", ca_dir, "--name", "127.0.0.1", "--name", "ota.lab", "--name", "::1",
            "--out", srv_dir, check=True)
    for key in (ca_dir / "ca.key", srv_dir / "server.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    p = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", ca_dir / "ca.pem",
                        srv_dir / "server.pem"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith(": OK"), p.stdout + p.stderr
    check_server_tls(srv_dir / "server.pem", srv_dir / "server.key")

    certs = x509.load_pem_x509_certificates((srv_dir / "server.pem").read_bytes())
    assert len(certs) == 1, "server.pem is the leaf certificate only"
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["ota.lab"]
    assert certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert ca.subject.rfc4514_string() == "CN=Lab CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    # a server certificate posing as a CA
    fake_ca = tmp_path / "fake-ca"
    fake_ca.mkdir()
    (fake_ca / "ca.pem").write_bytes((srv_dir / "server.pem").read_bytes())
    (fake_ca / "ca.key").write_bytes((srv_dir / "server.key").read_bytes())
    # never overwritten; bad names and a missing CA are user errors (exit 2, one line)
    for args, expected in (
        (("tls-ca", "--out", ca_dir), "already exists"),
        (("tls-server", "--ca-dir", ca_dir, "--name", "127.0.0.1", "--out", srv_dir), "already exists"),
        (("tls-server", "--ca-dir", ca_dir, "--name", "not a name", "--out", tmp_path / "x"), "neither an IP"),
        (("tls-server", "--ca-dir", tmp_path / "none", "--name", "h", "--out", tmp_path / "y"), "not found"),
        (("tls-server", "--ca-dir", fake_ca, "--name", "h", "--out", tmp_path / "z"), "not a CA"),
    ):
        p = run_cli("keys", *args)
        assert p.returncode == 2 and expected in one_error(p), p.stderr


def test_check_server_tls_messages(tmp_path: Path, pki: dict[str, Path]) -> None:
    check_server_tls(pki["good"], pki["good_key"])
    with pytest.raises(UserError, match="does not match"):
        check_server_tls(pki["good"], pki["ca_key"])
    with pytest.raises(UserError, match="expired"):
        check_server_tls(pki["expired"], pki["expired_key"])
    (tmp_path / "pub.pem").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(UserError, match="not a private key"):
        check_server_tls(pki["good"], tmp_path / "pub.pem")
    (tmp_path / "unreadable").mkdir()
    with pytest.raises(UserError, match="cannot read"):
        check_server_tls(tmp_path / "unreadable", pki["good_key"])
