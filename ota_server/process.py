"""The real update server as a subprocess (``python build.py server``) and a small management API client,
for the test suites, the QEMU end-to-end harness and ``build.py demo``. Standard library HTTP only."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MGMT = "/api/management"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.headers} {self.body[:2000]!r}"


@dataclass
class OtaServer:
    """``python build.py server`` on a free port with its own SQLite file and storage directory.

    With ``tls=(certificate, key)`` the server speaks HTTPS (``--tls-cert/--tls-key``) and this client verifies
    it against ``ca_file`` (else the system's CAs)."""

    workdir: Path
    release_key: Path
    admin_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    tls: tuple[Path, Path] | None = None
    ca_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file is not None else None)

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        cmd = [sys.executable, str(REPO / "build.py"), "server",
               "--db", f"sqlite:///{self.workdir / 'ota.sqlite'}", "--storage", str(self.workdir / "storage"),
               "--host", "127.0.0.1", "--port", str(self.port), "--release-key", str(self.release_key)]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        env = dict(os.environ, OTA_ADMIN_TOKEN=self.admin_token, PYTHONPATH=str(REPO))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get(f"{MGMT}/v2/devauth/devices").status == 200:
                    return
            except OSError as e:  # also a TLS verification failure
                last = e
            time.sleep(0.2)
        raise AssertionError(f"server not answering on {self.url} after {timeout}s (last error: {last}):\n"
                             f"{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)  # uvicorn workers, if any, are in the same group
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 80) -> str:
        if not self.log_path.exists():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- management API ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        hdrs = {"Authorization": f"Bearer {self.admin_token}", **(headers or {})}
        if content_type:
            hdrs["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as err:
            return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def send_json(self, method: str, path: str, payload: Any) -> Response:
        return self.request(method, path, json.dumps(payload).encode(), "application/json")

    def upload_artifact(self, artifact: Path) -> Response:
        boundary = uuid.uuid4().hex
        body = b"".join([
            f"--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="artifact"; filename="{artifact.name}"\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            artifact.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ])
        return self.request("POST", f"{MGMT}/v1/deployments/artifacts", body,
                            f"multipart/form-data; boundary={boundary}")

    # --- conveniences for the end-to-end harness and the demo ------------------------------------------

    def devices(self) -> list[dict[str, Any]]:
        resp = self.get(f"{MGMT}/v2/devauth/devices")
        if resp.status != 200:
            raise RuntimeError(f"listing devices: {resp}")
        devices: list[dict[str, Any]] = resp.json()
        return devices

    def accept(self, device: dict[str, Any]) -> None:
        aid = device["auth_sets"][0]["id"]
        resp = self.send_json("PUT", f"{MGMT}/v2/devauth/devices/{device['id']}/auth/{aid}/status",
                              {"status": "accepted"})
        if resp.status not in (200, 204):
            raise RuntimeError(f"accepting {device['id']}: {resp}")

    def attributes(self, device_id: str) -> dict[str, Any]:
        resp = self.get(f"{MGMT}/v1/inventory/devices/{device_id}")
        if resp.status != 200:
            return {}
        return {a["name"]: a["value"] for a in resp.json().get("attributes", [])}

    def deploy(self, name: str, artifact_name: str, devices: list[str], **extra: Any) -> str:
        resp = self.send_json("POST", f"{MGMT}/v1/deployments/deployments",
                              {"name": name, "artifact_name": artifact_name, "devices": devices, **extra})
        if resp.status != 201:
            raise RuntimeError(f"creating deployment {name}: {resp}")
        return resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]

    def statistics(self, deployment_id: str) -> dict[str, int]:
        resp = self.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/statistics")
        if resp.status != 200:
            raise RuntimeError(f"statistics of {deployment_id}: {resp}")
        return {k: int(v) for k, v in resp.json().items() if v}

    def device_log(self, deployment_id: str, device_id: str) -> str:
        resp = self.get(f"{MGMT}/v1/deployments/deployments/{deployment_id}/devices/{device_id}/log")
        return resp.body.decode(errors="replace") if resp.status == 200 else ""
