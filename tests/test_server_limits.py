"""Update server against clients that try to exhaust it without credentials: slow or endless request heads
and bodies, large unauthenticated bodies, floods of auth requests and of unknown identities; and devices that
upload endless deployment logs. Each server here runs with short limits (``build.py server`` options); the
assertions never measure durations beyond "closed before N seconds" with a generous N."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .server_helpers import ADMIN_TOKEN, Device, Server, deploy, upload, write_artifact

DEV = "/api/devices/v1"
AUTH = f"{DEV}/authentication/auth_requests"
INVENTORY = f"{DEV}/inventory/device/attributes"
DEVAUTH = "/api/management/v2/devauth/devices"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
ARTIFACTS = "/api/management/v1/deployments/artifacts"
#: generous: every deadline below is 1-2 s, a busy machine may be slow to run the timer
CLOSED_WITHIN = 8.0


def start(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]], *args: str) -> Server:
    return Server(tmp_path_factory.mktemp("server"), "--release-key", str(keys["ec"][1]), *args).start()


def stop(server: Server) -> None:
    """Stop the server; what the clients did must not have raised anything in it."""
    assert server.stop() == 0
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log and "Exception" not in log, log[-5000:]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    """Short connection deadlines."""
    s = start(tmp_path_factory, keys, "--header-timeout", "1", "--body-timeout", "1", "--body-min-rate", "1000",
              "--keep-alive-timeout", "1", "--max-header-size", "8KiB", "--max-body", "512KiB",
              "--max-artifact", "40KiB")
    yield s
    stop(s)


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLOSED_WITHIN + 5)
    return sock


def read_until_closed(sock: socket.socket, limit: float = CLOSED_WITHIN) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took (``limit`` + 5 at
    most: the socket's timeout raises then)."""
    t0 = time.monotonic()
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


def trickle(sock: socket.socket, data: bytes, interval: float, until: float) -> float:
    """Send ``data`` one byte per ``interval`` seconds until the server closes (or ``until`` seconds pass).
    Returns the seconds it took the server to stop taking bytes."""
    t0 = time.monotonic()
    for b in data:
        if time.monotonic() - t0 > until:
            break
        try:
            sock.sendall(bytes([b]))
        except OSError:  # reset or broken pipe: the server closed
            break
        time.sleep(interval)
        if _closed(sock):
            break
    return time.monotonic() - t0


def _closed(sock: socket.socket) -> bool:
    """The server answered or closed (something to read, or EOF)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


# ---------------------------------------------------------------------------------------------------------
# Connection deadlines


def test_idle_connection_is_closed_within_the_header_timeout(slow: Server) -> None:
    with connect(slow) as sock:
        data, took = read_until_closed(sock)
    assert data == b"" and took < CLOSED_WITHIN, (data, took)  # nothing asked: closed without an answer


def test_slowloris_partial_headers_are_cut_within_the_header_timeout(slow: Server) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Slow-%d: %d\r\n" % (i, i) for i in range(200))
    with connect(slow) as sock:
        took = trickle(sock, head, 0.05, CLOSED_WITHIN + 2)
        data, _ = read_until_closed(sock)
    assert took < CLOSED_WITHIN, took
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b"connection: close" in data.lower()
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]


def test_one_byte_per_second_body_is_cut_within_the_body_timeout(slow: Server) -> None:
    body = json.dumps({"id_data": json.dumps({"mac": "slow"}), "pubkey": "x" * 500}).encode()
    head = (f"POST {AUTH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with connect(slow) as sock:
        sock.sendall(head)
        took = trickle(sock, body, 0.25, CLOSED_WITHIN + 2)
        data, _ = read_until_closed(sock)
    assert took < CLOSED_WITHIN, took
    assert data.startswith(b"HTTP/1.1 408 "), data[:300]
    # chunked, the way the Mender client sends: the same
    with connect(slow) as sock:
        sock.sendall(head.replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked"))
        took = trickle(sock, b"".join(b"1\r\n%c\r\n" % c for c in body), 0.05, CLOSED_WITHIN + 2)
        data, _ = read_until_closed(sock)
    assert took < CLOSED_WITHIN and data.startswith(b"HTTP/1.1 408 "), (took, data[:300])
    assert slow.client().get("/health").status_code == 200


def test_a_steady_large_body_is_not_cut(slow: Server) -> None:
    """2 s of body at ~100 KB/s (the deadline is 1 s + 1 s per 1000 bytes): it arrives whole."""
    dev = Device(slow)
    dev.accept()
    value = "v" * 200_000
    body = json.dumps([{"name": "big", "value": value}]).encode()

    def paced() -> Iterator[bytes]:
        for i in range(0, len(body), 10_000):
            time.sleep(0.1)
            yield body[i:i + 10_000]

    r = dev.http.patch(INVENTORY, headers={**dev.headers, "Content-Type": "application/json"}, content=paced())
    assert r.status_code == 200, r.text
    with slow.admin() as a:
        attrs = {x["name"]: x["value"] for x in a.get(f"/api/management/v1/inventory/devices/{dev.id()}")
                 .json()["attributes"]}
    assert attrs["big"] == value


def test_keep_alive_works_and_idle_connections_are_closed(slow: Server) -> None:
    with connect(slow) as sock:
        for _ in range(3):  # several requests on one connection
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while b'"ok"' not in answer:
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            time.sleep(0.3)
        data, took = read_until_closed(sock)  # then idle: closed by the keep-alive timeout (1 s)
    assert data == b"" and took < CLOSED_WITHIN, (data, took)


def test_oversized_request_head_is_refused(slow: Server) -> None:
    with connect(slow) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert took < CLOSED_WITHIN


# ---------------------------------------------------------------------------------------------------------
# Bodies without credentials: refused before they are read


def ask_head_only(server: Server, head: str) -> tuple[bytes, float]:
    """Send a request's head announcing a body, never the body; return the answer (the server must answer and
    close without waiting for the body)."""
    with connect(server) as sock:
        sock.sendall(head.encode())
        return read_until_closed(sock)


def test_large_unauthenticated_bodies_are_refused_before_they_are_read(slow: Server) -> None:
    big = 16 * 1024 * 1024
    data, took = ask_head_only(slow, f"POST {AUTH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     f"Content-Length: {big}\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413 ") and took < CLOSED_WITHIN, (data[:300], took)
    assert b"65536" in data
    # the device and management APIs without credentials: 401 (what the route answers anyway)
    for method, path, auth in (("PUT", INVENTORY, ""), ("PUT", INVENTORY, "Authorization: Bearer forged.jwt.token\r\n"),
                               ("PUT", "/api/management/v1/deviceconfig/configurations/group/g", ""),
                               ("POST", ARTIFACTS, "Authorization: Bearer wrong-admin-token\r\n")):
        data, took = ask_head_only(slow, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}"
                                         f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 401 ") and took < CLOSED_WITHIN, (path, data[:300], took)
        assert b"www-authenticate: Bearer" in data
    # chunked: refused once 64 KiB went by, the rest never read
    with connect(slow) as sock:
        sock.sendall(f"POST {AUTH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sent = 0
        try:
            while sent < 1024 * 1024 and not _closed(sock):
                sock.sendall(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
                sent += 0x4000
                time.sleep(0.02)
        except OSError:
            pass
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413 "), data[:300]
    assert sent < 1024 * 1024, "the server kept reading a refused body"
    assert slow.client().get("/health").status_code == 200


def test_credentials_lift_the_small_limit(slow: Server) -> None:
    """An accepted device (chunked, as the Mender client sends) and the admin may send more than 64 KiB."""
    dev = Device(slow)
    dev.accept()
    body = json.dumps([{"name": f"k{i}", "value": "x" * 900} for i in range(300)]).encode()  # ~280 KB
    r = dev.http.put(INVENTORY, headers={**dev.headers, "Content-Type": "application/json"},
                     content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]))
    assert r.status_code == 200, r.text
    with slow.admin() as a:
        r = a.put("/api/management/v1/deviceconfig/configurations/group/big",
                  json={f"V{i}": "y" * 1000 for i in range(200)})
        assert r.status_code == 204, r.text


def test_body_and_artifact_size_limits(slow: Server, keys: dict[str, tuple[Path, Path]], run_cli_module: Any,
                                       tmp_path: Path) -> None:
    dev = Device(slow)
    dev.accept()
    body = json.dumps([{"name": "k", "value": "x" * 600_000}]).encode()
    r = dev.http.put(INVENTORY, headers={**dev.headers, "Content-Type": "application/json"}, content=body)
    assert r.status_code == 413 and "524288" in r.json()["error"], r.text
    small = write_artifact(run_cli_module, tmp_path / "small.mender", "small-1", key=keys["ec"][0], size=10_000)
    big = write_artifact(run_cli_module, tmp_path / "big.mender", "big-1", key=keys["ec"][0], size=200_000, seed=7)
    assert upload(slow, small).status_code == 201
    r = upload(slow, big)
    assert r.status_code == 413 and "artifact larger than 40960" in r.json()["error"], r.text


# ---------------------------------------------------------------------------------------------------------
# Pending devices and keys: capped


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    s = start(tmp_path_factory, keys, "--max-pending-devices", "3", "--max-pending-auth-sets", "2")
    yield s
    stop(s)


def pending_ids(server: Server) -> list[str]:
    with server.admin() as a:
        return [d["id"] for d in a.get(DEVAUTH, params={"status": "pending"}).json()]


def test_new_identities_get_429_past_the_pending_cap(capped: Server) -> None:
    first = [Device(capped) for _ in range(3)]
    for d in first:
        assert d.auth().status_code == 401  # pending
    newcomer = Device(capped)
    r = newcomer.auth()
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, r.text
    assert "waiting for an administrator" in r.json()["error"]
    assert len(pending_ids(capped)) == 3
    assert first[0].auth().status_code == 401  # a known pending device may still ask
    # a preauthorized device is not a newcomer
    pre = Device(capped)
    with capped.admin() as a:
        assert a.post(DEVAUTH, json={"identity_data": pre.identity, "pubkey": pre.pubkey}).status_code == 201
    assert pre.auth().status_code == 200
    # accepting (or decommissioning) a pending device makes room
    device_id = first[0].id()
    with capped.admin() as a:
        aid = a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"][0]["id"]
        assert a.put(f"{DEVAUTH}/{device_id}/auth/{aid}/status", json={"status": "accepted"}).status_code == 204
    assert newcomer.auth().status_code == 401
    assert Device(capped).auth().status_code == 429
    with capped.admin() as a:
        for device_id in pending_ids(capped):
            assert a.delete(f"{DEVAUTH}/{device_id}").status_code == 204


def test_new_keys_of_one_identity_get_429_past_the_cap(capped: Server) -> None:
    identity = {"mac": f"02:00:{uuid.uuid4().hex[:8]}"}
    keys = [Device(capped, identity=identity) for _ in range(3)]
    assert keys[0].auth().status_code == 401
    assert keys[1].auth().status_code == 401
    r = keys[2].auth()
    assert r.status_code == 429 and "keys of this device" in r.json()["error"], r.text
    (device_id,) = pending_ids(capped)
    with capped.admin() as a:
        assert len(a.get(f"{DEVAUTH}/{device_id}").json()["auth_sets"]) == 2
        assert a.delete(f"{DEVAUTH}/{device_id}").status_code == 204


# ---------------------------------------------------------------------------------------------------------
# Auth requests: rate-limited per address and per identity


@pytest.fixture(scope="module")
def rated(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    s = start(tmp_path_factory, keys, "--auth-rate-per-address", "8/60s", "--auth-rate-per-identity", "3/60s")
    yield s
    stop(s)


def test_auth_requests_are_rate_limited_per_identity_and_per_address(rated: Server) -> None:
    dev = Device(rated)
    for _ in range(3):
        assert dev.auth().status_code == 401
    r = dev.auth()
    assert r.status_code == 429 and "identity" in r.json()["error"] and int(r.headers["retry-after"]) >= 1, r.text
    others = [Device(rated) for _ in range(5)]
    assert [d.auth().status_code for d in others[:4]] == [401] * 4  # 8 requests from this address so far
    r = others[4].auth()
    assert r.status_code == 429 and "address" in r.json()["error"], r.text
    # garbage counts too (it is checked before the body is parsed)
    assert rated.client().post(AUTH, content=b"{").status_code == 429
    # another client address (told by the trusted local proxy): its own bucket
    body = others[4].auth_body()
    r = rated.client().post(AUTH, content=body, headers={"X-MEN-Signature": others[4].sign(body),
                                                         "Content-Type": "application/json",
                                                         "X-Forwarded-For": "192.0.2.7"})
    assert r.status_code == 401, r.text
    # the rest of the API is not affected
    assert rated.admin().get(DEVAUTH).status_code == 200


# ---------------------------------------------------------------------------------------------------------
# Deployment logs: a quota per device and deployment, read without loading every row


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]], run_cli_module: Any
           ) -> Iterator[tuple[Server, str]]:
    s = start(tmp_path_factory, keys, "--log-max-bytes", "8KiB", "--log-max-uploads", "4")
    art = write_artifact(run_cli_module, tmp_path_factory.mktemp("art") / "logged-1.mender", "logged-1",
                         key=keys["ec"][0])
    assert upload(s, art).status_code == 201
    yield s, "logged-1"
    stop(s)


@pytest.fixture(scope="module")
def run_cli_module() -> Any:
    import os
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO

    def run(*args: Any, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, check=check)

    return run


def messages(n: int, size: int = 40, start: int = 0) -> dict[str, Any]:
    return {"messages": [{"timestamp": f"2026-12-01T00:00:{(start + i) % 60:02d}Z", "level": "info",
                          "message": f"line {start + i} " + "x" * size} for i in range(n)]}


def test_log_quota_truncates_once_then_refuses(logged: tuple[Server, str]) -> None:
    server, release = logged
    dev = Device(server)
    dev_id = dev.accept()
    dep = deploy(server, name="quota", artifact_name=release, devices=[dev_id])
    url = f"{DEV}/deployments/device/deployments/{dep}/log"
    assert dev.http.put(url, headers=dev.headers, json=messages(10)).status_code == 204  # ~1 KB
    big = messages(400, start=10)  # ~30 KB: over the 8 KiB quota
    assert dev.http.put(url, headers=dev.headers, json=big).status_code == 204  # stored, truncated
    r = dev.http.put(url, headers=dev.headers, json=messages(1, start=999))
    assert r.status_code == 413 and "full" in r.json()["error"], r.text
    with server.admin() as a:
        text = a.get(f"{DEPLOYMENTS}/{dep}/devices/{dev_id}/log").text
    lines = text.splitlines()
    assert lines[0].endswith("line 0 " + "x" * 40) and "line 9 " in lines[9]  # the first upload, whole
    assert "line 10 " in lines[10]  # the head of the truncated upload
    assert lines[-1].endswith("line 409 " + "x" * 40)  # and its tail: where a failure is explained
    (marker,) = [x for x in lines if "log quota reached" in x]
    assert "warning:" in marker and "left out" in marker
    assert "line 999" not in text
    assert 4 * 1024 < len(text.encode()) < 9 * 1024
    # the quota is per device and deployment: another deployment's log, and the upload count
    dep2 = deploy(server, name="quota-2", artifact_name=release, devices=[dev_id])
    url2 = f"{DEV}/deployments/device/deployments/{dep2}/log"
    assert [dev.http.put(url2, headers=dev.headers, json=messages(1)).status_code for _ in range(5)] == [204] * 4 + [413]
    # a single message larger than the quota is cut, not lost
    dep3 = deploy(server, name="quota-3", artifact_name=release, devices=[dev_id])
    huge = {"messages": [{"timestamp": "t", "level": "error", "message": "start " + "y" * 100_000 + " the end"}]}
    assert dev.http.put(f"{DEV}/deployments/device/deployments/{dep3}/log", headers=dev.headers,
                        json=huge).status_code == 204
    with server.admin() as a:
        text = a.get(f"{DEPLOYMENTS}/{dep3}/devices/{dev_id}/log").text
    first, marker = text.splitlines()
    assert first.startswith("t error: start yyy") and first.endswith("yyy the end") and " [...] " in first
    assert "log quota reached" in marker
    assert len(text.encode()) < 9 * 1024


def test_log_reads_are_streamed(logged: tuple[Server, str]) -> None:
    server, release = logged
    dev = Device(server)
    dev_id = dev.accept()
    dep = deploy(server, name="stream", artifact_name=release, devices=[dev_id])
    url = f"{DEV}/deployments/device/deployments/{dep}/log"
    for i in range(4):
        assert dev.http.put(url, headers=dev.headers, json=messages(3, size=5, start=3 * i)).status_code == 204
    with server.admin() as a:
        r = a.get(f"{DEPLOYMENTS}/{dep}/devices/{dev_id}/log")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "content-length" not in r.headers and r.headers["transfer-encoding"] == "chunked"
        assert [line.split(" ")[3] for line in r.text.splitlines()] == [str(i) for i in range(12)]
        page = a.get(f"/ui/deployments/{dep}/devices/{dev_id}/log")
        assert page.status_code == 200 and "line 11 " in page.text and "line 0 " in page.text


def test_log_readers_page_from_the_newest_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the dashboard's reader fetches rows newest first, a batch at a time, and stops once it has
    its messages; the management API's reader fetches a batch at a time in order."""
    from ota_server import device_logs
    from ota_server.db import Database
    from ota_server.models import Base, deployment_logs, deployments

    monkeypatch.setattr(device_logs, "BATCH", 4)
    db = Database(f"sqlite:///{tmp_path / 'logs.db'}")
    Base.metadata.create_all(db.engine)
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with db.write() as c:
        c.execute(deployments.insert().values(id="d", name="d", artifact_name="a", status="inprogress", created=0,
                                              device_count=1, phases=[], target={}))
        for i in range(100):  # 100 uploads of 10 messages
            msgs = [{"timestamp": "t", "level": "info", "message": f"m{10 * i + k}"} for k in range(10)]
            c.execute(deployment_logs.insert().values(deployment_id="d", device_id="x", created=0, messages=msgs,
                                                      message_count=10, size=100))
    statements.clear()
    with db.read() as c:
        newest, dropped = device_logs.newest_messages(c, "d", "x", limit=25)
    assert [m["message"] for m in newest] == [f"m{i}" for i in range(975, 1000)] and dropped == 975
    reads = [s for s in statements if "FROM deployment_logs" in s and "sum(" not in s]
    assert len(reads) == 1 and "LIMIT" in reads[0], statements  # 3 rows needed: one batch of 4
    ctx = type("Ctx", (), {"db": db})()
    statements.clear()
    r = device_logs.device_log(ctx, "d", "x")  # type: ignore[arg-type]
    assert len(statements) == 1  # the first batch only, until the body is sent
    import asyncio

    async def body() -> str:
        return "".join([chunk async for chunk in r.body_iterator])  # type: ignore[misc]

    text = asyncio.run(body())
    assert text.splitlines() == [f"t info: m{i}" for i in range(1000)]
    assert len(statements) == 26 and all("LIMIT" in s for s in statements)  # 100 rows / 4 + the empty end
    db.dispose()


def test_fit_messages_keeps_head_and_tail() -> None:
    from ota_server.device_logs import MARKER_RESERVE, fit_messages, message_size

    msgs = [{"timestamp": "t", "level": "info", "message": f"m{i:04d}"} for i in range(1000)]
    kept, affected, left_out = fit_messages(msgs, 4000)
    assert sum(message_size(m) for m in kept) <= 4000 + MARKER_RESERVE
    texts = [m["message"] for m in kept]
    assert texts[0] == "m0000" and texts[-1] == "m0999" and any("log quota" in t for t in texts)
    assert affected == 1000 - (len(kept) - 1) and left_out > 0
    assert fit_messages(msgs[:3], 4000) == (msgs[:3], 0, 0)
    # multi-byte text is cut on character boundaries
    (one,) = [{"timestamp": "t", "level": "info", "message": "é📷" * 5000}]
    kept, affected, _ = fit_messages([one], 2000)
    assert affected == 1 and all(message_size(m) <= 2000 for m in kept)
    assert len(kept) == 2 and " [...] " in kept[0]["message"] and "log quota" in kept[1]["message"]
    assert kept[0]["message"].startswith("é📷") and kept[0]["message"].endswith("é📷")
    # several messages that do not fit whole: the start of the first, the end of the last
    big = [{"timestamp": "t", "level": "info", "message": f"{i}:" + "z" * 3000} for i in range(5)]
    kept, affected, _ = fit_messages(big, 4000)
    assert affected == 4 and kept[-1] == big[4]  # the last one fits whole
    assert kept[0]["message"].startswith("0:zzz") and kept[0]["message"].endswith(" [...]")
    assert "log quota" in kept[1]["message"] and kept[2]["message"].startswith("[...] zzz") and len(kept) == 4


def test_limit_options_are_checked(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO

    for args, word in ((["--auth-rate-per-address", "fast"], "auth-rate-per-address"),
                       (["--log-max-bytes", "lots"], "log-max-bytes"), (["--header-timeout", "0"], "header-timeout"),
                       (["--max-pending-devices", "-1"], "max-pending-devices")):
        p = subprocess.run([sys.executable, str(BUILD_PY), "server", "--storage", str(tmp_path), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(REPO), OTA_ADMIN_TOKEN=ADMIN_TOKEN))
        assert p.returncode == 2 and word in p.stderr, (args, p.stderr)
