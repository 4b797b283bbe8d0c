#!/usr/bin/env python3
"""Update-server load: simulated devices polling ``next`` and a full phased rollout, over real HTTP on loopback.

For every worker count in ``--workers`` a fresh ``build.py server`` (its own SQLite file and storage in a temp dir;
with ``--postgres URL`` a new database on that cluster instead) is started; ``--devices`` devices are preauthorized
through the management API (generated ed25519 keys), each authenticates with a signed auth request (real JWTs) and
polls once (its provides are recorded; that write is not measured). Then a load generator in ``--gen-procs``
processes keeps ``--concurrency`` requests in flight (closed loop, keep-alive connections, devices taken round
robin) on ``POST /api/devices/v2/deployments/device/deployments/next`` for ``--duration`` seconds after a short
warm-up, and prints polls/s, p50/p95/p99 latency, errors, and the CPU taken by the server and by the generator
(they share the machine). Then the same server takes status reports the same way (``--no-reports`` skips them): a
deployment to every device, each device handed it by one ``next``, then ``PUT .../status`` reports in a closed loop
(each one a durable write, acknowledged once committed: :mod:`ota_server.groupcommit`), printed as reports/s next
to the polls/s and the floor. The floor is measured in the same run with the same generator: a bare FastAPI app on
uvicorn answering 204 on the same path, with the same worker counts. With ``--rounds N`` both stay up and are
loaded alternately N times each; the median round is reported with the per-round ratios and the server's CPU time
per request (what a poll costs, whatever share of a busy machine a round got).

The rollout (``--rollout-devices``, 0 to skip): one signed artifact uploaded, a deployment to all devices in
two phases (10 % at once, the rest ``--phase-wait`` s later) with a failure threshold; every device polls
``next`` (every ``--poll-interval`` s while it gets 204), downloads part of the artifact through the signed
link (Range), reports downloading -> installing -> rebooting -> success (``--fail-rate`` of them: failure,
kept under the threshold), and the statistics must then count exactly every device.

``--fleet N[,M...]`` (:mod:`_fleet`, in ``bench/_fleet.py``): a whole fleet per size, start to finish (provision,
auth, inventory, first poll, idle polls, the steady background of polls at mender-client's default intervals, and
the rollout under that background), with the server's and PostgreSQL's CPU per request side by side per size.

The generator is a small asyncio HTTP/1.1 client (``--client raw``, with uvloop when installed):
``--client httpx`` runs the same poll load through httpx.AsyncClient for comparison. Targets (issue #5):
>= 2,000 polls/s with p99 < 50 ms on the 2-core machine. Prints numbers and ratios; asserts only correctness.
``--quick`` runs in seconds to check the bench still works.

The servers are started with :mod:`devkit`. This file is longer than our modules should be (about 800 lines):
it is one standalone script whose parts (a raw HTTP/1.1 client, the poll load in worker processes, the
rollout) only serve each other; splitting it would leave modules nothing else imports.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devkit.client import ManagementClient  # noqa: E402 - after the repository is on the path
from devkit.server import OtaServer, ServerProcess  # noqa: E402

NEXT = "/api/devices/v2/deployments/device/deployments/next"
AUTH = "/api/devices/v1/authentication/auth_requests"
DEVAUTH = "/api/management/v2/devauth/devices"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
STATUS = "/api/devices/v1/deployments/device/deployments/{}/status"
DEVICE_TYPE = "raspberrypi4"
CURRENT = "vv-1.0.0"
RELEASE = "vv-1.1.0"

#: ``--quick``: seconds instead of minutes, to check that the bench (and the server under it) still work
QUICK = {"devices": 100, "duration": 2.0, "warmup": 0.5, "workers": "1", "concurrency": 8, "gen_procs": 1,
         "rollout_devices": 100, "phase_wait": 1.0, "poll_interval": 0.5,
         "fleet": "50,100", "fleet_poll_interval": 5.0, "inventory_interval": 20.0, "steady_seconds": 1.0}

FLOOR_APP = '''
from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI()


@app.post("{path}")
async def next_deployment() -> Response:
    return Response(status_code=204)
'''


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# -----------------------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client (Content-Length bodies only, which is what the server sends)


class HTTPConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes]] | None = None
        self.closed = False
        self.head_only = False

    @classmethod
    async def open(cls, port: int) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, "127.0.0.1", port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    def _parse(self) -> None:
        w = self.waiter
        if w is None or w.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        length = 0
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17:j if j >= 0 else None])
        elif b"\r\ntransfer-encoding: chunked" in head:
            w.set_exception(RuntimeError("chunked responses are not supported by the bench client"))
            return
        if self.head_only or status in (204, 304):
            length = 0
        total = end + 4 + length
        if len(self.buf) < total:
            return
        body = bytes(self.buf[end + 4:total])
        del self.buf[:total]
        w.set_result((status, head, body))

    async def request(self, data: bytes, head_only: bool = False) -> tuple[int, bytes, bytes]:
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        self.head_only = head_only
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def http_request(method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Pool:
    """``size`` keep-alive connections shared by many simulated devices; a closed one is reopened."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.free: asyncio.Queue[HTTPConnection | None] = asyncio.Queue()
        for _ in range(size):
            self.free.put_nowait(None)
        self.reconnects = 0

    async def request(self, data: bytes) -> tuple[int, bytes, bytes]:
        conn = await self.free.get()
        try:
            for attempt in range(3):
                if conn is None or conn.closed:
                    if conn is not None:
                        self.reconnects += 1
                    conn = await HTTPConnection.open(self.port)
                try:
                    return await conn.request(data)
                except ConnectionError:
                    # an idle keep-alive connection closed by the server just as we sent: try a new one
                    conn.close()
                    conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        finally:
            self.free.put_nowait(conn)

    async def json(self, method: str, path: str, doc: Any = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, Any]:
        body = json.dumps(doc).encode() if doc is not None else b""
        hdrs = {**(headers or {}), **({"Content-Type": "application/json"} if doc is not None else {})}
        status, head, raw = await self.request(http_request(method, path, self.port, body, hdrs))
        return status, (json.loads(raw) if raw and b"application/json" in head else raw)

    def close(self) -> None:
        while not self.free.empty():
            c = self.free.get_nowait()
            if c is not None:
                c.close()


# -----------------------------------------------------------------------------------------------------------
# Processes: the update server, the floor app, CPU accounting


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from /proc (:func:`_fleet.tree_cpu`)."""
    from _fleet import tree_cpu as fleet_tree_cpu

    return fleet_tree_cpu(pid)


STARTED: list[ServerProcess] = []


def cpu(server: ServerProcess) -> float:
    """CPU seconds taken so far by a started server and its workers."""
    assert server.proc is not None
    return tree_cpu(server.proc.pid)


def ota_server(base: Path, workers: int, admin_token: str, release_key: Path, extra: Sequence[str] = (),
               postgres: str | None = None) -> OtaServer:
    """``build.py server`` (devkit) with its own database and storage in ``base`` (the database: a new one on the
    ``postgres`` cluster when given, else SQLite in ``base``); thousands of devices authenticate from this one
    address, so the auth rate limits are off (they would measure themselves)."""
    server = OtaServer(base, release_key, "--auth-rate-per-address", "off", "--auth-rate-per-identity", "off",
                       *extra, workers=workers, admin_token=admin_token,
                       db_url=new_postgres_database(postgres) if postgres else None)
    STARTED.append(server)
    return server


#: databases created on the ``--postgres`` cluster, dropped at the end
CREATED_DATABASES: list[tuple[str, str]] = []


def new_postgres_database(cluster: str) -> str:
    """A new, empty database on the cluster of ``cluster`` (a URL whose user may create databases); its URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # a generated identifier
    CREATED_DATABASES.append((cluster, name))
    return cluster.rsplit("/", 1)[0] + "/" + name


def drop_postgres_databases() -> None:
    import psycopg

    while CREATED_DATABASES:
        cluster, name = CREATED_DATABASES.pop()
        with psycopg.connect(cluster, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


def last_seen_written(server: OtaServer, since: float) -> int:
    """Devices whose ``last_seen`` the (stopped) server wrote at ``since`` or later: every polled one."""
    import sqlalchemy as sa

    from ota_server.db import normalize_url

    engine = sa.create_engine(normalize_url(server.db_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM devices WHERE last_seen >= :t"), {"t": since})
                       .scalar_one())
    finally:
        engine.dispose()


class FloorServer(ServerProcess):
    """The floor: a bare FastAPI app on uvicorn answering 204 on the poll path, with the same worker count."""

    ready = ("POST", NEXT)

    def __init__(self, base: Path, workers: int) -> None:
        super().__init__(base)
        self.workers = workers

    def command(self) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "bench_floor_app.py").write_text(FLOOR_APP.replace("{path}", NEXT))
        return [sys.executable, "-m", "uvicorn", "bench_floor_app:app", "--app-dir", str(self.workdir), "--host",
                "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers), "--no-access-log",
                "--log-level", "warning", "--no-server-header"]


def floor_server(base: Path, workers: int) -> FloorServer:
    server = FloorServer(base, workers)
    STARTED.append(server)
    return server


# -----------------------------------------------------------------------------------------------------------
# Devices


@dataclass
class SimDevice:
    index: int
    identity: dict[str, str]
    key: Any
    pubkey: str
    token: str = ""
    fails: bool = False
    artifact: str = CURRENT  # what it runs: its provides
    busy: bool = False  # in the middle of an update (the fleet's background load leaves it alone)

    def auth_request(self, port: int) -> bytes:
        body = json.dumps({"id_data": json.dumps(self.identity), "pubkey": self.pubkey,
                           "tenant_token": ""}).encode()
        sig = base64.b64encode(self.key.sign(body)).decode()
        return http_request("POST", AUTH, port, body, {"Content-Type": "application/json", "X-MEN-Signature": sig})

    def poll_request(self, port: int, artifact_name: str | None = None) -> bytes:
        """What the Mender client sends: its provides (artifact name, device type, rootfs version/checksum)."""
        artifact_name = artifact_name or self.artifact
        body = json.dumps({"device_provides": {
            "device_type": DEVICE_TYPE, "artifact_name": artifact_name,
            "rootfs-image.version": artifact_name,
            "rootfs-image.checksum": f"{self.index:064x}",
        }, "update_control_map": False}).encode()
        return http_request("POST", NEXT, port, body, {"Authorization": f"Bearer {self.token or '-'}",
                                                       "Content-Type": "application/json",
                                                       "Accept-Encoding": "gzip"})


def make_devices(n: int, identity: Callable[[str, int], dict[str, str]] | None = None) -> list[SimDevice]:
    """``n`` devices with ed25519 keys; ``identity(run, i)``: device ``i``'s identity (default: a MAC address
    and a host name), ``run`` a token unique to this call."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        ident = identity(run, i) if identity else {
            "mac": f"02:{run[:2]}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:00",
            "hostname": f"bench-{run}-{i:06d}"}
        out.append(SimDevice(i, ident, key, pem))
    return out


async def provision(port: int, admin: dict[str, str], devs: list[SimDevice], concurrency: int = 16,
                    poll_once: bool = True) -> dict[str, float]:
    """Preauthorize every device (management API), authenticate it (signed auth request → JWT) and, with
    ``poll_once``, let it poll once so that its provides are recorded (the only write a poll may do)."""
    pool = Pool(port, concurrency)
    times: dict[str, float] = {}

    async def each(coro_for: Any) -> None:
        it = iter(devs)

        async def worker() -> None:
            for d in it:
                await coro_for(d)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def preauth(d: SimDevice) -> None:
        status, body = await pool.json("POST", DEVAUTH, {"identity_data": d.identity, "pubkey": d.pubkey}, admin)
        if status != 201:
            raise SystemExit(f"preauthorize failed: {status} {body!r}")

    async def auth(d: SimDevice) -> None:
        status, _, body = await pool.request(d.auth_request(port))
        if status != 200:
            raise SystemExit(f"auth request failed: {status} {body!r}")
        d.token = body.decode()

    async def poll(d: SimDevice) -> None:
        status, _, body = await pool.request(d.poll_request(port))
        if status != 204:
            raise SystemExit(f"first poll failed: {status} {body!r}")

    steps = [("preauthorize", preauth), ("authenticate", auth)] + ([("first poll", poll)] if poll_once else [])
    for name, fn in steps:
        t = time.perf_counter()
        await each(fn)
        times[name] = time.perf_counter() - t
    pool.close()
    return times


async def hand_out(server: ManagementClient, port: int, devs: list[SimDevice], art: Path) -> tuple[str, float]:
    """For the status-report load: the release uploaded (once), a deployment to every device, and each device
    given it by one ``next`` poll (200), so that it may report. Returns (deployment id, seconds)."""
    t = time.perf_counter()
    uploaded = server.upload_artifact(art)
    if uploaded.status != 201:
        raise SystemExit(f"artifact upload failed: {uploaded}")
    resp = server.send_json("POST", DEPLOYMENTS, {"name": "bench reports", "artifact_name": RELEASE,
                                                  "all_devices": True})
    if resp.status != 201:
        raise SystemExit(f"deployment not created: {resp}")
    dep_id = resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]
    pool = Pool(port, 16)
    it = iter(devs)

    async def worker() -> None:
        for d in it:
            status, _, body = await pool.request(d.poll_request(port))
            if status != 200:
                raise SystemExit(f"next with a deployment answered {status} {body[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(16)))
    pool.close()
    return dep_id, time.perf_counter() - t


def report_request(d: SimDevice, port: int, dep_id: str) -> bytes:
    """A status report the way the agent sends it: ``downloading`` (the first moves the device on; each repeat
    stores its substate: every report is one write, as a real one)."""
    body = json.dumps({"status": "downloading", "substate": f"bench {d.index}"}).encode()
    return http_request("PUT", STATUS.format(dep_id), port, body, {"Authorization": f"Bearer {d.token}",
                                                                    "Content-Type": "application/json"})


# -----------------------------------------------------------------------------------------------------------
# The poll load (runs in --gen-procs processes)


def _gen_main(args: dict[str, Any]) -> dict[str, Any]:
    loop = new_loop()
    try:
        return loop.run_until_complete(_gen(args))
    finally:
        loop.close()


async def _gen(a: dict[str, Any]) -> dict[str, Any]:
    port, requests, conns = a["port"], a["requests"], a["connections"]
    start_at, warmup, duration = a["start_at"], a["warmup"], a["duration"]
    lat = array("d")
    codes: dict[str, int] = {}
    errors: list[str] = []
    counter = [0]
    measure_from = start_at + warmup
    stop_at = measure_from + duration
    await asyncio.sleep(max(0.0, start_at - time.time()))

    def pick() -> bytes:
        counter[0] += 1
        r: bytes = requests[counter[0] % len(requests)]
        return r

    async def raw_conn() -> None:
        conn = await HTTPConnection.open(port)
        while True:
            t0 = time.time()
            if t0 >= stop_at:
                break
            p0 = time.perf_counter()
            try:
                status, _, _ = await conn.request(pick())
            except (ConnectionError, RuntimeError) as e:
                errors.append(str(e))
                conn.close()
                conn = await HTTPConnection.open(port)
                continue
            if t0 >= measure_from:
                lat.append(time.perf_counter() - p0)
                codes[str(status)] = codes.get(str(status), 0) + 1
        conn.close()

    async def httpx_conns() -> None:
        import httpx

        parsed = [_split_raw(r) for r in requests]
        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as client:
            async def one() -> None:
                while True:
                    t0 = time.time()
                    if t0 >= stop_at:
                        break
                    counter[0] += 1
                    headers, body = parsed[counter[0] % len(parsed)]
                    p0 = time.perf_counter()
                    try:
                        r = await client.post(NEXT, content=body, headers=headers)
                    except httpx.HTTPError as e:
                        errors.append(repr(e))
                        continue
                    if t0 >= measure_from:
                        lat.append(time.perf_counter() - p0)
                        codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1

            await asyncio.gather(*(one() for _ in range(conns)))

    await asyncio.sleep(0)
    ru0: resource.struct_rusage | None = None

    async def cpu_mark() -> None:
        nonlocal ru0
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        ru0 = resource.getrusage(resource.RUSAGE_SELF)

    marker = asyncio.ensure_future(cpu_mark())
    if a["client"] == "httpx":
        await httpx_conns()
    else:
        await asyncio.gather(*(raw_conn() for _ in range(conns)))
    await marker
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    assert ru0 is not None
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"latencies": lat.tobytes(), "codes": codes, "errors": errors[:20], "error_count": len(errors),
            "cpu": cpu}


def _split_raw(req: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = req.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode().split("\r\n")[1:]:
        k, _, v = line.partition(": ")
        if k.lower() not in ("host", "content-length"):
            headers[k] = v
    return headers, body


def run_load(port: int, requests: list[bytes], concurrency: int, duration: float, warmup: float, procs: int,
             client: str) -> dict[str, Any]:
    """Closed-loop load from ``procs`` processes; returns polls/s, latency percentiles, status counts, CPU."""
    procs = max(1, min(procs, concurrency))
    start_at = time.time() + 1.0 + 0.2 * procs  # every process connects and waits for the same start
    jobs = []
    for i in range(procs):
        jobs.append({"port": port, "requests": requests[i::procs] or requests, "connections": concurrency // procs
                     + (1 if i < concurrency % procs else 0), "start_at": start_at, "warmup": warmup,
                     "duration": duration, "client": client})
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        results = pool.map(_gen_main, jobs)
    lat = array("d")
    codes: dict[str, int] = {}
    errors: list[str] = []
    error_count = 0
    gen_cpu = 0.0
    for r in results:
        lat.frombytes(r["latencies"])
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
        errors += r["errors"]
        error_count += r["error_count"]
        gen_cpu += r["cpu"]
    return summarize(list(lat), duration) | {"codes": codes, "errors": errors[:10], "error_count": error_count,
                                             "gen_cpu": gen_cpu / duration}


def summarize(lat: list[float], duration: float) -> dict[str, Any]:
    lat.sort()
    n = len(lat)

    def pct(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1000 if n else float("nan")

    return {"requests": n, "rps": n / duration if duration else 0.0, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if n else float("nan"),
            "mean_ms": statistics.fmean(lat) * 1000 if n else float("nan")}


# -----------------------------------------------------------------------------------------------------------
# The rollout


def make_artifact(work: Path, private_key: Path, size: int) -> Path:
    payload = work / "app.bin"
    rng = random.Random(5)
    payload.write_bytes(rng.randbytes(size // 2) + bytes(size - size // 2))
    out = work / f"{RELEASE}.mender"
    subprocess.run([sys.executable, str(REPO / "build.py"), "artifact", "write", "module-image", "--type", "vv-app",
                    "--file", str(payload), "--name", RELEASE, "-t", DEVICE_TYPE, "--key", str(private_key),
                    "-o", str(out)], check=True, capture_output=True, cwd=REPO,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


@dataclass
class RolloutCounters:
    polls: int = 0
    polls_204: int = 0
    downloads: int = 0
    downloaded_bytes: int = 0
    reports: int = 0
    successes: int = 0
    failures_reserved: int = 0
    errors: list[str] = field(default_factory=list)
    report_lat: list[float] = field(default_factory=list)
    poll_lat: list[float] = field(default_factory=list)


async def rollout(server: ManagementClient, port: int, devs: list[SimDevice], args: argparse.Namespace
                  ) -> dict[str, Any]:
    """Every device through a phased deployment, over the device API on ``port``; the deployment is made and read
    through the management ``server``."""
    pool = Pool(port, args.rollout_concurrency)
    c = RolloutCounters()
    threshold = args.failure_threshold
    deadline = time.monotonic() + args.rollout_timeout
    range_header = f"bytes=0-{args.range_bytes - 1}" if args.range_bytes else ""

    async def device(d: SimDevice) -> None:
        await asyncio.sleep(random.random() * args.poll_interval)  # devices do not poll in lockstep
        req = d.poll_request(port)
        while True:
            if time.monotonic() > deadline:
                c.errors.append(f"device {d.index}: no deployment before the timeout")
                return
            t = time.perf_counter()
            status, _, body = await pool.request(req)
            c.poll_lat.append(time.perf_counter() - t)
            c.polls += 1
            if status == 200:
                d.busy = True
                break
            if status != 204:
                c.errors.append(f"device {d.index}: next answered {status} {body[:200]!r}")
                return
            c.polls_204 += 1
            await asyncio.sleep(args.poll_interval * random.uniform(0.8, 1.2))
        doc = json.loads(body)
        dep_id = doc["id"]
        link = urlsplit(doc["artifact"]["source"]["uri"])
        hdrs = {"Range": range_header} if range_header else {}
        status, _, data = await pool.request(http_request("GET", f"{link.path}?{link.query}", port, headers=hdrs))
        c.downloads += 1
        c.downloaded_bytes += len(data)
        if status not in ((206,) if range_header else (200,)):
            c.errors.append(f"device {d.index}: download answered {status}")
            return
        auth = {"Authorization": f"Bearer {d.token}"}
        steps = ["downloading", "installing", "rebooting", "failure" if d.fails else "success"]
        for step in steps:
            if step == "failure":
                # keep the failure ratio the server sees under the threshold at every moment: a failure is
                # sent only when (failures + 1) / (acknowledged successes + failures + 1) stays within it
                while (c.failures_reserved + 1) * 100.0 / (c.successes + c.failures_reserved + 1) > threshold:
                    if time.monotonic() > deadline:
                        c.errors.append(f"device {d.index}: failure not reported before the timeout")
                        return
                    await asyncio.sleep(0.05)
                c.failures_reserved += 1
            t = time.perf_counter()
            status, _ = await pool.json("PUT", STATUS.format(dep_id), {"status": step, "substate": f"bench {step}"},
                                        auth)
            c.report_lat.append(time.perf_counter() - t)
            c.reports += 1
            if status != 204:
                c.errors.append(f"device {d.index}: status {step} answered {status}")
                return
            if step == "success":
                c.successes += 1
                d.artifact = RELEASE
        d.busy = False

    n = len(devs)
    n_fail = int(n * args.fail_rate)
    for d in random.Random(7).sample(devs, n_fail):
        d.fails = True
    phases = [{"batch_size": 10}, {"wait_s": args.phase_wait}]
    resp = server.send_json("POST", DEPLOYMENTS, {
        "name": "bench rollout", "artifact_name": RELEASE, "all_devices": True, "phases": phases,
        "failure_threshold": threshold})
    if resp.status != 201:
        raise SystemExit(f"deployment not created: {resp}")
    dep_id = resp.headers["location"].rstrip("/").rsplit("/", 1)[-1]
    t0 = time.perf_counter()
    await asyncio.gather(*(device(d) for d in devs))
    elapsed = time.perf_counter() - t0
    stats = server.get(f"{DEPLOYMENTS}/{dep_id}/statistics").json()
    deployment = server.get(f"{DEPLOYMENTS}/{dep_id}").json()
    pool.close()
    return {"devices": n, "expected_failures": n_fail, "seconds": elapsed, "statistics": stats,
            "deployment_status": deployment["status"], "polls": c.polls, "polls_204": c.polls_204,
            "downloads": c.downloads, "downloaded_bytes": c.downloaded_bytes, "reports": c.reports,
            "reports_per_s": c.reports / elapsed, "errors": c.errors[:10], "error_count": len(c.errors),
            "reconnects": pool.reconnects,
            "report_latency": summarize(c.report_lat, elapsed), "poll_latency": summarize(c.poll_lat, elapsed)}


# -----------------------------------------------------------------------------------------------------------


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median polls/s (its own latencies and CPU), with the server's CPU time per request
    (``cpu_us``: cores used / polls per second, the median over the rounds: what a poll costs, whatever share of
    a busy machine the round got)."""
    ordered = sorted(rounds, key=lambda r: r["rps"])
    cpu_us = statistics.median(r["server_cpu"] / r["rps"] * 1e6 if r["rps"] else float("nan") for r in rounds)
    return ordered[len(ordered) // 2] | {"cpu_us": cpu_us, "rounds": [r["rps"] for r in rounds]}


def fmt_load(name: str, r: dict[str, Any], server_cpu: float) -> str:
    codes = " ".join(f"{k}:{v}" for k, v in sorted(r["codes"].items()))
    return (f"{name:28} {r['rps']:8.0f} {r['p50_ms']:7.1f} {r['p95_ms']:7.1f} {r['p99_ms']:7.1f} {r['max_ms']:7.1f}"
            f" {r['error_count']:6d} {server_cpu:6.2f} {r['gen_cpu']:6.2f}   {codes}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2000, help="devices polling in the poll benchmark")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per configuration")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    ap.add_argument("--workers", default="1,4", help="server worker counts to measure, comma separated")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (keep-alive connections)")
    ap.add_argument("--gen-procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw", help="HTTP client of the generator")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare FastAPI floor")
    ap.add_argument("--no-reports", dest="reports", action="store_false",
                    help="skip the status-report load (PUT .../status, each one a durable write)")
    ap.add_argument("--rounds", type=int, default=1, help="measure floor and server alternately this many times "
                    "each (both stay up) and report the median round and the per-round ratios: on a busy machine "
                    "one round of each is mostly noise")
    ap.add_argument("--rollout-devices", type=int, default=10_000, help="devices in the rollout (0: skip it)")
    ap.add_argument("--rollout-workers", type=int, default=1, help="server workers during the rollout")
    ap.add_argument("--rollout-concurrency", type=int, default=64, help="connections shared by rollout devices")
    ap.add_argument("--phase-wait", type=float, default=5.0, help="seconds between the 10%% and the 90%% phase")
    ap.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls that got 204")
    ap.add_argument("--fail-rate", type=float, default=0.02, help="fraction of devices that report failure")
    ap.add_argument("--failure-threshold", type=float, default=10.0, help="deployment failure threshold, %%")
    ap.add_argument("--artifact-kib", type=int, default=256, help="payload size of the artifact")
    ap.add_argument("--range-bytes", type=int, default=65536, help="bytes each device downloads (0: whole file)")
    ap.add_argument("--rollout-timeout", type=float, default=900.0)
    ap.add_argument("--fleet", default="", metavar="N[,M...]", help="whole-fleet runs (bench/_fleet.py), one per "
                    "size, e.g. 10000,100000: provision, auth, inventory, first poll, idle polls, the steady background "
                    "load, then the rollout under that load; per-request server CPU side by side (default: none)")
    ap.add_argument("--fleet-poll-interval", type=float, default=1800.0, help="fleet: seconds between one device's "
                    "background polls (mender-client's UpdatePollIntervalSeconds default): N/this polls/s")
    ap.add_argument("--inventory-interval", type=float, default=28800.0, help="fleet: seconds between one device's "
                    "inventory updates (mender-client's InventoryPollIntervalSeconds default)")
    ap.add_argument("--steady-seconds", type=float, default=30.0, help="fleet: seconds of background load alone")
    ap.add_argument("--server-arg", action="append", default=[], help="extra build.py server argument")
    ap.add_argument("--postgres", metavar="URL", help="run the servers on PostgreSQL: a new database for each on the "
                    "cluster of URL (postgresql://USER@HOST:PORT/DB, USER may create databases), dropped at the end; "
                    "default: SQLite")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server logs, databases)")
    ap.add_argument("--quick", action="store_true", help="a run of seconds that checks the bench still works: "
                    "small sizes (options given explicitly still count), no verdict against the targets")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    from artifacts import KeyType, generate_keypair

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "load": {}, "floor": {}, "reports": {}}
    admin_token = uuid.uuid4().hex
    admin = {"Authorization": f"Bearer {admin_token}"}
    private, public = generate_keypair(KeyType.ECDSA_P256, work / "release")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; database "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}; generator: {args.client} client, "
          f"{args.gen_procs} processes, {args.concurrency} connections; temp dir {work}", flush=True)
    try:
        rows: list[str] = []
        art: Path | None = None
        if workers and args.devices:
            t = time.perf_counter()
            devs = make_devices(args.devices)
            print(f"{args.devices} ed25519 device keys in {time.perf_counter() - t:.1f}s", flush=True)
        for w in workers if args.devices else []:
            label = f"{w} worker{'s' if w > 1 else ''}"
            floor = None
            if not args.no_floor:
                floor = floor_server(work / f"floor-{w}", w).start(timeout=60)
            srv = ota_server(work / f"server-{w}", w, admin_token, public, args.server_arg,
                             args.postgres).start(timeout=60)
            loop = new_loop()
            load_start = time.time()  # every device polls at least once from here on (provision's first poll)
            times = loop.run_until_complete(provision(srv.port, admin, devs))
            loop.close()
            print(f"server, {w} worker(s): " + ", ".join(f"{k} {args.devices / v:.0f}/s" for k, v in times.items()),
                  flush=True)
            rounds: dict[str, list[dict[str, Any]]] = {"floor": [], "load": []}
            for i in range(args.rounds):  # alternate, so that both see the same share of a busy machine
                for kind, proc in (("floor", floor), ("load", srv)):
                    if proc is None:
                        continue
                    reqs = [d.poll_request(proc.port) for d in devs]
                    c0 = cpu(proc)
                    r = run_load(proc.port, reqs, args.concurrency, args.duration, args.warmup, args.gen_procs,
                                 args.client)
                    r["server_cpu"] = (cpu(proc) - c0) / (args.duration + args.warmup)
                    rounds[kind].append(r)
                    name = f"{'floor' if kind == 'floor' else 'next'}, {label}"
                    rows.append(fmt_load(name + (f" #{i + 1}" if args.rounds > 1 else ""), r, r["server_cpu"]))
                    print(rows[-1], flush=True)
            if args.reports:  # status reports/s on the same server, after its poll rounds
                if art is None:
                    art = make_artifact(work, private, 4096)
                loop = new_loop()
                dep_id, _ = loop.run_until_complete(hand_out(srv, srv.port, devs, art))
                loop.close()
                reqs = [report_request(d, srv.port, dep_id) for d in devs]
                for i in range(args.rounds):
                    c0 = cpu(srv)
                    r = run_load(srv.port, reqs, args.concurrency, args.duration, args.warmup, args.gen_procs,
                                 args.client)
                    r["server_cpu"] = (cpu(srv) - c0) / (args.duration + args.warmup)
                    rounds.setdefault("reports", []).append(r)
                    rows.append(fmt_load(f"status, {label}" + (f" #{i + 1}" if args.rounds > 1 else ""), r,
                                         r["server_cpu"]))
                    print(rows[-1], flush=True)
                stats = srv.get(f"{DEPLOYMENTS}/{dep_id}/statistics").json()
                if stats.get("downloading") != len(devs):
                    raise SystemExit(f"after the reports: statistics {stats}, expected {len(devs)} downloading")
                results["reports"][str(w)] = _median_round(rounds["reports"])
            for kind, proc in (("floor", floor), ("load", srv)):
                if proc is not None:
                    proc.stop()
                    results[kind][str(w)] = _median_round(rounds[kind]) | (
                        {"provision": times, "last_seen": last_seen_written(srv, load_start)} if kind == "load" else {})
            print(f"  last seen (written in batches, the rest at shutdown): {results['load'][str(w)]['last_seen']} of "
                  f"{args.devices} devices polled", flush=True)
            if args.rounds > 1 and floor is not None:
                ratios = [n["rps"] / f["rps"] for f, n in zip(rounds["floor"], rounds["load"], strict=True)]
                results["load"][str(w)]["round_ratios"] = ratios
                results["load"][str(w)]["ratio"] = statistics.median(ratios)
        if rows:
            print(f"\npolls for {args.duration:.0f}s, {args.concurrency} in flight, {args.devices} devices"
                  f" (CPU in cores: server process tree / load generator)")
            print(f"{'':28} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
                  f" {'srvCPU':>6} {'genCPU':>6}   statuses")
            for row in rows:
                print(row)
            for w in workers:
                r = results["load"].get(str(w))
                f = results["floor"].get(str(w)) or results["floor"].get("1")
                if r and f:
                    per_round = (f" (median of {args.rounds} alternating rounds; per round: "
                                 + ", ".join(f"{x:.2f}" for x in r["round_ratios"]) + ")"
                                 if "round_ratios" in r else "")
                    print(f"  {w} worker(s): polls/s / floor ({'same workers' if str(w) in results['floor'] else '1 worker'})"
                          f" = {r.get('ratio', r['rps'] / f['rps']):.2f}{per_round}; server CPU per request: next "
                          f"{r['cpu_us']:.0f} us, floor {f['cpu_us']:.0f} us" + ("" if args.quick else
                          "; target >= 2000 polls/s with p99 < 50 ms: "
                          f"{'met' if r['rps'] >= 2000 and r['p99_ms'] < 50 else 'NOT met'}"))
                    rep = results["reports"].get(str(w))
                    if rep:
                        print(f"  {w} worker(s): status reports/s {rep['rps']:.0f} = {rep['rps'] / r['rps']:.2f} x "
                              f"polls/s, {rep['rps'] / f['rps']:.2f} x floor (p99 {rep['p99_ms']:.1f} ms); server CPU "
                              f"per report {rep['cpu_us']:.0f} us" + ("" if args.quick or args.postgres else
                              "; target >= 2000 reports/s (1 worker, SQLite): "
                              f"{'met' if rep['rps'] >= 2000 else 'NOT met'}"))
        if args.rollout_devices:
            print(f"\nrollout: {args.rollout_devices} devices, server with {args.rollout_workers} worker(s)", flush=True)
            srv = ota_server(work / "rollout", args.rollout_workers, admin_token, public, args.server_arg,
                             args.postgres).start(
                timeout=60)
            art = make_artifact(work, private, args.artifact_kib * 1024)
            loop = new_loop()
            t = time.perf_counter()
            rdevs = make_devices(args.rollout_devices)
            uploaded = srv.upload_artifact(art)
            if uploaded.status != 201:
                raise SystemExit(f"artifact upload failed: {uploaded}")
            times = loop.run_until_complete(provision(srv.port, admin, rdevs, concurrency=32))
            print(f"  {args.rollout_devices} devices ready in {time.perf_counter() - t:.1f}s (" +
                  ", ".join(f"{k} {args.rollout_devices / v:.0f}/s" for k, v in times.items()) + ")", flush=True)
            c0 = cpu(srv)
            r = loop.run_until_complete(rollout(srv, srv.port, rdevs, args))
            loop.close()
            r["server_cpu"] = (cpu(srv) - c0) / r["seconds"]
            r["provision"] = times
            srv.stop()
            results["rollout"] = r
            stats = {k: v for k, v in r["statistics"].items() if v}
            total = sum(r["statistics"].values())
            n, nf = r["devices"], r["expected_failures"]
            ok = (total == n and r["statistics"]["success"] == n - nf and r["statistics"]["failure"] == nf
                  and r["error_count"] == 0 and r["deployment_status"] == "finished")
            print(f"  total {r['seconds']:.1f}s (phase 2 starts {args.phase_wait:.0f}s in); "
                  f"status reports {r['reports']} = {r['reports_per_s']:.0f}/s "
                  f"(p50 {r['report_latency']['p50_ms']:.1f} ms, p99 {r['report_latency']['p99_ms']:.1f} ms); "
                  f"polls {r['polls']} ({r['polls_204']} answered 204); downloads {r['downloads']} "
                  f"({r['downloaded_bytes'] / 1e6:.1f} MB); server CPU {r['server_cpu']:.2f} cores")
            print(f"  statistics {stats} sum {total}; deployment {r['deployment_status']}; "
                  f"errors {r['error_count']} {r['errors'][:3]}")
            print(f"  {'OK' if ok else 'FAILED'}: expected success={n - nf} failure={nf} of {n}")
            results["rollout_ok"] = ok
        if args.fleet:
            import _fleet

            results["fleet"] = _fleet.run(sys.modules[__name__], args, work, admin_token, public, private)
            results["fleet_ok"] = results["fleet"]["ok"]
    finally:
        for p in STARTED:
            p.stop()
        drop_postgres_databases()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    res = main()
    bad = [w for w, r in res["load"].items() if r["error_count"] or set(r["codes"]) - {"204"}]
    sys.exit(1 if bad or res.get("rollout_ok") is False or res.get("fleet_ok") is False else 0)
