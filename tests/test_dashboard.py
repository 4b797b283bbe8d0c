"""The fleet dashboard (``/ui/``) against the real server (``build.py server`` as a subprocess).

The fleet is made through the real APIs: devices sign their auth requests with the agent's own client
(``device_hooks.api.DeviceAPI``), are accepted (or rejected, or preauthorized) through the management API,
report inventory, and go through a phased deployment with a failure threshold (one success, one failure with
a log, the rollout pauses itself) and a second deployment that leaves a device ``_INCONSISTENT``. One device
sends ``<script>`` in its identity, inventory and log. The pages are checked over HTTP (content, escaping,
authentication, login/logout) and rendered by a real headless Chromium (DOM and screenshots saved to
``out/test-screenshots/``). The pages of a 10,000-device fleet: tests/test_dashboard_scale.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from device_hooks.api import DeviceAPI, Unauthorized
from devkit.client import MGMT, Response
from devkit.server import OtaServer

from .conftest import BUILD_PY, REPO, create_database, make_payload

SCREENSHOTS = REPO / "out" / "test-screenshots"
XSS_ID = '<script>document.title="pwned-identity"</script>'
XSS_INV = '<script>document.title="pwned-inventory"</script><img src=x onerror=alert(1)>'
XSS_LOG = '<script>document.title="pwned-log"</script>'
SUBSTATE = "health check failed: vv-video-ai.service is inactive <b>after</b> 60 s"
DEPLOYMENTS = f"{MGMT}/v1/deployments/deployments"
DEVAUTH = f"{MGMT}/v2/devauth/devices"


# ---------------------------------------------------------------------------------------------------------
# HTTP without following redirects


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def fetch(server: OtaServer, path: str, *, method: str = "GET", form: dict[str, str] | None = None,
          cookie: str | None = None, bearer: str | None = None) -> Response:
    headers: dict[str, str] = {}
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie is not None:
        headers["Cookie"] = f"ota_session={cookie}"
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def text(r: Response) -> str:
    return r.body.decode()


def login(server: OtaServer) -> str:
    """Log in through the form; the session cookie's value."""
    r = fetch(server, "/ui/login", method="POST", form={"token": server.admin_token, "next": "/ui/"})
    assert r.status == 303, r
    m = re.match(r"ota_session=([^;]+);", r.headers["set-cookie"])
    assert m, r.headers
    return m.group(1)


# ---------------------------------------------------------------------------------------------------------
# A realistic fleet, made through the real APIs


@dataclass
class Fleet:
    server: OtaServer
    ids: dict[str, str] = field(default_factory=dict)  # hostname -> device id
    rollout: str = ""
    hotfix: str = ""
    succeeded: str = ""  # hostnames
    failed: str = ""
    waiting: list[str] = field(default_factory=list)


def _device(server: OtaServer, hostname: str) -> DeviceAPI:
    identity = json.dumps({"hostname": hostname, "mac": f"02:00:00:00:{uuid.uuid4().hex[:2]}:{uuid.uuid4().hex[:2]}"})
    return DeviceAPI(server.url, ed25519.Ed25519PrivateKey.generate(), identity, allow_http=True)


def _device_id(server: OtaServer, hostname: str) -> str:
    for d in server.get(DEVAUTH).json():
        if d["identity_data"]["hostname"] == hostname:
            return str(d["id"])
    raise AssertionError(f"{hostname} unknown to the server")


def _set_auth(server: OtaServer, device_id: str, status: str) -> None:
    d = server.get(f"{DEVAUTH}/{device_id}").json()
    r = server.send_json("PUT", f"{DEVAUTH}/{device_id}/auth/{d['auth_sets'][0]['id']}/status", {"status": status})
    assert r.status == 204, r


def _onboard(server: OtaServer, api: DeviceAPI, hostname: str, status: str = "accepted") -> str:
    with pytest.raises(Unauthorized):
        api.authenticate()  # first contact: pending
    device_id = _device_id(server, hostname)
    if status != "pending":
        _set_auth(server, device_id, status)
    if status == "accepted":
        api.authenticate()
    return device_id


def _report(api: DeviceAPI, deployment_id: str, *statuses: str, substate: str = "") -> None:
    for s in statuses:
        api.report_status(deployment_id, s, substate if s == "failure" else "")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dashboard")
    server = OtaServer(tmp / "server", keys["ec"][1])
    server.start()
    try:
        yield _make_fleet(server, tmp, keys["ec"][0])
    finally:
        server.stop()


def _build_artifact(tmp: Path, release_key: Path) -> Path:
    payload = make_payload(tmp / "app.bin", 40_000)
    art = tmp / "vv-app-2.0.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "-T", "vv-app", "-f",
                    str(payload), "-n", "vv-app-2.0", "-t", "raspberrypi4", "-k", str(release_key), "-o", str(art)],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    return art


def _make_fleet(server: OtaServer, tmp: Path, release_key: Path) -> Fleet:
    fleet = Fleet(server)
    r = server.upload_artifact(_build_artifact(tmp, release_key))
    assert r.status == 201, r

    apis: dict[str, DeviceAPI] = {}
    for i in range(1, 5):
        host = f"cam-{i:02d}"
        apis[host] = _device(server, host)
        fleet.ids[host] = _onboard(server, apis[host], host)
    evil = XSS_ID
    apis[evil] = _device(server, evil)
    fleet.ids[evil] = _onboard(server, apis[evil], evil)
    for host, status in (("cam-pending", "pending"), ("cam-rejected", "rejected")):
        fleet.ids[host] = _onboard(server, _device(server, host), host, status)
    pre = _device(server, "cam-preauth")
    from device_hooks.identity import public_pem

    r = server.send_json("POST", DEVAUTH, {"identity_data": json.loads(pre.identity), "pubkey": public_pem(pre.key)})
    assert r.status == 201, r
    fleet.ids["cam-preauth"] = _device_id(server, "cam-preauth")

    for host, api in apis.items():
        api.send_inventory({"artifact_name": "vv-app-1.0", "device_type": "raspberrypi4", "kernel": "6.6.31-v8+",
                            "ipv4_eth0": "10.0.0.17/24", "location": XSS_INV if host == evil else "lobby, north wall"})
        group = "parking" if host == evil else "lobby"
        assert server.send_json("PUT", f"{MGMT}/v1/inventory/devices/{fleet.ids[host]}/group",
                                {"group": group}).status == 204

    # phased rollout to the lobby: half now, the rest in an hour; more than 40% failures pause it
    r = server.send_json("POST", DEPLOYMENTS, {
        "name": "lobby rollout 2.0", "artifact_name": "vv-app-2.0", "group": "lobby",
        "phases": [{"batch_size": 50}, {"wait_s": 3600}], "failure_threshold": 40})
    assert r.status == 201, r
    fleet.rollout = r.headers["location"].rsplit("/", 1)[1]
    provides = {"device_type": "raspberrypi4", "artifact_name": "vv-app-1.0"}
    first = []
    for i in range(1, 5):
        host = f"cam-{i:02d}"
        dep = apis[host].next_deployment(provides)
        if dep is None:
            fleet.waiting.append(host)
        else:
            assert dep.id == fleet.rollout and dep.artifact_name == "vv-app-2.0"
            first.append(host)
    assert len(first) == 2 and len(fleet.waiting) == 2, (first, fleet.waiting)
    fleet.succeeded, fleet.failed = first
    _report(apis[fleet.succeeded], fleet.rollout, "downloading", "installing", "rebooting", "success")
    apis[fleet.succeeded].send_inventory({"artifact_name": "vv-app-2.0", "device_type": "raspberrypi4",
                                          "kernel": "6.6.31-v8+", "ipv4_eth0": "10.0.0.18/24"})
    api = apis[fleet.failed]
    _report(api, fleet.rollout, "downloading", "installing", "rebooting")
    api.upload_log(fleet.rollout, [
        {"timestamp": "2024-05-01T12:00:00Z", "level": "info", "message": "installing vv-app-2.0 into slot B"},
        {"timestamp": "2024-05-01T12:00:41Z", "level": "error", "message": f"vv-video-ai.service failed: {XSS_LOG}"},
        {"timestamp": "2024-05-01T12:00:42Z", "level": "info", "message": "rolling back to slot A"},
    ])
    _report(api, fleet.rollout, "failure", substate=SUBSTATE)

    # a hotfix to the parking device fails without rollback: the Mender client reports _INCONSISTENT
    r = server.send_json("POST", DEPLOYMENTS, {"name": "parking hotfix", "artifact_name": "vv-app-2.0",
                                               "devices": [fleet.ids[evil]]})
    assert r.status == 201, r
    fleet.hotfix = r.headers["location"].rsplit("/", 1)[1]
    dep = apis[evil].next_deployment(provides)
    assert dep is not None and dep.id == fleet.hotfix
    _report(apis[evil], fleet.hotfix, "downloading", "installing")
    apis[evil].upload_log(fleet.hotfix, [{"timestamp": "2024-05-01T13:00:00Z", "level": "error",
                                          "message": f"ArtifactInstall failed; rollback not supported {XSS_LOG}"}])
    _report(apis[evil], fleet.hotfix, "failure", substate="ArtifactInstall: exit status 1 (no rollback)")
    apis[evil].send_inventory({"artifact_name": "vv-app-2.0_INCONSISTENT", "device_type": "raspberrypi4",
                               "location": XSS_INV})
    for a in apis.values():
        a.close()

    assert server.get(f"{DEPLOYMENTS}/{fleet.rollout}").json()["status"] == "paused"
    assert server.get(f"{DEPLOYMENTS}/{fleet.hotfix}").json()["status"] == "finished"
    return fleet


# ---------------------------------------------------------------------------------------------------------
# HTTP-level checks


def _count(html: str, element_id: str) -> int:
    m = re.search(rf'id="{re.escape(element_id)}">(\d+)<', html)
    assert m, f"#{element_id} not found"
    return int(m.group(1))


def _assert_inert(html: str) -> None:
    """Device-supplied markup is escaped: the page holds no script or event-handler markup at all (the
    dashboard itself uses none), and the strings show up escaped."""
    low = html.lower()
    assert "<script" not in low and "<img" not in low and "onerror=" not in low.replace("onerror=alert", "")
    assert "&lt;script&gt;" in html


def test_authentication(fleet: Fleet) -> None:
    s = fleet.server
    r = fetch(s, "/")
    assert r.status == 302 and r.headers["location"] == "/ui/"
    for path in ("/ui/", f"/ui/devices/{fleet.ids['cam-01']}", f"/ui/deployments/{fleet.rollout}", "/ui/deployments"):
        r = fetch(s, path)
        assert r.status == 303, (path, r)
        assert r.headers["location"] == "/ui/login?" + urllib.parse.urlencode({"next": path})
        assert b"cam-" not in r.body
    r = fetch(s, "/ui/?page=2&status=accepted")
    assert r.status == 303 and urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["location"]).query) == {
        "next": ["/ui/?page=2&status=accepted"]}

    r = fetch(s, "/ui/login?next=/ui/deployments")
    assert r.status == 200 and 'name="token"' in text(r) and 'value="/ui/deployments"' in text(r)
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script at all
    assert "default-src 'none'" in r.headers["content-security-policy"]

    r = fetch(s, "/ui/login", method="POST", form={"token": "wrong", "next": "/ui/"})
    assert r.status == 401 and "Wrong token" in text(r) and "set-cookie" not in r.headers
    r = fetch(s, "/ui/login", method="POST", form={"token": s.admin_token, "next": "/ui/deployments"})
    assert r.status == 303 and r.headers["location"] == "/ui/deployments"
    cookie = r.headers["set-cookie"]
    for attr in ("HttpOnly", "SameSite=strict", "Path=/ui", "Max-Age=43200"):
        assert attr.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http on loopback
    session = re.match(r"ota_session=([^;]+);", cookie).group(1)  # type: ignore[union-attr]
    assert s.admin_token not in session
    # no open redirect
    for evil in ("https://evil.example/", "//evil.example/ui/", "/api/management/v1/deployments/deployments",
                 "/ui/\\evil"):
        r = fetch(s, "/ui/login", method="POST", form={"token": s.admin_token, "next": evil})
        assert r.status == 303 and r.headers["location"] == "/ui/", (evil, r.headers)

    assert fetch(s, "/ui/", cookie=session).status == 200
    assert fetch(s, "/ui/login", cookie=session).status == 303  # already logged in
    # the Bearer admin token works too; a wrong one is refused outright
    assert fetch(s, "/ui/", bearer=s.admin_token).status == 200
    r = fetch(s, "/ui/", bearer="wrong")
    assert r.status == 401 and b"cam-" not in r.body
    # forged, tampered and expired sessions are refused (made with the server's real key, so that each is
    # refused for its own defect: the same call with nothing wrong is accepted)
    from ota_server.apitokens import Principal, hash_token
    from ota_server.dashboard import issue
    from ota_server.settings import load_or_create_secrets

    key = load_or_create_secrets(s.workdir / "storage").session_key
    boot = Principal("bootstrap", "admin", hash_token(s.admin_token))
    assert fetch(s, "/ui/", cookie=issue(key, "s2", boot, 60)).status == 200
    expired = issue(key, "s2", boot, 60, now=time.time() - 3600)
    ticket_as_session = issue(key, "t2", boot, 60)
    forged = issue(b"not the server's session key", "s2", boot, 3600)
    other_token = issue(key, "s2", Principal("bootstrap", "admin", hash_token("another-token")), 3600)
    no_such_token = issue(key, "s2", Principal("ghost", "admin", hash_token("ghost")), 3600)
    kind, name, expiry, mac = session.split(".")
    extended = f"{kind}.{name}.{int(expiry) + 86400}.{mac}"
    for bad in (expired, ticket_as_session, forged, other_token, no_such_token, extended, session[:-2],
                "s2.bootstrap.9999999999.x", "s1.9999999999.x", "garbage"):
        assert fetch(s, "/ui/", cookie=bad).status == 303, bad

    # logout drops the cookie
    r = fetch(s, "/ui/logout", method="POST", cookie=session)
    assert r.status == 303 and r.headers["location"] == "/ui/login"
    assert re.search(r'ota_session="?"?;', r.headers["set-cookie"]) and "max-age=0" in r.headers["set-cookie"].lower()

    # login links: issued to a Bearer holder only, valid once presented, expire
    assert fetch(s, "/ui/login-link", method="POST").status == 401
    r = fetch(s, "/ui/login-link?next=/ui/deployments", method="POST", bearer=s.admin_token)
    assert r.status == 200, r
    link = r.json()
    assert link["expires_in"] == 60 and link["url"].startswith("/ui/login/ticket?") and s.admin_token not in link["url"]
    r = fetch(s, link["url"])
    assert r.status == 303 and r.headers["location"] == "/ui/deployments" and "ota_session=" in r.headers["set-cookie"]
    r = fetch(s, "/ui/login/ticket?t=" + urllib.parse.quote(issue(key, "t2", boot, 60, now=time.time() - 120)))
    assert r.status == 401 and "expired" in text(r) and "set-cookie" not in r.headers
    assert fetch(s, "/ui/login/ticket?t=" + urllib.parse.quote(session)).status == 401  # a session is no ticket


def test_overview(fleet: Fleet) -> None:
    s = fleet.server
    r = fetch(s, "/ui/", bearer=s.admin_token)
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    html = text(r)
    assert (_count(html, "count-total"), _count(html, "count-accepted"), _count(html, "count-pending"),
            _count(html, "count-preauthorized"), _count(html, "count-rejected")) == (8, 5, 1, 1, 1)
    versions = html[html.index('id="versions"'):html.index('id="groups"')]
    rows = {unescape(re.sub(r"<[^>]+>", "", m.group(1))).strip(): int(m.group(2)) for m in re.finditer(
        r'<tr[^>]*>\s*<td><a href="[^"]*">(.*?)</a></td>\s*<td class="num">(\d+)</td>', versions, re.S)}
    assert rows == {"vv-app-1.0": 3, "vv-app-2.0": 1, "vv-app-2.0_INCONSISTENT": 1, "unknown": 3}, rows
    assert 'class="badge st-inconsistent"' in versions and 'class="row-bad"' in versions
    groups = html[html.index('id="groups"'):html.index('id="recent-deployments"')]
    assert re.search(r">lobby</a></td><td class=\"num\">4<", groups) and re.search(r">parking</a></td><td class=\"num\">1<", groups)
    recent = html[html.index('id="recent-deployments"'):html.index('id="devices"')]
    assert "lobby rollout 2.0" in recent and "parking hotfix" in recent
    assert f'href="/ui/deployments/{fleet.rollout}"' in recent and "st-paused" in recent and "1 failed" in recent
    devices = html[html.index('id="devices"'):]
    for host in ("cam-01", "cam-02", "cam-03", "cam-04", "cam-pending", "cam-rejected", "cam-preauth"):
        assert f"hostname={host}" in devices and f'href="/ui/devices/{fleet.ids[host]}"' in devices
    assert devices.count('href="/ui/devices/') == 8
    _assert_inert(html)
    assert html.count("&lt;script&gt;") >= 1
    for name, value in (("X-Frame-Options", "DENY"), ("Cache-Control", "no-store"), ("Referrer-Policy", "same-origin")):
        assert r.headers[name.lower()] == value

    # filters and pagination
    html = text(fetch(s, "/ui/?status=pending", bearer=s.admin_token))
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 1 and "hostname=cam-pending" in html
    html = text(fetch(s, "/ui/?group=lobby&artifact=vv-app-1.0", bearer=s.admin_token))
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 3
    html = text(fetch(s, "/ui/?artifact=vv-app-2.0_INCONSISTENT", bearer=s.admin_token))
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 1
    html = text(fetch(s, "/ui/?page=2", bearer=s.admin_token))
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 0 and "no devices" in html
    assert fetch(s, "/ui/?page=0", bearer=s.admin_token).status == 400
    assert fetch(s, "/ui/?status=bogus", bearer=s.admin_token).status == 400
    html = text(fetch(s, "/ui/deployments", bearer=s.admin_token))
    assert "lobby rollout 2.0" in html and "parking hotfix" in html
    assert fetch(s, "/ui/static/dashboard.css").status == 200  # public, no fleet data


def test_device_pages(fleet: Fleet) -> None:
    s = fleet.server
    r = fetch(s, f"/ui/devices/{fleet.ids[fleet.failed]}", bearer=s.admin_token)
    assert r.status == 200
    html = text(r)
    assert f"hostname</th><td>{fleet.failed}<" in html
    assert "st-accepted" in html and ">lobby</a>" in html
    inventory = html[html.index('id="inventory"'):html.index('id="history"')]
    for k, v in (("kernel", "6.6.31-v8+"), ("ipv4_eth0", "10.0.0.17/24"), ("artifact_name", "vv-app-1.0"),
                 ("device_type", "raspberrypi4")):
        assert f"<th>{k}</th><td>{v}</td>" in inventory, k
    history = html[html.index('id="history"'):html.index('id="last-log"')]
    assert "lobby rollout 2.0" in history and "st-failure" in history
    assert "health check failed: vv-video-ai.service is inactive &lt;b&gt;after&lt;/b&gt; 60 s" in history
    assert f'href="/ui/deployments/{fleet.rollout}/devices/{fleet.ids[fleet.failed]}/log"' in history
    last_log = html[html.index('id="last-log"'):]
    assert "installing vv-app-2.0 into slot B" in last_log and "rolling back to slot A" in last_log
    assert "&lt;script&gt;document.title=&#34;pwned-log&#34;&lt;/script&gt;" in last_log
    _assert_inert(html)

    html = text(fetch(s, f"/ui/devices/{fleet.ids[fleet.succeeded]}", bearer=s.admin_token))
    assert "st-success" in html and "<code>vv-app-2.0</code>" in html and "no deployment log" in html

    # the device whose identity, inventory and log carry markup
    r = fetch(s, f"/ui/devices/{fleet.ids[XSS_ID]}", bearer=s.admin_token)
    assert r.status == 200
    html = text(r)
    _assert_inert(html)
    assert "&lt;script&gt;document.title=&#34;pwned-identity&#34;&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "vv-app-2.0_INCONSISTENT" in html and "st-inconsistent" in html and "parking hotfix" in html

    html = text(fetch(s, f"/ui/devices/{fleet.ids['cam-pending']}", bearer=s.admin_token))
    assert "st-pending" in html and "has not reported any inventory" in html and "never part of a deployment" in html
    r = fetch(s, "/ui/devices/nope", bearer=s.admin_token)
    assert r.status == 404 and "No device" in text(r)


def test_deployment_pages(fleet: Fleet) -> None:
    s = fleet.server
    r = fetch(s, f"/ui/deployments/{fleet.rollout}", bearer=s.admin_token)
    assert r.status == 200
    html = text(r)
    assert "lobby rollout 2.0" in html and "<code>vv-app-2.0</code>" in html and ">lobby</a>" in html
    assert 'id="paused"' in html and "50.0% of the finished devices failed" in html and "threshold of 40%" in html
    assert (_count(html, "stat-success"), _count(html, "stat-failure"), _count(html, "stat-pending")) == (1, 1, 2)
    assert '<meta http-equiv="refresh" content="15">' in html  # an open deployment refreshes itself
    phases = html[html.index('id="phases"'):html.index('id="failures"')]
    assert phases.count("<tr class=") == 2 and 'class="current"' in phases and 'class="future"' in phases
    assert re.search(r'id="next-phase">Next phase \(2\) starts .* — in (59 min|1 h)', phases), phases
    assert "40% of finished devices" in html and 'class="bad">50.0%' in html
    summary = html[html.index('id="summary"'):html.index('id="phases"')]
    assert re.search(r"<td>\d+\.\d KiB</td><td>raspberrypi4</td><td>yes", summary), summary  # the uploaded file
    failures = html[html.index('id="failures"'):]
    assert f"hostname={fleet.failed}" in failures
    assert "inactive &lt;b&gt;after&lt;/b&gt; 60 s" in failures
    log_href = f"/ui/deployments/{fleet.rollout}/devices/{fleet.ids[fleet.failed]}/log"
    assert f'href="{log_href}"' in failures and fleet.succeeded not in failures
    # the progress bar: 1 success and 1 failure of 4 devices, 2 pending
    bar = html[html.index('<svg class="bar wide"'):]
    bar = bar[:bar.index("</svg>")]
    assert re.search(r'class="seg-success" x="0(\.0)?" y="0" width="25(\.0)?"', bar), bar
    assert re.search(r'class="seg-failure" x="25(\.0)?" y="0" width="25(\.0)?"', bar), bar
    assert re.search(r'class="seg-pending" x="50(\.0)?" y="0" width="50(\.0)?"', bar), bar
    assert "<b>after</b>" not in html

    r = fetch(s, log_href, bearer=s.admin_token)
    assert r.status == 200
    html = text(r)
    _assert_inert(html)
    assert "vv-video-ai.service failed: &lt;script&gt;" in html and "rolling back to slot A" in html

    html = text(fetch(s, f"/ui/deployments/{fleet.hotfix}", bearer=s.admin_token))
    assert "st-finished" in html and "http-equiv" not in html and "ArtifactInstall: exit status 1" in html
    assert fetch(s, "/ui/deployments/nope", bearer=s.admin_token).status == 404
    assert fetch(s, f"/ui/deployments/{fleet.rollout}/devices/nope/log", bearer=s.admin_token).status == 404


# ---------------------------------------------------------------------------------------------------------
# A real browser


CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--hide-scrollbars",
    # nothing leaves the loopback interface: no background services, and a dead proxy for anything else
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: apt-get install chromium (the dashboard test renders pages with it)")


def run_chromium(binary: str, profile: Path, url: str, screenshot: Path, live: list[int]) -> str:
    """Load ``url`` in a fresh headless Chromium, save a screenshot, return the DOM. Chromium and all its
    helper processes run in their own process group, killed if anything is left when this returns."""
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={screenshot}",
                             "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    live.append(proc.pid)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, err.decode(errors="replace")[-3000:]
    return out.decode()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int, wait: float = 10.0) -> bool:
    """True if a process of the group is still there after ``wait`` seconds (killed processes take a moment
    to be reaped once reparented)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


@pytest.mark.slow
def test_chromium_renders_the_dashboard(fleet: Fleet, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Chromium gets a session the honest way: the test asks the server for a 60-second login link (Bearer
    admin token), Chromium opens it, the server sets the HttpOnly SameSite=Strict cookie and redirects to the
    page, and Chromium renders that page with the cookie. The admin token never appears in a URL."""
    binary = chromium_binary()
    live: list[int] = []

    def kill_all() -> None:
        for pid in live:
            _kill_group(pid)

    request.addfinalizer(kill_all)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    s = fleet.server
    timings: dict[str, float] = {}

    def render(name: str, page: str) -> str:
        r = fetch(s, "/ui/login-link?" + urllib.parse.urlencode({"next": page}), method="POST", bearer=s.admin_token)
        assert r.status == 200, r
        shot = SCREENSHOTS / f"{name}.png"
        shot.unlink(missing_ok=True)
        t0 = time.monotonic()
        dom = run_chromium(binary, tmp_path / f"profile-{name}", s.url + r.json()["url"], shot, live)
        timings[name] = time.monotonic() - t0
        print(f"screenshot: {shot} ({timings[name]:.1f} s)")
        return dom

    dom = render("overview", "/ui/")
    assert "<title>Fleet · vv-ota</title>" in dom and 'name="token"' not in dom  # logged in, not the login form
    assert (_count(dom, "count-total"), _count(dom, "count-accepted"), _count(dom, "count-pending")) == (8, 5, 1)
    for needle in ("vv-app-2.0_INCONSISTENT", "lobby rollout 2.0", "parking hotfix", "hostname=cam-01", "lobby"):
        assert needle in dom, needle
    assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]
    assert "&lt;script&gt;" in dom and "<script" not in dom.lower()

    dom = render("device", f"/ui/devices/{fleet.ids[XSS_ID]}")
    assert "parking hotfix" in dom and "vv-app-2.0_INCONSISTENT" in dom and "ArtifactInstall failed" in dom
    assert "<script" not in dom.lower() and "<img" not in dom.lower() and "pwned" not in dom.split("</title>")[0]

    dom = render("deployment", f"/ui/deployments/{fleet.rollout}")
    assert "lobby rollout 2.0" in dom and "Paused" in dom and "threshold of 40%" in dom
    assert (_count(dom, "stat-success"), _count(dom, "stat-failure"), _count(dom, "stat-pending")) == (1, 1, 2)
    assert f"hostname={fleet.failed}" in dom and "Next phase (2)" in dom

    for pid in live:
        assert not _group_alive(pid), f"Chromium processes of group {pid} left behind"
    print("chromium timings:", {k: round(v, 1) for k, v in timings.items()})


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


def test_pages_on_postgres(postgres: str, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """The same queries on a real PostgreSQL (JSON inventory access, GREATEST, grouping by an expression)."""
    from .server_helpers import Device, Server, deploy, upload

    server = Server(tmp_path / "server", "--release-key", str(keys["ec"][1]),
                    db_url=create_database(postgres)).start()
    try:
        assert upload(server, _build_artifact(tmp_path, keys["ec"][0])).status_code == 201
        devs = [Device(server, identity={"hostname": f"pg-{i}"}) for i in range(4)]
        ids = [d.accept() for d in devs[:3]]
        assert devs[3].auth().status_code == 401  # pending
        for d, version in zip(devs[:3], ("vv-app-1.0", "vv-app-1.0", "vv-app-1.0_INCONSISTENT"), strict=True):
            assert d.next(version, "raspberrypi4").status_code == 204
        with server.admin() as a:
            assert a.put(f"{MGMT}/v1/inventory/devices/{ids[0]}/group", json={"group": "lobby"}).status_code == 204
        dep_id = deploy(server, name="pg rollout", artifact_name="vv-app-2.0", devices=ids[:2])
        for d, final in zip(devs[:2], ("success", "failure"), strict=True):
            assert d.next("vv-app-1.0", "raspberrypi4").status_code == 200
            assert d.status(dep_id, "installing").status_code == 204
            if final == "failure":
                r = d.http.put(f"/api/devices/v1/deployments/device/deployments/{dep_id}/log", headers=d.headers,
                               json={"messages": [{"timestamp": "2024-05-01T12:00:00Z", "level": "error",
                                                   "message": XSS_LOG}]})
                assert r.status_code == 204
            assert d.status(dep_id, final, "health check failed" if final == "failure" else None).status_code == 204

        def page(path: str) -> str:
            with server.admin() as a:
                r = a.get(path)
            assert r.status_code == 200, (path, r.text[:2000])
            return r.text

        html = page("/ui/")
        assert (_count(html, "count-total"), _count(html, "count-accepted"), _count(html, "count-pending")) == (4, 3, 1)
        assert "vv-app-1.0_INCONSISTENT" in html and "pg rollout" in html and ">lobby</a>" in html
        def listed(html: str) -> int:  # devices in the device table (the pending list above it has its own links)
            return html[html.index('id="devices"'):].count('href="/ui/devices/')

        assert listed(page("/ui/?artifact=vv-app-1.0")) == 2
        assert listed(page("/ui/?group=&page=1")) == 3
        html = page(f"/ui/deployments/{dep_id}")
        assert (_count(html, "stat-success"), _count(html, "stat-failure")) == (1, 1) and "health check failed" in html
        html = page(f"/ui/devices/{ids[1]}")
        assert "pg rollout" in html and "&lt;script&gt;" in html and "<script" not in html
        assert "&lt;script&gt;" in page(f"/ui/deployments/{dep_id}/devices/{ids[1]}/log")
        assert "pg rollout" in page("/ui/deployments")
    finally:
        server.stop()
