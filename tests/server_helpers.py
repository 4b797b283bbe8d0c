"""Helpers for the update-server tests: the real server as a subprocess (:mod:`devkit.server`) with httpx
clients, simulated devices that sign their auth requests like the Mender client, artifacts made with
``build.py artifact write``."""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from devkit.server import OtaServer

from .conftest import make_payload

ADMIN_TOKEN = "test-admin-token-0123456789-abcdefghij"  # the bootstrap token: at least 32 characters


class Server(OtaServer):
    """:class:`devkit.server.OtaServer` with the tests' admin token, one worker unless told, the server options
    in ``args`` (release keys among them), and httpx clients; with ``tls=(certificate, key)`` it serves HTTPS
    and the clients made here trust ``ca_file``."""

    def __init__(self, base: Path, *args: str, env: dict[str, str] | None = None, workers: int = 1,
                 db_url: str | None = None, tls: tuple[Path, Path] | None = None,
                 ca_file: Path | None = None) -> None:
        super().__init__(base, None, *args, db_url=db_url, workers=workers, tls=tls, ca_file=ca_file,
                         admin_token=ADMIN_TOKEN, env=env)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What the clients verify the server with: the run's CA (TLS) or nothing to verify (HTTP)."""
        return self.context if self.context is not None else True

    @verify.setter
    def verify(self, context: ssl.SSLContext) -> None:
        self.context = context

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30,
                            verify=self.verify)

    def client(self) -> httpx.Client:
        """A device's client. Its idle connections expire before the server's keep-alive timeout (5 s), so a
        device that waited longer opens a new connection instead of reusing one the server is closing at that
        moment (that race resets the request; a real client would retry it)."""
        return httpx.Client(base_url=self.url, timeout=30, verify=self.verify,
                            limits=httpx.Limits(keepalive_expiry=2))

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Read the server's database directly (SQLite file or PostgreSQL)."""
        import sqlalchemy as sa

        from ota_server.db import normalize_url

        engine = sa.create_engine(normalize_url(self.db_url))
        try:
            with engine.connect() as c:
                return [tuple(r) for r in c.execute(sa.text(sql), params)]
        finally:
            engine.dispose()

    def stored_bytes(self) -> bytes:
        """Everything the database holds on disk (SQLite: the file and its WAL), or the text of every
        configuration row (PostgreSQL), to check that a plaintext is not there."""
        if self.db_url.startswith("sqlite"):
            wal = self.db_path.with_name(self.db_path.name + "-wal")
            return self.db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
        return repr(self.query("SELECT * FROM config_values")).encode()

    def secrets(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.storage / "server-secrets.json").read_text())
        return doc


@pytest.fixture(scope="module", name="server")
def server_fixture(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    """One server per test module, trusting the ``ec`` and ``rsa`` release keys."""
    s = Server(tmp_path_factory.mktemp("server"), "--release-key", str(keys["ec"][1]),
               "--release-key", str(keys["rsa"][1])).start()
    yield s
    s.stop()


class Device:
    """A device that authenticates like the Mender client: the body signed with its key."""

    def __init__(self, server: Server, kind: str = "ec", identity: dict[str, Any] | None = None) -> None:
        self.server = server
        self.kind = kind
        self.identity = identity or {"mac": f"02:00:{uuid.uuid4().hex[:8]}", "hostname": f"dev-{uuid.uuid4().hex[:6]}"}
        if kind == "rsa":
            self.key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ec":
            self.key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "ec384":
            self.key = ec.generate_private_key(ec.SECP384R1())
        else:
            self.key = ed25519.Ed25519PrivateKey.generate()
        self.pubkey = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.token: str | None = None
        self.http = server.client()

    def sign(self, body: bytes) -> str:
        if self.kind == "rsa":
            sig = self.key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        elif self.kind.startswith("ec"):
            sig = self.key.sign(body, ec.ECDSA(hashes.SHA256()))
        else:
            sig = self.key.sign(body)
        return base64.b64encode(sig).decode()

    def auth_body(self) -> bytes:
        return json.dumps({"id_data": json.dumps(self.identity), "pubkey": self.pubkey,
                           "tenant_token": "whatever"}).encode()

    def auth(self) -> httpx.Response:
        body = self.auth_body()
        r = self.http.post("/api/devices/v1/authentication/auth_requests", content=body,
                           headers={"Content-Type": "application/json", "X-MEN-Signature": self.sign(body)})
        if r.status_code == 200:
            self.token = r.text
        return r

    @property
    def headers(self) -> dict[str, str]:
        assert self.token, "device has no token"
        return {"Authorization": f"Bearer {self.token}"}

    def id(self) -> str:
        with self.server.admin() as a:
            for d in a.get("/api/management/v2/devauth/devices").json():
                if d["identity_data"] == self.identity:
                    return str(d["id"])
        raise AssertionError("device not known to the server")

    def accept(self) -> str:
        """Authenticate (→ pending), accept the auth set as an admin, authenticate again. Returns the device id."""
        assert self.auth().status_code == 401
        device_id = self.id()
        with self.server.admin() as a:
            d = a.get(f"/api/management/v2/devauth/devices/{device_id}").json()
            aid = d["auth_sets"][0]["id"]
            r = a.put(f"/api/management/v2/devauth/devices/{device_id}/auth/{aid}/status", json={"status": "accepted"})
            assert r.status_code == 204, r.text
        assert self.auth().status_code == 200
        return device_id

    def next(self, artifact_name: str = "old", device_type: str = "qemu-virt", **extra: Any) -> httpx.Response:
        return self.http.post("/api/devices/v2/deployments/device/deployments/next", headers=self.headers,
                              json={"device_provides": {"device_type": device_type, "artifact_name": artifact_name,
                                                        **extra}, "update_control_map": False})

    def status(self, deployment_id: str, status: str, substate: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"status": status}
        if substate is not None:
            body["substate"] = substate
        return self.http.put(f"/api/devices/v1/deployments/device/deployments/{deployment_id}/status",
                             headers=self.headers, json=body)


def write_artifact(run_cli: Any, out: Path, name: str, device_types: tuple[str, ...] = ("qemu-virt",),
                   key: Path | None = None, size: int = 50_000, seed: int = 1) -> Path:
    """A module-image artifact built with ``build.py artifact write``."""
    payload = make_payload(out.parent / f"{out.stem}.bin", size, seed=seed)
    args: list[str | Path] = ["artifact", "write", "module-image", "--type", "vv-app", "--file", payload,
                              "--name", name, "-o", out]
    for t in device_types:
        args += ["-t", t]
    if key is not None:
        args += ["--key", key]
    run_cli(*args, check=True)
    return out


def upload(server: Server, path: Path, description: str = "") -> httpx.Response:
    with server.admin() as a, open(path, "rb") as f:
        return a.post("/api/management/v1/deployments/artifacts", files={"artifact": (path.name, f)},
                      data={"description": description} if description else None)


def deploy(server: Server, **body: Any) -> str:
    with server.admin() as a:
        r = a.post("/api/management/v1/deployments/deployments", json=body)
    assert r.status_code == 201, r.text
    return r.headers["Location"].rsplit("/", 1)[1]


def preauthorized_devices(server: Server, n: int) -> list[tuple[Device, str]]:
    """``n`` devices preauthorized through the management API and authenticated (token in hand), with their ids."""
    from concurrent.futures import ThreadPoolExecutor

    out = []
    with server.admin() as a:
        for _ in range(n):
            dev = Device(server)
            r = a.post("/api/management/v2/devauth/devices", json={"identity_data": dev.identity, "pubkey": dev.pubkey})
            assert r.status_code == 201, r.text
            out.append((dev, r.headers["Location"].rsplit("/", 1)[1]))
    with ThreadPoolExecutor(16) as pool:
        assert all(code == 200 for code in pool.map(lambda d: d[0].auth().status_code, out))
    return out
