"""The stock Mender client 3.4 (Debian bookworm ``mender-client``, unmodified) against our update server.

Both real: ``python build.py server`` as a subprocess serving HTTPS (``--tls-cert/--tls-key``, a certificate
from the run's CA made with ``ota_common.tls``) and ``mender daemon`` in a private mount namespace (see
tests/mender_client.py) trusting that CA (``ServerCertificate``). The client talks through a recording proxy that
terminates its TLS with the same server certificate and talks TLS on to the server, so a failure shows what went
over the wire; one test connects the client to the server directly. Module-image artifacts are made and signed
with our own CLI; the client verifies the signature (``ArtifactVerifyKey``). Two onboarding paths: a
client-generated RSA 3072 key accepted from pending, and a preauthorized ECDSA P-256 key.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devkit.client import MGMT
from devkit.server import OtaServer
from ota_common.tls import make_ca, make_server_cert

from .mender_client import (
    HttpExchange,
    MenderClient,
    MenderUnavailable,
    RecordingProxy,
    find_client_deb,
    needs_root,
    probe_namespace,
    unpack_client,
    wait_for,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEVICE_TYPE = "test-device"
DEPLOY_TIMEOUT = 60.0


def build_py(*args: str | Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, f"build.py {args}: {proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def mender_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = needs_root()
    if reason:
        pytest.skip(reason)
    try:
        probe_namespace(tmp_path_factory.mktemp("ns-probe"))
        return unpack_client(find_client_deb(), tmp_path_factory.mktemp("mender-client-deb"))
    except MenderUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def release_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("release-key") / "k"
    build_py("keys", "generate", "--out", out)
    return out / "private.pem", out / "public.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's CA and the server's certificate for 127.0.0.1 (an IP address SubjectAltName)."""
    base = tmp_path_factory.mktemp("pki")
    ca, ca_key = make_ca(base / "ca")
    cert, key = make_server_cert(ca, ca_key, base / "server", ["127.0.0.1"])
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, release_keys: tuple[Path, Path],
           pki: dict[str, Path]) -> Iterator[OtaServer]:
    srv = OtaServer(tmp_path_factory.mktemp("server"), release_keys[1], tls=(pki["cert"], pki["key"]),
                    ca_file=pki["ca"])
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def proxy(server: OtaServer, pki: dict[str, Path]) -> Iterator[RecordingProxy]:
    listen = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    listen.load_cert_chain(pki["cert"], pki["key"])
    p = RecordingProxy(server.port, tls=(listen, ssl.create_default_context(cafile=str(pki["ca"]))))
    yield p
    p.close()


@pytest.fixture
def make_client(tmp_path: Path, mender_binary: Path, proxy: RecordingProxy, release_keys: tuple[Path, Path],
                pki: dict[str, Path]) -> Iterator[Callable[[str], MenderClient]]:
    clients: list[MenderClient] = []

    def make(mac: str) -> MenderClient:
        client = MenderClient(mender_binary, tmp_path / f"client-{len(clients)}", f"https://127.0.0.1:{proxy.port}",
                              mac=mac, device_type=DEVICE_TYPE, verify_key=release_keys[1],
                              server_certificate=pki["ca"])
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.stop()


def module_artifact(tmp_path: Path, key: Path, module: str, name: str, content: str) -> tuple[Path, Path]:
    payload = tmp_path / f"{name}.txt"
    payload.write_text(content)
    out = tmp_path / f"{name}.mender"
    build_py("artifact", "write", "module-image", "-T", module, "-f", payload, "-n", name, "-t", DEVICE_TYPE,
             "-k", key, "-o", out)
    return out, payload


def diagnostics(server: OtaServer, proxy: RecordingProxy, client: MenderClient) -> Callable[[], str]:
    def dump() -> str:
        return (f"--- client ({'running' if client.alive() else 'exited'}) log tail ---\n{client.log_tail()}\n"
                f"--- server log tail ---\n{server.log_tail()}\n"
                f"--- wire (client -> server) ---\n{proxy.transcript()}")
    return dump


def devices_with_mac(server: OtaServer, mac: str) -> list[dict[str, Any]]:
    resp = server.get(f"{MGMT}/v2/devauth/devices")
    assert resp.status == 200, resp
    devices = resp.json()
    assert isinstance(devices, list), f"device list must be a plain JSON array: {resp}"
    return [d for d in devices if d.get("identity_data", {}).get("mac") == mac]


def inventory_attributes(server: OtaServer, device_id: str) -> dict[str, Any]:
    resp = server.get(f"{MGMT}/v1/inventory/devices")
    assert resp.status == 200, resp
    for dev in resp.json():
        if dev.get("id") == device_id:
            attrs = dev.get("attributes", {})
            if isinstance(attrs, list):  # Mender's shape: [{"name", "value", "scope"}]
                return {a["name"]: a["value"] for a in attrs}
            return dict(attrs)
    return {}


def deploy(server: OtaServer, artifact_name: str, device_id: str, name: str) -> str:
    resp = server.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                            {"name": name, "artifact_name": artifact_name, "devices": [device_id]})
    assert resp.status == 201, resp
    location = resp.headers.get("location", "")
    assert location, f"201 without Location: {resp}"
    return location.rstrip("/").rsplit("/", 1)[-1]


def statistics(server: OtaServer, deployment_id: str) -> dict[str, int]:
    resp = server.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/statistics")
    assert resp.status == 200, resp
    stats: dict[str, int] = resp.json()
    return stats


def reported_statuses(proxy: RecordingProxy, deployment_id: str) -> list[tuple[str, int | None]]:
    """(status, HTTP answer) of every status report the client sent for the deployment, in order."""
    out = []
    for e in proxy.exchanges():
        if e.method == "PUT" and e.path.endswith(f"/deployments/{deployment_id}/status"):
            out.append((json.loads(e.request_body)["status"], e.status))
    return out


def collapse(seq: list[str]) -> list[str]:
    """Drop immediate repeats (the client re-sends a status when it retries a state)."""
    return [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]


def device_exchanges(proxy: RecordingProxy) -> list[HttpExchange]:
    return [e for e in proxy.exchanges() if e.path.startswith("/api/devices/")]


def test_generated_key_accepted_from_pending_then_successful_deployment(
    tmp_path: Path, server: OtaServer, proxy: RecordingProxy, make_client: Callable[[str], MenderClient],
    release_keys: tuple[Path, Path],
) -> None:
    mac = "02:00:00:00:00:0a"
    client = make_client(mac)
    client.add_module("vv-ok")
    client.start()
    dump = diagnostics(server, proxy, client)

    # the client generates an RSA 3072 key and keeps asking; the device shows up pending
    def pending() -> dict[str, Any] | None:
        found = devices_with_mac(server, mac)
        return found[0] if found and found[0]["status"] == "pending" else None

    device = wait_for(pending, 30, "the client's auth request to create a pending device", dump)
    assert isinstance(device, dict)
    key = (client.root / "data" / "mender-agent.pem").read_text()
    assert key.startswith("-----BEGIN RSA PRIVATE KEY-----"), "mender 3.4 generates an RSA key (PKCS#1 PEM)"
    auth_sets = device["auth_sets"]
    assert len(auth_sets) == 1, device
    resp = server.send_json("PUT", f"{MGMT}/v2/devauth/devices/{device['id']}/auth/{auth_sets[0]['id']}/status",
                            {"status": "accepted"})
    assert resp.status in (200, 204), resp

    # once accepted the client gets a token and sends its inventory
    wait_for(lambda: inventory_attributes(server, device["id"]).get("artifact_name") == "initial",
             30, "the inventory of the accepted client", dump)
    attrs = inventory_attributes(server, device["id"])
    assert attrs["device_type"] == DEVICE_TYPE and attrs["vv_test_client"] == "mender-3.4", attrs
    assert attrs["mender_client_version"].startswith("3.4"), attrs

    artifact, payload = module_artifact(tmp_path, release_keys[0], "vv-ok", "app-ok-1", "installed by mender\n")
    resp = server.upload_artifact(artifact)
    assert resp.status == 201, resp
    deployment_id = deploy(server, "app-ok-1", device["id"], "mender-client success")

    wait_for(lambda: statistics(server, deployment_id).get("success") == 1, DEPLOY_TIMEOUT,
             "statistics success: 1", lambda: f"statistics: {statistics(server, deployment_id)}\n{dump()}")

    stats = statistics(server, deployment_id)
    assert stats["failure"] == 0 and stats["pending"] == 0, stats
    # the module really ran, in protocol order, and installed the payload
    states = client.module_states("vv-ok")
    assert [s for s in states if s in ("Download", "ArtifactInstall", "ArtifactCommit", "Cleanup")] == \
        ["Download", "ArtifactInstall", "ArtifactCommit", "Cleanup"], states
    assert "ArtifactFailure" not in states and "ArtifactRollback" not in states, states
    assert (client.installed_dir / payload.name).read_text() == payload.read_text()
    # the client checked our release signature (ArtifactVerifyKey = the server's release key)
    assert "authenticated digital signature of artifact" in client.log_path.read_text()

    # what the client reported, and that the server took every report (204)
    reports = reported_statuses(proxy, deployment_id)
    assert collapse([s for s, _ in reports]) == ["downloading", "installing", "success"], reports
    assert all(code == 204 for _, code in reports), reports

    resp = server.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/devices")
    assert resp.status == 200, resp
    assert [(d["id"], d["status"]) for d in resp.json()] == [(device["id"], "success")], resp

    # the next inventory carries the new artifact name
    wait_for(lambda: inventory_attributes(server, device["id"]).get("artifact_name") == "app-ok-1", 30,
             "artifact_name app-ok-1 in the inventory", dump)
    # the download link the client got (and used) is https, through the address it talks to
    uris = [json.loads(e.response_body)["artifact"]["source"]["uri"] for e in device_exchanges(proxy)
            if e.path.endswith("/deployments/device/deployments/next") and e.status == 200]
    assert uris and all(u.startswith(f"https://127.0.0.1:{proxy.port}/api/devices/v1/download/") for u in uris), uris
    downloads = [e for e in device_exchanges(proxy) if e.path.startswith("/api/devices/v1/download/")]
    assert downloads and downloads[-1].status == 200, [e.summary() for e in downloads]
    # the device API answered everything the client asked without a server error
    errors = [e.summary() for e in device_exchanges(proxy) if e.status is None or e.status >= 500]
    assert not errors, "\n".join(errors)


def test_preauthorized_ecdsa_key_then_failing_deployment_with_log(
    tmp_path: Path, server: OtaServer, proxy: RecordingProxy, make_client: Callable[[str], MenderClient],
    release_keys: tuple[Path, Path],
) -> None:
    mac = "02:00:00:00:00:0b"
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    resp = server.send_json("POST", f"{MGMT}/v2/devauth/devices", {"identity_data": {"mac": mac}, "pubkey": public_pem})
    assert resp.status == 201, resp

    client = make_client(mac)
    client.set_device_key(private_pem)
    message = "vv-fail: refusing to install: disk on fire"
    client.add_module("vv-fail", fail_with=message)
    client.start()
    dump = diagnostics(server, proxy, client)

    # preauthorized: the first signed auth request (ECDSA, DER signature) is answered with a token
    def accepted() -> dict[str, Any] | None:
        found = devices_with_mac(server, mac)
        return found[0] if len(found) == 1 and found[0]["status"] == "accepted" else None

    device = wait_for(accepted, 30, "the preauthorized device to be accepted", dump)
    assert isinstance(device, dict)
    wait_for(lambda: inventory_attributes(server, device["id"]).get("device_type") == DEVICE_TYPE, 30,
             "the inventory of the preauthorized client", dump)

    artifact, _ = module_artifact(tmp_path, release_keys[0], "vv-fail", "app-bad-1", "never installed\n")
    resp = server.upload_artifact(artifact)
    assert resp.status == 201, resp
    deployment_id = deploy(server, "app-bad-1", device["id"], "mender-client failure")

    wait_for(lambda: statistics(server, deployment_id).get("failure") == 1, DEPLOY_TIMEOUT,
             "statistics failure: 1", lambda: f"statistics: {statistics(server, deployment_id)}\n{dump()}")
    stats = statistics(server, deployment_id)
    assert stats["success"] == 0, stats

    states = client.module_states("vv-fail")
    steps = ("Download", "ArtifactInstall", "ArtifactRollback", "ArtifactFailure", "Cleanup")
    assert [s for s in states if s in steps] == list(steps), states
    assert "ArtifactCommit" not in states, states
    assert not list(client.installed_dir.iterdir())

    reports = reported_statuses(proxy, deployment_id)
    assert collapse([s for s, _ in reports]) == ["downloading", "installing", "failure"], reports
    assert all(code == 204 for _, code in reports), reports
    # mender 3.4 reports "failure" first and uploads the deployment log right after
    def log_puts() -> list[HttpExchange]:
        return [e for e in proxy.exchanges() if e.method == "PUT" and e.path.endswith(f"/{deployment_id}/log")]

    wait_for(lambda: [e for e in log_puts() if e.status is not None], 30, "the client's log upload answered", dump)
    assert all(e.status == 204 for e in log_puts()), [e.summary() for e in log_puts()]

    resp = server.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/devices/{device['id']}/log")
    assert resp.status == 200, resp
    assert message.encode() in resp.body, resp

    resp = server.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/devices")
    assert resp.status == 200, resp
    assert [(d["id"], d["status"]) for d in resp.json()] == [(device["id"], "failure")], resp
    # rolled back: the inventory sent after the failure still names the old artifact
    def inventory_after_failure() -> bool:
        exchanges = device_exchanges(proxy)
        failed = [i for i, e in enumerate(exchanges) if e.path.endswith(f"/{deployment_id}/status")
                  and json.loads(e.request_body)["status"] == "failure"]
        return bool(failed) and any(e.path.endswith("/inventory/device/attributes") and e.status == 200
                                    for e in exchanges[failed[0] + 1:])

    wait_for(inventory_after_failure, 30, "an inventory report after the failure", dump)
    attrs = inventory_attributes(server, device["id"])
    assert attrs.get("artifact_name") == "initial", attrs


def test_client_talks_https_to_the_server_itself_and_checks_the_certificate(
    tmp_path: Path, server: OtaServer, mender_binary: Path, release_keys: tuple[Path, Path], pki: dict[str, Path]
) -> None:
    """No proxy: mender 3.4's TLS (OpenSSL) against uvicorn's. With the run's CA it gets through (the device
    shows up pending); without it, the certificate is refused and the server never hears of the device."""
    trusting = MenderClient(mender_binary, tmp_path / "trusting", server.url, mac="02:00:00:00:00:0c",
                            device_type=DEVICE_TYPE, verify_key=release_keys[1], server_certificate=pki["ca"])
    distrusting = MenderClient(mender_binary, tmp_path / "distrusting", server.url, mac="02:00:00:00:00:0d",
                               device_type=DEVICE_TYPE, verify_key=release_keys[1])
    try:
        for client in (trusting, distrusting):
            client.start()

        def dump() -> str:
            return (f"--- trusting client ---\n{trusting.log_tail()}\n--- distrusting client ---\n"
                    f"{distrusting.log_tail()}\n--- server ---\n{server.log_tail()}")

        wait_for(lambda: [d for d in devices_with_mac(server, "02:00:00:00:00:0c") if d["status"] == "pending"], 30,
                 "the client trusting the CA to show up pending", dump)
        wait_for(lambda: "certificate signed by unknown authority" in distrusting.log_path.read_text(), 30,
                 "the client without the CA to refuse the server's certificate", dump)
        assert devices_with_mac(server, "02:00:00:00:00:0d") == []
    finally:
        for client in (trusting, distrusting):
            client.stop()


def _blocked(request_line: bytes) -> tuple[bytes, bytes]:
    """A rewrite making the server answer 404 to this request line (same length: ``/next`` → ``/nexx``)."""
    return request_line, request_line.replace(b"/next ", b"/nexx ")


V2_NEXT = b"POST /api/devices/v2/deployments/device/deployments/next "
V1_POST_NEXT = b"POST /api/devices/v1/deployments/device/deployments/next "


def test_next_fallbacks_v1_post_with_flat_provides_then_v1_get(
    tmp_path: Path, server: OtaServer, proxy: RecordingProxy, make_client: Callable[[str], MenderClient],
    release_keys: tuple[Path, Path],
) -> None:
    """mender-client 3.4 asks ``next`` as v2 POST, on a 404 as v1 POST with the flat provides map as the body,
    on a 404 as v1 GET. The proxy makes the server answer 404 to v2 (then to v1 POST too): the client installs
    through each fallback. The v1 POST used to be refused with 400 ("device_provides: Field required")."""
    mac = "02:00:00:00:00:0e"
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    resp = server.send_json("POST", f"{MGMT}/v2/devauth/devices", {"identity_data": {"mac": mac}, "pubkey": public_pem})
    assert resp.status == 201, resp
    client = make_client(mac)
    client.set_device_key(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))
    client.add_module("vv-ok")
    dump = diagnostics(server, proxy, client)

    def next_asked(method: str, path_prefix: str, status: int) -> list[HttpExchange]:
        return [e for e in device_exchanges(proxy) if e.method == method and e.path.startswith(path_prefix)
                and e.status == status]

    proxy.rewrites = [_blocked(V2_NEXT)]
    try:
        client.start()
        found = wait_for(lambda: [d for d in devices_with_mac(server, mac) if d["status"] == "accepted"], 30,
                         "the preauthorized device to be accepted", dump)
        device_id = found[0]["id"]
        wait_for(lambda: inventory_attributes(server, device_id).get("device_type") == DEVICE_TYPE, 30,
                 "the inventory of the client", dump)
        for name, form, rewrites in (("app-v1-post-1", "POST", [_blocked(V2_NEXT)]),
                                     ("app-v1-get-1", "GET", [_blocked(V2_NEXT), _blocked(V1_POST_NEXT)])):
            proxy.rewrites = rewrites
            artifact, payload = module_artifact(tmp_path, release_keys[0], "vv-ok", name, f"{name}\n")
            assert server.upload_artifact(artifact).status == 201
            deployment_id = deploy(server, name, device_id, f"fallback to v1 {form}")
            wait_for(lambda d=deployment_id: statistics(server, d).get("success") == 1, DEPLOY_TIMEOUT,
                     f"success through v1 {form}", dump)
            assert (client.installed_dir / payload.name).read_text() == f"{name}\n"
            v1 = "/api/devices/v1/deployments/device/deployments/next"
            got = [e for e in next_asked(form, v1, 200) if json.loads(e.response_body)["id"] == deployment_id]
            assert got, dump()
            if form == "POST":  # the body is the flat provides map
                body = json.loads(got[0].request_body)
                assert "device_provides" not in body and body["device_type"] == DEVICE_TYPE, body
                assert isinstance(body["artifact_name"], str) and body["artifact_name"], body
            else:
                assert "artifact_name=" in got[0].path and "device_type=" in got[0].path, got[0].path
            assert next_asked("POST", "/api/devices/v2/deployments/device/deployments/nexx", 404), dump()
    finally:
        proxy.rewrites = []
    errors = [e.summary() for e in device_exchanges(proxy) if e.status is None or e.status >= 500]
    assert not errors, "\n".join(errors)
