"""``build.py server`` options and lifecycle, ``build.py publish`` and ``release --publish``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.net import free_port

from .conftest import BUILD_PY, REPO
from .server_helpers import ADMIN_TOKEN, Device, Server, write_artifact


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.pop("OTA_ADMIN_TOKEN", None)
    e.pop("OTA_RELEASE_KEYS", None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=timeout)


def one_error(p: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_bad_server_options(tmp_path: Path) -> None:
    base = ["server", "--storage", tmp_path / "s", "--db", f"sqlite:///{tmp_path}/db.sqlite"]
    p = run(*base, "--admin-token-file", tmp_path / "missing")
    assert p.returncode == 2 and "admin-token-file" in one_error(p)
    (tmp_path / "empty").write_text("\n")
    p = run(*base, "--admin-token-file", tmp_path / "empty")
    assert p.returncode == 2 and "empty" in one_error(p)
    p = run("server", "--storage", tmp_path / "s", "--db", "mysql://x/y", env={"OTA_ADMIN_TOKEN": ADMIN_TOKEN})
    assert p.returncode == 2 and "unsupported database" in one_error(p)
    p = run(*base, "--public-url", "ftp://x", env={"OTA_ADMIN_TOKEN": "t"})
    assert p.returncode == 2 and "--public-url" in one_error(p)
    p = run(*base, env={"OTA_ADMIN_TOKEN": "t", "OTA_RELEASE_KEYS": str(tmp_path / "nokey.pem")})
    assert p.returncode == 2 and "OTA_RELEASE_KEYS" in one_error(p)
    (tmp_path / "junk.pem").write_text("junk")
    p = run(*base, "--release-key", tmp_path / "junk.pem", env={"OTA_ADMIN_TOKEN": "t"})
    assert p.returncode == 2 and one_error(p)
    p = run(*base, "--port", "0")
    assert p.returncode == 2 and "--port" in p.stderr
    p = run(*base, "--workers", "0")
    assert p.returncode == 2
    for ttl in ("0", "-5", "7w", "366d", "abc"):
        p = run(*base, "--device-token-ttl", ttl, env={"OTA_ADMIN_TOKEN": ADMIN_TOKEN})
        assert p.returncode == 2 and "--device-token-ttl" in p.stderr and "duration" in p.stderr, (ttl, p.stderr)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = run(*base, "--port", str(busy.getsockname()[1]), env={"OTA_ADMIN_TOKEN": ADMIN_TOKEN})
    assert p.returncode == 2 and "cannot listen" in one_error(p)


def test_generated_admin_token_and_workers(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """No token given: one is generated (0600) and logged; two workers share the secrets; SIGTERM exits 0."""
    storage = tmp_path / "storage"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OTA_RELEASE_KEYS=f"{keys['ec'][1]}:{keys['rsa'][1]}")
    env.pop("OTA_ADMIN_TOKEN", None)
    proc = subprocess.Popen([sys.executable, str(BUILD_PY), "server", "--storage", str(storage), "--db",
                             f"sqlite:///{tmp_path}/ota.db", "--port", str(port), "--workers", "2",
                             "--public-url", "https://ota.example.com/"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        token_file = storage / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert (storage / "server-secrets.json").stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        s = Server(tmp_path)
        s.url = url
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(url + "/api/management/v2/devauth/devices", headers=headers).status_code == 200
        assert httpx.get(url + "/api/management/v2/devauth/devices",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 401
        dev = Device(s)
        assert dev.auth().status_code == 401
        d = httpx.get(url + "/api/management/v2/devauth/devices", headers=headers).json()[0]
        httpx.put(f"{url}/api/management/v2/devauth/devices/{d['id']}/auth/{d['auth_sets'][0]['id']}/status",
                  headers=headers, json={"status": "accepted"})
        assert dev.auth().status_code == 200
        for _ in range(20):  # whichever worker answers, the token verifies
            assert dev.next().status_code == 204
        assert httpx.get(url + "/metrics").status_code == 401  # scope read needed (no --public-metrics)
        m = httpx.get(url + "/metrics", headers=headers).text
        assert "ota_http_requests_total" in m and 'ota_devices{status="accepted"} 1.0' in m
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"admin token written to {storage / 'admin-token'}" in out


def test_publish(tmp_path: Path, keys: dict[str, tuple[Path, Path]], run_cli: Any) -> None:
    s = Server(tmp_path / "srv", "--release-key", str(keys["ec"][1])).start()
    try:
        d = tmp_path / "rel"
        d.mkdir()
        write_artifact(run_cli, d / "a-qemu.mender", "pub-1", ("qemu-virt",), key=keys["ec"][0])
        write_artifact(run_cli, d / "a-rpi4.mender", "pub-1", ("rpi4",), key=keys["ec"][0])
        env = {"OTA_ADMIN_TOKEN": ADMIN_TOKEN}
        p = run("publish", s.url, d, env=env)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.split()) == 2 and all("/api/management/v1/deployments/artifacts/" in x for x in p.stdout.split())
        with s.admin() as a:
            assert sorted(x["device_types_compatible"][0] for x in a.get("/api/management/v1/deployments/artifacts").json()) == ["qemu-virt", "rpi4"]
        p = run("publish", s.url, d / "a-qemu.mender", env=env)
        assert p.returncode == 1 and "409" in one_error(p) and "already exists" in one_error(p)
        unsigned = write_artifact(run_cli, tmp_path / "u.mender", "pub-u")
        p = run("publish", s.url, unsigned, env=env)
        assert p.returncode == 1 and "not signed" in one_error(p)
        p = run("publish", s.url, unsigned)
        assert p.returncode == 2 and "OTA_ADMIN_TOKEN" in one_error(p)
        p = run("publish", s.url, unsigned, env={"OTA_ADMIN_TOKEN": "wrong"})
        assert p.returncode == 2 and "refused the admin token" in one_error(p)
        p = run("publish", "ftp://x", unsigned, env=env)
        assert p.returncode == 2 and "http" in one_error(p)
        p = run("publish", f"http://127.0.0.1:{free_port()}", unsigned, env=env)
        assert p.returncode == 4 and "cannot reach" in one_error(p)
    finally:
        s.stop()


@pytest.mark.parametrize("env, code, message", [
    ({}, 2, "OTA_ADMIN_TOKEN"),
    ({"OTA_ADMIN_TOKEN": "t"}, 4, "cannot reach"),
])
def test_release_publish_checks_before_building(tmp_path: Path, env: dict[str, str], code: int, message: str) -> None:
    """``release --publish`` fails in a second when it could not publish, instead of after a long build."""
    t0 = time.monotonic()
    p = run("release", "--unsigned", "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--publish",
            f"http://127.0.0.1:{free_port()}", env=env)
    assert p.returncode == code and message in one_error(p)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out").exists()


def test_access_log_only_when_asked(tmp_path: Path) -> None:
    """``--access-log`` writes one line per request (what the QEMU rollback test reads); without it, none."""
    from devkit.server import OtaServer

    for flag in (True, False):
        server = OtaServer(tmp_path / str(flag), None, "--allow-unsigned", *(["--access-log"] if flag else []))
        server.start()
        try:
            assert server.get("/api/management/v1/deployments/deployments").status == 200
            server.request("POST", "/api/devices/v1/deployments/device/deployments/next", b"{}", "application/json")
        finally:
            server.stop()
        log = server.log_path.read_text()
        lines = [line for line in log.splitlines() if '"POST /api/devices/v1/deployments/device/deployments/next' in line]
        assert (len(lines) == 1 and " 401" in lines[0]) if flag else not lines, log
        assert "Started server process" not in log and "Uvicorn running" not in log
