"""Prometheus metrics: request counts and latencies per route (an ASGI middleware), deployment outcomes, and
fleet gauges read from the database at scrape time (:class:`FleetCollector`). With several workers,
``PROMETHEUS_MULTIPROC_DIR`` (set by ``build.py server``) makes the counters add up across processes."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .db import Database, after_commit
from .lastseen import stale_clause
from .models import deployments, devices
from .timeutil import now

#: ``stale_after`` of a database nobody configured (the settings' default)
DEFAULT_STALE_AFTER = 3 * 3600.0
#: the running version, as the device reports it in its inventory
running_artifact = devices.c.inventory["artifact_name"].as_string()

REQUESTS = Counter("ota_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("ota_http_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
#: of the ``next`` polls counted in REQUESTS (labelled with the route's path either way), those answered by the
#: poll shortcut (:mod:`.fastpoll`) instead of the route
CONFIG_REVERTS = Counter("ota_config_reverts_total", "Configurations that devices reported reverted (their health "
                         "checks failed after the change), each device and configuration hash counted once")
FAST_POLLS = Counter("ota_fast_polls_total", "next polls answered 204 by the idle-poll shortcut, before the route")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], path, str(status)).inc()
            LATENCY.labels(path).observe(time.perf_counter() - start)


#: final per-device statuses of deployments, counted when a device reaches one (after the commit that stored it)
OUTCOMES = Counter("ota_deployment_device_outcomes_total", "Devices that reached a final status in a deployment",
                   ["status"])

#: running versions exported by name in ``ota_devices_by_version``; the rest add up under :data:`OTHER`
TOP_VERSIONS = 20
OTHER = "other"
#: artifact names come from devices: longer ones are cut (and counted together) in the label
LABEL_MAX = 128
#: seconds a scrape's gauges are reused: two Prometheus servers, or a retried scrape, cost one set of queries
CACHE_SECONDS = 10.0


def count_outcome(conn: sa.Connection, status: str, n: int = 1) -> None:
    """Count ``n`` devices reaching the final ``status`` once the transaction of ``conn`` commits."""
    after_commit(conn, lambda: OUTCOMES.labels(status).inc(n))


class FleetCollector(Collector):
    """Fleet gauges read from the database at scrape time, whichever worker answers (the database is the one
    truth every process shares, so unlike the counters they need no multiprocess files). Three statements: one
    pass over ``devices`` grouped by status (with how many reported a version and how many are stale), the
    top versions of accepted devices, deployments by status; the result is kept :data:`CACHE_SECONDS`."""

    def __init__(self, db: Database, stale_after: float, cache_seconds: float = CACHE_SECONDS) -> None:
        self.db = db
        self.stale_after = stale_after
        self.cache_seconds = cache_seconds
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            t = time.monotonic()
            if self._cached is None or t - self._cached[0] >= self.cache_seconds:
                self._cached = (t, self._read())
            families = self._cached[1]
        yield from families

    def _read(self) -> list[GaugeMetricFamily]:
        dev = GaugeMetricFamily("ota_devices", "Devices by status", labels=["status"])
        stale = GaugeMetricFamily("ota_devices_stale", "Accepted devices not heard from for stale_after")
        versions = GaugeMetricFamily("ota_devices_by_version", "Accepted devices by the artifact_name they run "
                                     f"(inventory), the {TOP_VERSIONS} most common by name, the rest as '{OTHER}'",
                                     labels=["artifact_name"])
        depl = GaugeMetricFamily("ota_deployments", "Deployments by status", labels=["status"])
        cutoff = now() - self.stale_after
        is_stale = sa.case((stale_clause(cutoff), 1), else_=0)
        with self.db.read() as c:
            reporting = stale_count = 0
            for status, n, with_version, n_stale in c.execute(
                    sa.select(devices.c.status, sa.func.count(), sa.func.count(running_artifact),
                              sa.func.coalesce(sa.func.sum(is_stale), 0)).group_by(devices.c.status)):
                dev.add_metric([status], n)
                stale_count += int(n_stale)
                if status == "accepted":
                    reporting = int(with_version)
            top = c.execute(sa.select(running_artifact, sa.func.count().label("n"))
                            .where(devices.c.status == "accepted", running_artifact.is_not(None))
                            .group_by(running_artifact).order_by(sa.desc("n"), running_artifact)
                            .limit(TOP_VERSIONS)).all()
            for status, n in c.execute(sa.select(deployments.c.status, sa.func.count())
                                       .group_by(deployments.c.status)):
                depl.add_metric([status], n)
        stale.add_metric([], stale_count)
        by_label: dict[str, int] = {OTHER: reporting - sum(int(n) for _, n in top)}
        for name, n in top:
            label = name if len(name) <= LABEL_MAX else name[:LABEL_MAX - 1] + "…"
            by_label[label] = by_label.get(label, 0) + int(n)
        for label, n in sorted(by_label.items()):
            versions.add_metric([label], n)
        return [dev, stale, versions, depl]


_COLLECTORS: weakref.WeakKeyDictionary[Database, FleetCollector] = weakref.WeakKeyDictionary()


def configure(db: Database, stale_after: float, cache_seconds: float = CACHE_SECONDS) -> FleetCollector:
    """The fleet gauges of the server whose database is ``db`` (made once per worker, with its settings)."""
    collector = _COLLECTORS[db] = FleetCollector(db, stale_after, cache_seconds)
    return collector


def render(db: Database) -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        data = generate_latest(REGISTRY)
    return data + generate_latest(_fleet_registry(db)), CONTENT_TYPE_LATEST


def _fleet_registry(db: Database) -> CollectorRegistry:
    r = CollectorRegistry(auto_describe=False)
    r.register(_COLLECTORS.get(db) or configure(db, DEFAULT_STALE_AFTER))
    return r
