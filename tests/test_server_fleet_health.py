"""Seeing the fleet from the server (``build.py server`` as a subprocess, SQLite and PostgreSQL, short
``OTA_STALE_AFTER`` and ``OTA_LAST_SEEN_FLUSH``): a device that stops polling becomes stale in the management
API (``last_seen``, ``stale``, the ``stale`` filter), on the dashboard (badge, count) and in ``/metrics``
(``ota_devices_stale``), next to the version gauge and the deployment outcome counters.

The story: a camera loses power in a lobby. It sent no error and nothing changed in its inventory, so before
this it looked exactly like its neighbours; now it is listed as stale three polls' worth of time later."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import BUILD_PY, REPO
from .server_helpers import Device, Server, deploy, upload, write_artifact

DEVAUTH = "/api/management/v2/devauth/devices"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
STALE_AFTER = 3.0
FLUSH = 0.2


@dataclass
class Fleet:
    server: Server
    alive: Device  # keeps polling
    lost: Device  # stopped polling
    new: Device  # stopped polling too (already ran the new version)
    ids: dict[str, str]  # role -> device id


def _run_cli(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python build.py ...`` (the ``run_cli`` fixture's, usable by a module-scoped fixture)."""
    return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, check=check)


@pytest.fixture(scope="module")
def fleet(db_url: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-health")
    server = Server(tmp / "server", "--allow-unsigned", db_url=db_url,
                    env={"OTA_STALE_AFTER": f"{STALE_AFTER:g}s", "OTA_LAST_SEEN_FLUSH": f"{FLUSH}"}).start()
    try:
        assert upload(server, write_artifact(_run_cli, tmp / "vv-2.0.mender", "vv-2.0")).status_code == 201
        alive, lost, new = (Device(server, "ed25519") for _ in range(3))
        ids = {"alive": alive.accept(), "lost": lost.accept(), "new": new.accept()}
        for d, version in ((alive, "vv-1.0"), (lost, "vv-1.0"), (new, "vv-2.0")):
            assert d.next(version).status_code == 204
        rollout = deploy(server, name="spring", artifact_name="vv-2.0", devices=[ids["alive"], ids["new"]])
        assert alive.next("vv-1.0").status_code == 200
        for status in ("downloading", "installing", "rebooting", "success"):
            assert alive.status(rollout, status).status_code == 204
        assert new.next("vv-2.0").status_code == 204  # already runs it: already-installed
        doomed = deploy(server, name="doomed", artifact_name="vv-2.0", devices=[ids["lost"]])
        with server.admin() as a:
            assert a.put(f"{DEPLOYMENTS}/{doomed}/status", json={"status": "aborted"}).status_code == 204
        # the lost and the new device fall silent; the alive one keeps polling past stale_after
        deadline = time.monotonic() + STALE_AFTER + 1
        while time.monotonic() < deadline:
            assert alive.next("vv-2.0").status_code == 204
            time.sleep(0.3)
        time.sleep(FLUSH * 3)
        yield Fleet(server, alive, lost, new, ids)
    finally:
        server.stop()


def _keep_alive(fleet: Fleet) -> None:
    """The alive device polls again, and its flush lands, before the caller looks."""
    assert fleet.alive.next("vv-2.0").status_code == 204
    time.sleep(FLUSH * 4)


def _list(fleet: Fleet, **params: str) -> dict[str, dict[str, Any]]:
    with fleet.server.admin() as a:
        r = a.get(DEVAUTH, params=params)
    assert r.status_code == 200, r.text
    return {d["id"]: d for d in r.json()}


def test_a_silent_device_becomes_stale(fleet: Fleet) -> None:
    _keep_alive(fleet)
    everyone = _list(fleet)
    alive, lost = everyone[fleet.ids["alive"]], everyone[fleet.ids["lost"]]
    assert alive["stale"] is False and lost["stale"] is True and everyone[fleet.ids["new"]]["stale"] is True
    assert alive["last_seen"] > lost["last_seen"]  # RFC 3339 in UTC: ordered as text
    assert set(_list(fleet, stale="true")) == {fleet.ids["lost"], fleet.ids["new"]}
    assert set(_list(fleet, stale="false")) == {fleet.ids["alive"]}
    assert set(_list(fleet, stale="true", status="accepted")) == {fleet.ids["lost"], fleet.ids["new"]}
    with fleet.server.admin() as a:
        detail = a.get(f"{DEVAUTH}/{fleet.ids['lost']}").json()
        assert detail["stale"] is True and detail["last_seen"] == lost["last_seen"]
        assert a.get(DEVAUTH, params={"stale": "maybe"}).status_code == 400


def test_a_request_makes_a_stale_device_fresh_again(fleet: Fleet) -> None:
    """Anything the device asks (here its configuration) counts, not only polls."""
    r = fleet.new.http.get("/api/devices/v1/deviceconfig/configuration", headers=fleet.new.headers)
    assert r.status_code == 200
    time.sleep(FLUSH * 4)
    assert _list(fleet)[fleet.ids["new"]]["stale"] is False
    deadline = time.monotonic() + STALE_AFTER + 5
    while _list(fleet)[fleet.ids["new"]]["stale"] is False:  # silent again: stale again
        assert time.monotonic() < deadline, "the device did not become stale again"
        time.sleep(0.5)


def _page(fleet: Fleet, path: str) -> str:
    with fleet.server.admin() as a:
        r = a.get(path)
    assert r.status_code == 200, (path, r.text[:2000])
    return r.text


def _count(html: str, element_id: str) -> int:
    m = re.search(rf'id="{element_id}">(\d+)<', html)
    assert m, element_id
    return int(m.group(1))


def test_the_dashboard_marks_stale_devices(fleet: Fleet) -> None:
    _keep_alive(fleet)
    html = _page(fleet, "/ui/")
    assert _count(html, "count-stale") == 2
    assert f'id="stale-{fleet.ids["lost"]}"' in html and f'id="stale-{fleet.ids["alive"]}"' not in html
    stale_only = _page(fleet, "/ui/?stale=true")
    assert set(re.findall(r'href="/ui/devices/([0-9a-f-]{36})"', stale_only)) == {fleet.ids["lost"], fleet.ids["new"]}
    assert 'id="stale-badge"' in _page(fleet, f"/ui/devices/{fleet.ids['lost']}")
    assert 'id="stale-badge"' not in _page(fleet, f"/ui/devices/{fleet.ids['alive']}")


def test_metrics(fleet: Fleet) -> None:
    """Gauges from the database (whoever scrapes, whichever worker answers) and the outcome counters, parsed
    with Prometheus' own parser."""
    _keep_alive(fleet)
    with fleet.server.admin() as a:
        r = a.get("/metrics")
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("ota_devices", (("status", "accepted"),))] == 3
    assert samples[("ota_devices_stale", ())] == 2
    versions = {dict(k[1])["artifact_name"]: v for k, v in samples.items() if k[0] == "ota_devices_by_version"}
    assert versions == {"vv-2.0": 2, "vv-1.0": 1, "other": 0}
    outcomes = {dict(k[1])["status"]: v for k, v in samples.items() if k[0] == "ota_deployment_device_outcomes_total"}
    assert outcomes == {"success": 1, "already-installed": 1, "aborted": 1, "failure": 0, "noartifact": 0,
                        "decommissioned": 0}


@pytest.mark.slow
def test_chromium_shows_the_stale_badge(fleet: Fleet, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from .test_dashboard import SCREENSHOTS, _group_alive, _kill_group, chromium_binary, fetch, run_chromium

    live: list[int] = []
    request.addfinalizer(lambda: [_kill_group(pid) for pid in live])  # type: ignore[func-returns-value]
    _keep_alive(fleet)
    s = fleet.server
    r = fetch(s, "/ui/login-link?" + urllib.parse.urlencode({"next": "/ui/"}), method="POST", bearer=s.admin_token)
    assert r.status == 200, r
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # the alive device keeps polling while the browser starts: on a loaded machine that takes longer than
    # stale_after (3 s here), and a device that polls is not stale (CI once saw it turn stale meanwhile)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.3):
            fleet.alive.next("vv-2.0")

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        dom = run_chromium(chromium_binary(), tmp_path / "profile", s.url + r.json()["url"],
                           SCREENSHOTS / f"stale-{'pg' if s.db_url.startswith('postgresql') else 'sqlite'}.png", live)
    finally:
        done.set()
        poller.join()
    assert _count(dom, "count-stale") == 2
    assert f'id="stale-{fleet.ids["lost"]}"' in dom and f'id="stale-{fleet.ids["alive"]}"' not in dom
    for pid in live:
        assert not _group_alive(pid)
