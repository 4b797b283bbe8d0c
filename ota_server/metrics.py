"""Prometheus metrics: request counts and latencies per route (an ASGI middleware) and fleet gauges read
from the database at scrape time. With several workers, ``PROMETHEUS_MULTIPROC_DIR`` (set by
``build.py server``) makes the counters add up across processes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .db import Database
from .models import deployments, devices

REQUESTS = Counter("ota_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("ota_http_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
#: of the ``next`` polls counted in REQUESTS (labelled with the route's path either way), those answered by the
#: poll shortcut (:mod:`.fastpoll`) instead of the route
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


class FleetCollector(Collector):
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Any]:
        dev = GaugeMetricFamily("ota_devices", "Devices by status", labels=["status"])
        depl = GaugeMetricFamily("ota_deployments", "Deployments by status", labels=["status"])
        with self.db.read() as c:
            for status, n in c.execute(sa.select(devices.c.status, sa.func.count()).group_by(devices.c.status)):
                dev.add_metric([status], n)
            for status, n in c.execute(sa.select(deployments.c.status, sa.func.count())
                                       .group_by(deployments.c.status)):
                depl.add_metric([status], n)
        yield dev
        yield depl


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
    r.register(FleetCollector(db))
    return r
