"""``bench/server.py --fleet N[,M...]``: a whole fleet of N devices on one server, start to finish, for each size.

For every size a fresh ``build.py server`` (``--rollout-workers`` workers; with ``--postgres URL`` a new database
on that cluster) gets one signed artifact, then the fleet goes through these phases, each timed, each with the
CPU the server's process tree took in it (and, when the cluster runs on this machine, the PostgreSQL backends
serving its database: other databases on the cluster are not counted, nor are its shared processes):

1. **provision**: every device registered by the factory path, ``POST .../devauth/devices/provision`` in batches
   of 1,000 (what ``build.py provision`` sends): preauthorized with its ed25519 key;
2. **auth**: every device sends a signed auth request and gets its token (a JWT), as at its first start;
3. **inventory**: every device sends its inventory, ``PATCH /api/devices/v1/inventory/device/attributes``
   (ten attributes, as the Mender client's inventory scripts give);
4. **first poll**: every device asks ``next`` once (its provides are recorded);
5. **idle polls**: the hot path at saturation: ``--concurrency`` polls in flight from ``--gen-procs`` processes
   for ``--duration`` s, devices taken round robin over the whole fleet (every answer a 204);
6. **steady**: ``--steady-seconds`` of the fleet's own background load only: each device polls every
   ``--fleet-poll-interval`` s (mender-client's ``UpdatePollIntervalSeconds`` default, 1800) and sends its
   inventory every ``--inventory-interval`` s (``InventoryPollIntervalSeconds``, 28800), spread evenly: N/1800
   polls/s, open loop (sent on schedule, whatever the answers' latency);
7. **rollout**: bench/server.py's phased rollout (10 % at once, the rest ``--phase-wait`` s later; every device
   polls every ``--poll-interval`` s until it gets the deployment, downloads ``--range-bytes`` with a Range
   request through the signed link, reports downloading, installing, rebooting, success or failure) while the
   steady background load of step 6 goes on. A background poll comes from an idle device with its current
   provides (the new release once it succeeded); one that finds the deployment waiting is answered 200 like
   any poll, and is counted as such. The deployment's statistics must count exactly every device.

Per-request server CPU (the phase's server CPU over its requests; for the rollout, over its devices) is printed
for every size side by side, with the ratio of the largest size to the smallest: a hot path that stays flat as
the fleet grows has a ratio near 1. Also printed: the server's peak memory (``VmHWM`` of each process: the
largest and the sum over the supervisor and its workers) and the database's size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
import types
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROVISION = "/api/management/v2/devauth/devices/provision"
INVENTORY = "/api/devices/v1/inventory/device/attributes"
BATCH = 1000  # ota_server.provisioning.MAX_ITEMS


# -----------------------------------------------------------------------------------------------------------
# Processes: CPU (with reaped children: PostgreSQL's backends come and go) and peak memory, from /proc


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of the process and of its children it has waited for)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rfind(")") + 2:].split()
        out[int(d)] = (int(f[1]), sum(int(x) for x in f[11:15]) / tick)
    return out


def tree_pids(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    table = _proc_table() if table is None else table
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in table:
            found.append(p)
            todo += [c for c, (ppid, _) in table.items() if ppid == p]
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process tree, children already reaped included."""
    table = _proc_table()
    return sum(table[p][1] for p in tree_pids(pid, table))


def pids_cpu(pids: dict[int, float]) -> dict[int, float]:
    """CPU seconds of each of these processes (one that ended keeps its last value)."""
    table = _proc_table()
    return {p: table[p][1] if p in table else last for p, last in pids.items()}


def tree_memory(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process tree, MB: the largest process and the sum."""
    hwm, rss = [], []
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        vals = {k: int(v.split()[0]) / 1024 for k, _, v in (ln.partition(":") for ln in status.splitlines())
                if k in ("VmHWM", "VmRSS")}
        hwm.append(vals.get("VmHWM", 0.0))
        rss.append(vals.get("VmRSS", 0.0))
    return {"processes": len(hwm), "peak_max_mb": max(hwm, default=0.0), "peak_sum_mb": sum(hwm),
            "rss_sum_mb": sum(rss)}


def postgres_backends(url: str) -> list[int] | None:
    """The pids of the PostgreSQL backends serving the database of ``url`` (the server's pooled connections), when
    the cluster runs on this machine (a throwaway local cluster: its postmaster.pid is readable); else None (then
    PostgreSQL's CPU is not measured). Other databases on the same cluster are not counted."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
            assert row is not None
            int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid()").fetchall()
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None
    return [int(r[0]) for r in rows]


def database_mb(url: str) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0]) / 1e6


# -----------------------------------------------------------------------------------------------------------
# Load shapes


@dataclass
class Phase:
    """One phase's requests: latencies (s), status counts, errors."""

    lat: array[float] = field(default_factory=lambda: array("d"))
    codes: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def note(self, status: int, seconds: float, expected: tuple[int, ...], what: str) -> None:
        self.lat.append(seconds)
        self.codes[status] = self.codes.get(status, 0) + 1
        if status not in expected:
            self.errors.append(f"{what}: {status}")

    @property
    def requests(self) -> int:
        return len(self.lat)


async def closed_loop(items: list[Any], concurrency: int, one: Any) -> None:
    """``one(item)`` for every item, ``concurrency`` at a time."""
    it = iter(items)

    async def worker() -> None:
        for x in it:
            await one(x)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def inventory_body(d: Any, artifact: str) -> list[dict[str, str]]:
    """What mender-client's inventory scripts send, give or take: ten attributes."""
    i = d.index
    return [{"name": "device_type", "value": "raspberrypi4"}, {"name": "artifact_name", "value": artifact},
            {"name": "rootfs-image.version", "value": artifact},
            {"name": "hostname", "value": d.identity["device_id"]},
            {"name": "mac_eth0", "value": f"02:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}:01"},
            {"name": "ipv4_eth0", "value": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/8"},
            {"name": "kernel", "value": "Linux version 6.1.0-28-arm64 (debian-kernel@lists.debian.org)"},
            {"name": "os", "value": "Debian GNU/Linux 12 (bookworm)"},
            {"name": "cpu_model", "value": "Cortex-A72"}, {"name": "mem_total_kB", "value": "3884096"}]


class Background:
    """The fleet's steady load, open loop: each device polls every ``poll_interval`` s and sends its inventory
    every ``inventory_interval`` s, spread evenly over the fleet (devices taken round robin, in a shuffled
    order). Devices in the middle of an update (``d.busy``) are skipped, as a Mender client does not poll then."""

    def __init__(self, bench: types.ModuleType, port: int, devs: list[Any], poll_interval: float,
                 inventory_interval: float, connections: int = 8) -> None:
        self.bench = bench
        self.port = port
        self.devs = random.Random(3).sample(devs, len(devs))
        self.rates = (len(devs) / poll_interval, len(devs) / inventory_interval)
        self.pool = bench.Pool(port, connections)
        self.polls = Phase()
        self.inventory = Phase()
        self.late = 0  # requests still waiting for a connection when the next tick came due
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.seconds = 0.0

    async def _poll(self, d: Any) -> None:
        t = time.perf_counter()
        status, _, _ = await self.pool.request(d.poll_request(self.port))
        self.polls.note(status, time.perf_counter() - t, (200, 204), f"background poll of device {d.index}")

    async def _inventory(self, d: Any) -> None:
        t = time.perf_counter()
        status, _ = await self.pool.json("PATCH", INVENTORY, inventory_body(d, d.artifact),
                                         {"Authorization": f"Bearer {d.token}"})
        self.inventory.note(status, time.perf_counter() - t, (200,), f"background inventory of device {d.index}")

    async def _run(self) -> None:
        t0 = time.perf_counter()
        sent = [0, 0]
        cursor = [0, len(self.devs) // 2]
        while not self._stop.is_set():
            elapsed = time.perf_counter() - t0
            for k, send in enumerate((self._poll, self._inventory)):
                due = int(self.rates[k] * elapsed) - sent[k]
                for _ in range(max(0, due)):
                    sent[k] += 1
                    for _ in range(len(self.devs)):  # the next idle device
                        d = self.devs[cursor[k] % len(self.devs)]
                        cursor[k] += 1
                        if not d.busy:
                            break
                    else:
                        continue
                    if len(self._inflight) > 4 * self.pool.size:
                        self.late += 1
                    task = asyncio.ensure_future(send(d))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)
        if self._inflight:
            await asyncio.gather(*self._inflight)
        self.seconds = time.perf_counter() - t0

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        self.pool.close()


# -----------------------------------------------------------------------------------------------------------
# One fleet


def make_fleet(bench: types.ModuleType, n: int) -> list[Any]:
    """``n`` devices with ed25519 keys and a ``device_id`` identity (what ``build.py provision`` registers)."""
    devices: list[Any] = bench.make_devices(n, lambda run, i: {"device_id": f"f{run}-{i:06d}"})
    return devices


@dataclass
class Meter:
    """CPU of the server and of the PostgreSQL backends serving its database between two marks (backends are
    looked up at each mark: the pool opens connections as it needs them)."""

    server_pid: int
    db_url: str | None
    t: float = 0.0
    srv: float = 0.0
    pg: dict[int, float] = field(default_factory=dict)

    def _backends(self) -> dict[int, float]:
        pids = postgres_backends(self.db_url) if self.db_url else None
        return pids_cpu(dict.fromkeys(pids or [], 0.0))

    def mark(self) -> None:
        self.t, self.srv, self.pg = time.perf_counter(), tree_cpu(self.server_pid), self._backends()

    def since(self) -> dict[str, float]:
        t, srv = time.perf_counter(), tree_cpu(self.server_pid)
        now = pids_cpu(self.pg | self._backends())  # a backend gone since the mark keeps its value then
        pg = sum(v - self.pg.get(p, 0.0) for p, v in now.items())
        return {"seconds": t - self.t, "server_cpu_s": srv - self.srv, "pg_cpu_s": pg}


def phase_result(m: dict[str, float], ph: Phase, count: int | None = None) -> dict[str, Any]:
    """A phase's numbers; ``count``: what the CPU is divided by (default: its requests)."""
    n = ph.requests if count is None else count
    lat = sorted(ph.lat)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return m | {"requests": ph.requests, "per_s": ph.requests / m["seconds"] if m["seconds"] else 0.0,
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "codes": {str(k): v for k, v in ph.codes.items()},
                "errors": ph.errors[:5], "error_count": len(ph.errors),
                "server_cpu_ms_per": m["server_cpu_s"] * 1000 / n if n else float("nan"),
                "pg_cpu_ms_per": m["pg_cpu_s"] * 1000 / n if n else float("nan")}


async def fleet_start(bench: types.ModuleType, srv: Any, admin: dict[str, str], devs: list[Any], meter: Meter,
                      concurrency: int) -> dict[str, dict[str, Any]]:
    """Phases 1-4: provision, auth, inventory, first poll."""
    port = srv.port
    pool = bench.Pool(port, concurrency)
    out: dict[str, dict[str, Any]] = {}

    async def provision(batch: list[Any]) -> None:
        t = time.perf_counter()
        status, body = await pool.json("POST", PROVISION, {"devices": [
            {"identity_data": d.identity, "pubkey": d.pubkey, "group": None} for d in batch]}, admin)
        ph.note(status, time.perf_counter() - t, (200, 201), f"provision batch: {str(body)[:200]}")

    async def auth(d: Any) -> None:
        t = time.perf_counter()
        status, _, body = await pool.request(d.auth_request(port))
        ph.note(status, time.perf_counter() - t, (200,), f"auth of device {d.index}")
        d.token = body.decode() if status == 200 else ""

    async def inventory(d: Any) -> None:
        t = time.perf_counter()
        status, _ = await pool.json("PATCH", INVENTORY, inventory_body(d, d.artifact),
                                    {"Authorization": f"Bearer {d.token}"})
        ph.note(status, time.perf_counter() - t, (200,), f"inventory of device {d.index}")

    async def poll(d: Any) -> None:
        t = time.perf_counter()
        status, _, _ = await pool.request(d.poll_request(port))
        ph.note(status, time.perf_counter() - t, (204,), f"first poll of device {d.index}")

    batches = [devs[i:i + BATCH] for i in range(0, len(devs), BATCH)]
    for name, items, fn, conc in (("provision", batches, provision, 2), ("auth", devs, auth, concurrency),
                                  ("inventory", devs, inventory, concurrency), ("first poll", devs, poll, concurrency)):
        ph = Phase()
        meter.mark()
        await closed_loop(items, conc, fn)
        out[name] = phase_result(meter.since(), ph, len(devs))
        r = out[name]
        print(f"    {name:10} {r['seconds']:7.1f} s  {len(devs) / r['seconds']:7.0f} devices/s  p99 {r['p99_ms']:7.1f} ms"
              f"  server CPU {r['server_cpu_ms_per']:6.3f} ms/device  PostgreSQL {r['pg_cpu_ms_per']:6.3f} ms/device"
              f"  errors {r['error_count']} {r['errors'][:2]}", flush=True)
        if r["error_count"]:
            raise SystemExit(f"{name}: {r['error_count']} errors, e.g. {r['errors'][:3]}")
    pool.close()
    return out


def one_fleet(bench: types.ModuleType, n: int, args: argparse.Namespace, work: Path, admin_token: str,
              public: Path, art: Path) -> dict[str, Any]:
    admin = {"Authorization": f"Bearer {admin_token}"}
    srv = bench.ota_server(work / f"fleet-{n}", args.rollout_workers, admin_token, public, args.server_arg,
                           args.postgres).start(timeout=60)
    assert srv.proc is not None
    meter = Meter(srv.proc.pid, srv.db_url if args.postgres else None)
    res: dict[str, Any] = {"devices": n}
    t = time.perf_counter()
    devs = make_fleet(bench, n)
    print(f"  fleet of {n}: {n} ed25519 keys in {time.perf_counter() - t:.1f} s (generator side)", flush=True)
    uploaded = srv.upload_artifact(art)
    if uploaded.status != 201:
        raise SystemExit(f"artifact upload failed: {uploaded}")
    loop = bench.new_loop()
    try:
        phases = loop.run_until_complete(fleet_start(bench, srv, admin, devs, meter, args.rollout_concurrency))

        # 5: the idle poll at saturation (generator processes; its CPU is theirs)
        reqs = [d.poll_request(srv.port) for d in devs]
        meter.mark()
        r = bench.run_load(srv.port, reqs, args.concurrency, args.duration, args.warmup, args.gen_procs, args.client)
        m = meter.since()
        busy = args.duration + args.warmup  # the CPU mark covers the warm-up too; the polls counted do not
        polls = r["rps"] * busy
        phases["idle polls"] = m | {"requests": r["requests"], "per_s": r["rps"], "p50_ms": r["p50_ms"],
                                    "p99_ms": r["p99_ms"], "codes": r["codes"], "error_count": r["error_count"],
                                    "errors": r["errors"], "server_cpu_ms_per": m["server_cpu_s"] * 1000 / polls,
                                    "pg_cpu_ms_per": m["pg_cpu_s"] * 1000 / polls}
        p = phases["idle polls"]
        print(f"    idle polls {p['per_s']:7.0f} polls/s  p99 {p['p99_ms']:6.1f} ms  server CPU "
              f"{p['server_cpu_ms_per'] * 1000:5.0f} us/poll  PostgreSQL {p['pg_cpu_ms_per'] * 1000:5.0f} us/poll  "
              f"statuses {p['codes']}", flush=True)
        if r["error_count"] or set(r["codes"]) - {"204"}:
            raise SystemExit(f"idle polls: statuses {r['codes']}, errors {r['errors'][:3]}")

        # 6: the steady background alone
        async def steady() -> Background:
            bg = Background(bench, srv.port, devs, args.fleet_poll_interval, args.inventory_interval)
            bg.start()
            await asyncio.sleep(args.steady_seconds)
            await bg.stop()
            return bg

        meter.mark()
        bg = loop.run_until_complete(steady())
        m = meter.since()
        phases["steady"] = phase_result(m, bg.polls, bg.polls.requests + bg.inventory.requests) | {
            "inventory": bg.inventory.requests, "late": bg.late,
            "server_cores": m["server_cpu_s"] / m["seconds"], "pg_cores": m["pg_cpu_s"] / m["seconds"]}
        s = phases["steady"]
        print(f"    steady     {s['seconds']:7.1f} s  {s['requests'] / s['seconds']:6.1f} polls/s + "
              f"{s['inventory'] / s['seconds']:.1f} inventory/s (target {bg.rates[0]:.1f} + {bg.rates[1]:.2f})  "
              f"p99 {s['p99_ms']:.1f} ms  server {s['server_cores']:.3f} cores, PostgreSQL {s['pg_cores']:.3f} cores",
              flush=True)
        if bg.polls.errors or bg.inventory.errors:
            raise SystemExit(f"steady: {bg.polls.errors[:3]} {bg.inventory.errors[:3]}")

        # 7: the rollout, with the background going on
        async def rollout() -> tuple[dict[str, Any], Background]:
            bg = Background(bench, srv.port, devs, args.fleet_poll_interval, args.inventory_interval)
            bg.start()
            r = await bench.rollout(srv, srv.port, devs, args)
            await bg.stop()
            return r, bg

        meter.mark()
        roll, bg = loop.run_until_complete(rollout())
    finally:
        loop.close()
    m = meter.since()
    stats = roll["statistics"]
    nf = roll["expected_failures"]
    ok = (sum(stats.values()) == n and stats["success"] == n - nf and stats["failure"] == nf
          and roll["error_count"] == 0 and roll["deployment_status"] == "finished"
          and not bg.polls.errors and not bg.inventory.errors)
    phases["rollout"] = m | {
        "requests": roll["polls"] + roll["downloads"] + roll["reports"] + bg.polls.requests + bg.inventory.requests,
        "server_cpu_ms_per": m["server_cpu_s"] * 1000 / n, "pg_cpu_ms_per": m["pg_cpu_s"] * 1000 / n,
        "polls": roll["polls"], "downloads": roll["downloads"], "reports": roll["reports"],
        "reports_per_s": roll["reports_per_s"], "report_p50_ms": roll["report_latency"]["p50_ms"],
        "report_p99_ms": roll["report_latency"]["p99_ms"], "poll_p99_ms": roll["poll_latency"]["p99_ms"],
        "background_polls": bg.polls.requests, "background_codes": {str(k): v for k, v in bg.polls.codes.items()},
        "background_inventory": bg.inventory.requests, "background_late": bg.late,
        "background_p99_ms": phase_result(m, bg.polls)["p99_ms"],
        "statistics": stats, "deployment_status": roll["deployment_status"], "error_count": roll["error_count"],
        "errors": roll["errors"] + bg.polls.errors[:3] + bg.inventory.errors[:3], "ok": ok}
    r = phases["rollout"]
    print(f"    rollout    {r['seconds']:7.1f} s  reports {r['reports']} at {r['reports_per_s']:.0f}/s (p99 "
          f"{r['report_p99_ms']:.1f} ms), polls {r['polls']}, downloads {r['downloads']}; background "
          f"{r['background_polls']} polls {r['background_codes']} + {r['background_inventory']} inventory; server CPU "
          f"{r['server_cpu_ms_per']:.3f} ms/device, PostgreSQL {r['pg_cpu_ms_per']:.3f} ms/device", flush=True)
    print(f"    statistics {{{', '.join(f'{k}={v}' for k, v in stats.items() if v)}}} sum {sum(stats.values())}; "
          f"deployment {r['deployment_status']}; {'OK' if ok else 'FAILED'}: expected success={n - nf} "
          f"failure={nf}; errors {r['error_count']} {r['errors'][:3]}", flush=True)
    res["memory"] = tree_memory(srv.proc.pid)
    res["database_mb"] = database_mb(srv.db_url) if args.postgres else None
    srv.stop()
    res["phases"] = phases
    res["ok"] = ok
    res["wall_s"] = sum(p["seconds"] for p in phases.values())
    return res


ROWS = (("provision", "provision (batches of 1,000)", "device"), ("auth", "auth request -> JWT", "device"),
        ("inventory", "inventory PATCH", "device"), ("first poll", "first poll", "device"),
        ("idle polls", "idle poll, saturated", "poll"), ("steady", "steady background", "request"),
        ("rollout", "rollout + background", "device"))


def run(bench: types.ModuleType, args: argparse.Namespace, work: Path, admin_token: str, public: Path,
        private: Path) -> dict[str, Any]:
    """Every size of ``args.fleet``; prints the comparison table. Returns ``{"sizes": {n: result}, "ok": bool}``."""
    sizes = [int(s) for s in args.fleet.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--fleet: give device counts, not {args.fleet!r}")
    art = bench.make_artifact(work, private, args.artifact_kib * 1024)
    out: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        print(f"\nfleet of {n} devices, server with {args.rollout_workers} worker(s), "
              f"{'PostgreSQL' if args.postgres else 'SQLite'}; load average {os.getloadavg()[0]:.2f}", flush=True)
        out["sizes"][str(n)] = one_fleet(bench, n, args, work, admin_token, public, art)
    res = [out["sizes"][str(n)] for n in sizes]
    lo, hi = res[0], res[-1]
    print(f"\nfleet: wall time per phase, server CPU per {'/'.join(sorted({u for _, _, u in ROWS}))} "
          f"(ms; PostgreSQL's in brackets), ratio {hi['devices']} / {lo['devices']}")
    print(f"{'':34}" + "".join(f" {r['devices']:>22,}" for r in res) + "   ratio")
    for key, label, unit in ROWS:
        cells = "".join(f" {r['phases'][key]['seconds']:6.0f}s {r['phases'][key]['server_cpu_ms_per']:6.3f}"
                        f" [{r['phases'][key]['pg_cpu_ms_per']:5.3f}]" for r in res)
        a, b = lo["phases"][key]["server_cpu_ms_per"], hi["phases"][key]["server_cpu_ms_per"]
        print(f"{label + ' /' + unit:34}{cells}   {b / a if a else float('nan'):5.2f}")
    for r in res:
        mem = r["memory"]
        print(f"  {r['devices']:,} devices: {r['wall_s']:.0f} s in all; server peak RSS {mem['peak_max_mb']:.0f} MB "
              f"(largest process), {mem['peak_sum_mb']:.0f} MB summed over {mem['processes']} processes"
              + (f"; database {r['database_mb']:.0f} MB" if r["database_mb"] is not None else ""))
    out["ok"] = all(r["ok"] for r in res)
    print(f"fleet statistics exact for every size: {'OK' if out['ok'] else 'FAILED'}")
    return out

