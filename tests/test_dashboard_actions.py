"""The dashboard's actions (``ota_server/dashboard_actions.py``) against the real server, on SQLite and PostgreSQL.

Over plain HTTP (httpx, no redirects followed): every action as an operator's session (accept and reject a key,
the pending list in bulk, a deployment to devices, a group and everyone with phases and a failure threshold,
abort, resume, roll back, device and group variables with a masked secret kept), each checked through the
management API and the audit log; bad input (unknown device, nobody to deploy to, bad phases, bad variable
name) ends in a flash error and changes nothing. Attack stories: a forged form post without the CSRF token,
with a wrong one, with the token of another session, from another site (Origin or Referer), and from a
session whose token has scope read; each is refused with 403 and changes nothing.

A headless Chromium (slow) clicks through as an operator: accept a pending device, deploy to it, abort
(screenshots in ``out/test-screenshots/``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import BUILD_PY, REPO, make_payload
from .server_helpers import Device, Server, deploy, upload

MGMT = "/api/management"
DEVAUTH = f"{MGMT}/v2/devauth/devices"
DEPLOYMENTS = f"{MGMT}/v1/deployments/deployments"
CONFIG = f"{MGMT}/v1/deviceconfig/configurations"
AUDIT = f"{MGMT}/v1/audit"
DEVICE_TYPE = "raspberrypi4"


# ---------------------------------------------------------------------------------------------------------
# The fleet and the people


def _artifact(tmp: Path, release_key: Path, name: str) -> Path:
    out = tmp / f"{name}.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "-T", "vv-app", "-f",
                    str(make_payload(tmp / f"{name}.bin", 20_000)), "-n", name, "-t", DEVICE_TYPE,
                    "-k", str(release_key), "-o", str(out)],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    return out


@dataclass
class Session:
    """A browser's dashboard session: the cookie of one login with one API token."""

    server: Server
    token_name: str
    cookie: str

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=30, cookies={"ota_session": self.cookie})

    def page(self, path: str, flash: str | None = None, status: int = 200) -> str:
        with self.http() as c:
            if flash is not None:
                c.cookies.set("ota_flash", flash)
            r = c.get(path)
        assert r.status_code == status, (path, r.status_code, r.text[:500])
        return r.text

    def csrf(self, path: str = "/ui/deploy") -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.page(path))
        assert m, f"no form with a CSRF token on {path}"
        return m.group(1)

    def post(self, path: str, form: dict[str, Any], csrf: str | None = "", headers: dict[str, str] | None = None
             ) -> httpx.Response:
        """POST a form as the browser would (``csrf=""``: the one of this session, None: none)."""
        data = dict(form)
        if csrf == "":
            csrf = self.csrf()
        if csrf is not None:
            data["csrf"] = csrf
        origin = {"Origin": self.server.url}
        with self.http() as c:
            return c.post(path, data=data, headers={**origin, **(headers or {})})

    def act(self, path: str, form: dict[str, Any]) -> tuple[bool, str, str]:
        """POST a form; (ok, flash text, the page redirected to): the answer must be a 303 with a flash."""
        r = self.post(path, form)
        assert r.status_code == 303, (r.status_code, r.text[:1000])
        flash = r.cookies.get("ota_flash")
        assert flash, r.headers
        target = r.headers["location"]
        html = self.page(target, flash=flash, status=404 if "/no-such-" in target else 200)
        m = re.search(r'<p class="flash (ok|error)" id="flash" role="status">(.*?)</p>', html, re.S)
        assert m, html[:2000]
        return m.group(1) == "ok", unescape(m.group(2)), target


def login(server: Server, token: str, name: str) -> Session:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": token, "next": "/ui/"})
    assert r.status_code == 303, r.text
    return Session(server, name, r.cookies["ota_session"])


@dataclass
class Fleet:
    server: Server
    ops: Session
    #: another operator's session
    ops2: Session
    viewer: Session
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def fleet(server: Server, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]
          ) -> Fleet:
    tmp = tmp_path_factory.mktemp("actions")
    for name in ("vv-app-1.0", "vv-app-2.0"):
        assert upload(server, _artifact(tmp, keys["ec"][0], name)).status_code == 201
    tokens = {}
    with server.admin() as a:
        for name, scope in (("ops", "operate"), ("viewer", "read"), ("ops2", "operate")):
            r = a.post(f"{MGMT}/v1/tokens", json={"name": name, "scope": scope})
            assert r.status_code == 201, r.text
            tokens[name] = r.json()["token"]
    return Fleet(server, login(server, tokens["ops"], "ops"), login(server, tokens["ops2"], "ops2"),
                 login(server, tokens["viewer"], "viewer"), tokens)


def pending_device(server: Server) -> Device:
    d = Device(server, identity={"hostname": f"cam-{time.monotonic_ns() % 10**9}"})
    assert d.auth().status_code == 401
    return d


def accepted_device(server: Server, group: str | None = None) -> tuple[Device, str]:
    d = Device(server, identity={"hostname": f"cam-{time.monotonic_ns() % 10**9}"})
    device_id = d.accept()
    if group is not None:
        with server.admin() as a:
            assert a.put(f"{MGMT}/v1/inventory/devices/{device_id}/group", json={"group": group}).status_code == 204
    return d, device_id


def api(server: Server, path: str) -> Any:
    with server.admin() as a:
        r = a.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def audit_since(server: Server, last_id: int) -> list[dict[str, Any]]:
    return [e for e in api(server, f"{AUDIT}?limit=1000") if e["id"] > last_id]


def last_audit_id(server: Server) -> int:
    entries = api(server, f"{AUDIT}?limit=1")
    return int(entries[0]["id"]) if entries else 0


def deployment_count(server: Server) -> int:
    return len(api(server, f"{DEPLOYMENTS}?per_page=10000"))


# ---------------------------------------------------------------------------------------------------------
# Devices


def test_accept_and_reject_one_key(fleet: Fleet) -> None:
    s = fleet.server
    d = pending_device(s)
    device_id = d.id()
    auth_id = api(s, f"{DEVAUTH}/{device_id}")["auth_sets"][0]["id"]
    html = fleet.ops.page(f"/ui/devices/{device_id}")
    assert f'action="/ui/devices/{device_id}/auth/{auth_id}/status"' in html and f'id="accept-{auth_id}"' in html
    before = last_audit_id(s)

    ok, text, target = fleet.ops.act(f"/ui/devices/{device_id}/auth/{auth_id}/status", {"status": "accepted"})
    assert ok and "accepted" in text and target == f"/ui/devices/{device_id}"
    assert api(s, f"{DEVAUTH}/{device_id}")["status"] == "accepted"
    assert d.auth().status_code == 200  # the device gets its token
    entries = audit_since(s, before)
    assert [(e["actor"], e["method"], e["path"]) for e in entries] == [
        ("ops", "POST", f"/ui/devices/{device_id}/auth/{auth_id}/status")]
    # the API's own summary
    assert entries[0]["summary"] == f"auth set {auth_id} of device {device_id} set to accepted (device now accepted)"

    ok, text, _ = fleet.ops.act(f"/ui/devices/{device_id}/auth/{auth_id}/status", {"status": "rejected"})
    assert ok and api(s, f"{DEVAUTH}/{device_id}")["status"] == "rejected"
    assert d.auth().status_code == 401

    # bad input: the API's error text, nothing changed
    ok, text, _ = fleet.ops.act(f"/ui/devices/{device_id}/auth/{auth_id}/status", {"status": "decommissioned"})
    assert not ok and text.startswith("invalid request: status:"), text
    ok, text, _ = fleet.ops.act(f"/ui/devices/no-such-device/auth/{auth_id}/status", {"status": "accepted"})
    assert not ok and text == "device or auth set not found"
    assert api(s, f"{DEVAUTH}/{device_id}")["status"] == "rejected"


def test_pending_list_in_bulk(fleet: Fleet) -> None:
    s = fleet.server
    devs = [pending_device(s) for _ in range(4)]
    ids = [d.id() for d in devs]
    html = fleet.ops.page("/ui/")
    assert 'id="pending-notice"' in html and 'href="?status=pending"' in html and 'name="ids"' not in html
    html = fleet.ops.page("/ui/?status=pending")
    listed = html[html.index('id="pending-list"'):]
    for device_id in ids:
        assert f'name="ids" value="{device_id}"' in listed
    assert '<meta http-equiv="refresh"' not in html  # it would drop the ticks
    before = last_audit_id(s)

    ok, text, target = fleet.ops.act("/ui/devices/pending", {"ids": [ids[0], ids[1], "no-such-device"],
                                                              "decision": "accept"})
    assert ok and target == "/ui/"
    assert text.startswith("accepted 2 of 3 device(s)") and "no-such-: not found" in text, text
    assert [api(s, f"{DEVAUTH}/{i}")["status"] for i in ids] == ["accepted", "accepted", "pending", "pending"]
    assert sorted(e["summary"] for e in audit_since(s, before)) == sorted(
        f"auth set {api(s, f'{DEVAUTH}/{i}')['auth_sets'][0]['id']} of device {i} set to accepted (bulk accept)"
        for i in ids[:2])

    ok, text, _ = fleet.ops.act("/ui/devices/pending", {"ids": [ids[2], ids[0]], "decision": "reject"})
    assert ok and text.startswith("rejected 1 of 2 device(s)") and "no pending key" in text, text
    assert [api(s, f"{DEVAUTH}/{i}")["status"] for i in ids] == ["accepted", "accepted", "rejected", "pending"]

    ok, text, _ = fleet.ops.act("/ui/devices/pending", {"decision": "accept"})
    assert not ok and text == "tick at least one device"
    assert api(s, f"{DEVAUTH}/{ids[3]}")["status"] == "pending"


# ---------------------------------------------------------------------------------------------------------
# Deployments


def _deploy_form(**fields: Any) -> dict[str, Any]:
    return {"name": "from the dashboard", "artifact_name": "vv-app-2.0", **fields}


def test_create_deployments(fleet: Fleet) -> None:
    s = fleet.server
    _, a = accepted_device(s, "dock")
    _, b = accepted_device(s, "dock")
    html = fleet.ops.page(f"/ui/deploy?devices={a}")
    assert '<option value="vv-app-2.0">' in html and '<option value="vv-app-1.0">' in html and a in html
    before = last_audit_id(s)

    ok, text, target = fleet.ops.act("/ui/deploy", _deploy_form(target="devices", devices=f"{a}, {b}\n{a}"))
    assert ok and text == "deployment 'from the dashboard' created", text
    doc = api(s, f"{DEPLOYMENTS}/{target.rsplit('/', 1)[1]}")
    assert doc["target"] == {"devices": [a, b]} and doc["device_count"] == 2 and doc["artifact_name"] == "vv-app-2.0"
    assert doc["failure_threshold"] is None and doc["allow_downgrade"] is False and len(doc["phases"]) == 1
    [entry] = audit_since(s, before)
    assert entry["actor"] == "ops" and entry["path"] == "/ui/deploy"
    assert entry["summary"].startswith("created deployment 'from the dashboard' (") and "to 2 device(s) (a device list)" \
        in entry["summary"]

    # a group, in phases with a failure threshold, exactly as the API takes them
    ok, text, target = fleet.ops.act("/ui/deploy", _deploy_form(
        target="group", group="dock", phase1_batch_size="50", phase2_wait_s="3600", failure_threshold="25",
        retries="2", allow_downgrade="on"))
    assert ok, text
    doc = api(s, f"{DEPLOYMENTS}/{target.rsplit('/', 1)[1]}")
    assert doc["target"] == {"group": "dock"} and doc["device_count"] == 2 and doc["failure_threshold"] == 25
    assert doc["retries"] == 2 and doc["allow_downgrade"] is True
    assert [(p["batch_size"], p["device_count"]) for p in doc["phases"]] == [(50, 1), (50, 1)]
    assert doc["phases"][1]["start_ts"] > doc["phases"][0]["start_ts"]
    ok, text, target = fleet.ops.act("/ui/deploy", _deploy_form(target="all", phase1_start_ts="2030-01-01T00:00:00Z"))
    assert ok, text
    doc = api(s, f"{DEPLOYMENTS}/{target.rsplit('/', 1)[1]}")
    assert doc["target"] == {"all_devices": True} and doc["phases"][0]["start_ts"] == "2030-01-01T00:00:00.000Z", doc


def test_bad_deployments_change_nothing(fleet: Fleet) -> None:
    s = fleet.server
    _, a = accepted_device(s)
    count, before = deployment_count(s), last_audit_id(s)
    for form, error in (
        (_deploy_form(target="devices", devices=f"{a} no-such-device"), "unknown device(s): no-such-device"),
        (_deploy_form(target="devices", devices=""), "invalid request: devices: List should have at least 1 item"),
        (_deploy_form(target="group", group="nobody-here"), "no accepted devices match the target"),
        (_deploy_form(target="all", artifact_name="vv-app-9.9"), "no artifact named 'vv-app-9.9': upload it first"),
        (_deploy_form(target="devices", devices=a, phase1_batch_size="60", phase2_batch_size="60", phase3_wait_s="5"),
         "invalid request: body: the batch sizes before the last phase must add up to less than 100"),
        (_deploy_form(target="devices", devices=a, phase1_batch_size="many"), "invalid request: phases.0.batch_size:"),
        (_deploy_form(target="devices", devices=a, failure_threshold="101"), "invalid request: failure_threshold:"),
        (_deploy_form(), "invalid request: body: give exactly one target"),
        (_deploy_form(target="devices", devices="<script>alert(1)</script>"), "unknown device(s): <script>"),
    ):
        ok, text, target = fleet.ops.act("/ui/deploy", form)
        assert not ok and text.startswith(error) and target == "/ui/deploy", (form, text)
    assert deployment_count(s) == count and audit_since(s, before) == []
    # the error text is escaped on the page
    r = fleet.ops.post("/ui/deploy", _deploy_form(target="devices", devices="<b>x</b>"))
    html = fleet.ops.page("/ui/deploy", flash=r.cookies["ota_flash"])
    assert "unknown device(s): &lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html


def test_abort_and_resume(fleet: Fleet) -> None:
    s = fleet.server
    devs = [accepted_device(s) for _ in range(2)]
    dep_id = deploy(s, name="to abort", artifact_name="vv-app-2.0", devices=[i for _, i in devs], failure_threshold=0)
    html = fleet.ops.page(f"/ui/deployments/{dep_id}")
    assert f'action="/ui/deployments/{dep_id}/status"' in html and 'id="abort"' in html and 'id="resume"' not in html
    # one failure pauses it (threshold 0): resume from the dashboard
    d, _ = devs[0]
    assert d.next("vv-app-1.0", DEVICE_TYPE).status_code == 200
    assert d.status(dep_id, "failure").status_code == 204
    assert api(s, f"{DEPLOYMENTS}/{dep_id}")["status"] == "paused"
    assert 'id="resume"' in fleet.ops.page(f"/ui/deployments/{dep_id}")
    ok, text, _ = fleet.ops.act(f"/ui/deployments/{dep_id}/status", {"status": "inprogress"})
    assert ok and text == "deployment resumed" and api(s, f"{DEPLOYMENTS}/{dep_id}")["status"] == "inprogress"

    before = last_audit_id(s)
    ok, text, target = fleet.ops.act(f"/ui/deployments/{dep_id}/status", {"status": "aborted"})
    assert ok and text == "deployment aborted" and target == f"/ui/deployments/{dep_id}"
    assert api(s, f"{DEPLOYMENTS}/{dep_id}")["status"] == "aborted"
    assert [(e["actor"], e["summary"]) for e in audit_since(s, before)] == [
        ("ops", f"deployment 'to abort' ({dep_id}) aborted")]
    ok, text, _ = fleet.ops.act(f"/ui/deployments/{dep_id}/status", {"status": "aborted"})
    assert not ok and text == "the deployment is already aborted"
    assert 'id="abort"' not in fleet.ops.page(f"/ui/deployments/{dep_id}")
    ok, text, _ = fleet.ops.act("/ui/deployments/no-such-deployment/status", {"status": "aborted"})
    assert not ok and text == "deployment not found"


def test_roll_back(fleet: Fleet) -> None:
    """Two devices go 1.0 → 2.0 through deployments; "roll back" of the 2.0 deployment is the API's rollback
    deployment: each device that installed it goes back to what it ran when it got it (1.0), downgrades allowed."""
    s = fleet.server
    devs = [accepted_device(s) for _ in range(3)]
    ids = [i for _, i in devs]
    old = deploy(s, name="first", artifact_name="vv-app-1.0", devices=ids[:2])
    new = deploy(s, name="second", artifact_name="vv-app-2.0", devices=ids)
    for dep_id, running in ((old, "factory"), (new, "vv-app-1.0")):
        for (d, device_id) in devs:
            if dep_id == old and device_id == ids[2]:
                continue
            assert d.next(running, DEVICE_TYPE).status_code == 200
            final = "failure" if (dep_id, device_id) == (new, ids[2]) else "success"
            assert d.status(dep_id, final).status_code == 204
    html = fleet.ops.page(f"/ui/deployments/{new}")
    form = html[html.index('id="rollback-form"'):]
    assert "each of the 2 device(s) that installed this one" in form and "<code>vv-app-1.0</code>: 2" in form
    # nothing to go back to: the factory image is not on the server
    assert 'id="rollback-form"' not in fleet.ops.page(f"/ui/deployments/{old}")

    ok, text, target = fleet.ops.act(f"/ui/deployments/{new}/rollback", {})
    assert ok and text == "rollback deployment to 2 device(s) created", text
    doc = api(s, f"{DEPLOYMENTS}/{target.rsplit('/', 1)[1]}")
    assert doc["name"] == "rollback of second" and doc["kind"] == "rollback" and doc["allow_downgrade"] is True
    assert sorted(doc["target"]["devices"]) == sorted(ids[:2]) and doc["artifact_name"] == "vv-app-1.0"
    ok, text, _ = fleet.ops.act(f"/ui/deployments/{old}/rollback", {})
    assert not ok and "can be rolled back" in text, text


# ---------------------------------------------------------------------------------------------------------
# Configuration variables


def _config_form(rows: list[tuple[str, str, bool]], removed: tuple[str, ...] = ()) -> dict[str, str]:
    form: dict[str, str] = {}
    for i, (name, value, secret) in enumerate(rows):
        form[f"var{i}_name"], form[f"var{i}_value"] = name, value
        if secret:
            form[f"var{i}_secret"] = "on"
        if name in removed:
            form[f"var{i}_remove"] = "on"
    return form


def test_device_and_group_variables(fleet: Fleet) -> None:
    s = fleet.server
    d, device_id = accepted_device(s, "yard")
    with s.admin() as a:
        r = a.put(f"{CONFIG}/device/{device_id}", json={"DVR_IP": "10.0.0.5", "DVR_PASSWORD": "s3cret-Value",
                                                          "OLD": "x", "_secrets": ["DVR_PASSWORD"]})
        assert r.status_code == 204
    html = fleet.ops.page(f"/ui/devices/{device_id}")
    assert 'value="********"' in html and "s3cret-Value" not in html and 'value="10.0.0.5"' in html
    before = last_audit_id(s)

    # the masked secret goes back as it was shown: the stored secret stays
    ok, text, target = fleet.ops.act(f"/ui/devices/{device_id}/config", _config_form(
        [("DVR_IP", "10.0.0.6", False), ("DVR_PASSWORD", "********", True), ("OLD", "x", False),
         ("DEVICE_ID", "cam-yard", False), ("", "", False)], removed=("OLD",)))
    assert ok and text == "3 variable(s) of the device saved" and target == f"/ui/devices/{device_id}#config", text
    got = api(s, f"{CONFIG}/device/{device_id}")
    assert got["configured"] == {"DEVICE_ID": "cam-yard", "DVR_IP": "10.0.0.6", "DVR_PASSWORD": "********"}
    assert got["secrets"] == ["DVR_PASSWORD"]
    r = d.http.get("/api/devices/v1/deviceconfig/configuration", headers=d.headers)
    assert r.status_code == 200 and r.json()["DVR_PASSWORD"] == "s3cret-Value", r.text
    [entry] = audit_since(s, before)
    assert entry["actor"] == "ops" and entry["summary"] == (
        f"replaced the variables of device {device_id}: DEVICE_ID, DVR_IP, DVR_PASSWORD (secret: DVR_PASSWORD)")

    # a new secret value replaces it
    ok, _, _ = fleet.ops.act(f"/ui/devices/{device_id}/config", _config_form(
        [("DVR_IP", "10.0.0.6", False), ("DVR_PASSWORD", "n3w", True)]))
    assert ok and d.http.get("/api/devices/v1/deviceconfig/configuration", headers=d.headers).json()[
        "DVR_PASSWORD"] == "n3w"

    # bad input: the API's error, nothing changed
    before = last_audit_id(s)
    for rows, error in (([("1BAD", "x", False)], "invalid variable name '1BAD'"),
                        ([("A", "1", False), ("A", "2", False)], "the variable 'A' is given twice"),
                        ([("SSH_AUTHORIZED_KEYS", "not a key", False)], "SSH_AUTHORIZED_KEYS:")):
        ok, text, _ = fleet.ops.act(f"/ui/devices/{device_id}/config", _config_form(rows))
        assert not ok and text.startswith(error), text
    ok, text, _ = fleet.ops.act("/ui/devices/no-such-device/config", _config_form([("A", "1", False)]))
    assert not ok and text == "device not found"
    assert api(s, f"{CONFIG}/device/{device_id}")["configured"] == {"DVR_IP": "10.0.0.6", "DVR_PASSWORD": "********"}
    assert audit_since(s, before) == []

    # the group's variables, on the group's page
    html = fleet.ops.page("/ui/groups/yard")
    assert 'action="/ui/groups/yard/config"' in html
    ok, text, target = fleet.ops.act("/ui/groups/yard/config", _config_form([("SITE", "yard-1", False),
                                                                            ("API_KEY", "k", True)]))
    assert ok and target == "/ui/groups/yard", text
    assert api(s, f"{CONFIG}/group/yard")["configured"] == {"API_KEY": "********", "SITE": "yard-1"}
    assert 'value="********"' in fleet.ops.page("/ui/groups/yard") and 'value="k"' not in fleet.ops.page("/ui/groups/yard")
    assert d.http.get("/api/devices/v1/deviceconfig/configuration", headers=d.headers).json()["SITE"] == "yard-1"
    ok, text, _ = fleet.ops.act("/ui/groups/bad%20group/config", _config_form([("A", "1", False)]))
    assert not ok and text.startswith("invalid group name"), text


# ---------------------------------------------------------------------------------------------------------
# Attacks: each forged action is refused with 403 and changes nothing


def test_attack_forged_posts_are_refused(fleet: Fleet) -> None:
    """An attacker's page makes the operator's browser post the accept form. The session cookie is SameSite=Strict,
    so a real browser sends none (the post goes to the login form); a browser that sent it anyway still lacks the
    page's CSRF token, or sends another session's, or betrays the other site in Origin or Referer."""
    s = fleet.server
    d = pending_device(s)
    device_id = d.id()
    path = "/ui/devices/pending"
    form = {"ids": device_id, "decision": "accept"}
    own, other = fleet.ops.csrf(), fleet.ops2.csrf()
    assert own != other
    before = last_audit_id(s)
    for csrf, headers, why in (
        (None, {}, "no CSRF token"),
        ("", {"Origin": "https://evil.example"}, "another site's Origin"),
        ("", {"Origin": "null"}, "an opaque Origin"),
        ("x" * 43, {}, "a wrong token"),
        (own[:-1] + ("A" if own[-1] != "A" else "B"), {}, "a token off by one character"),
        (other, {}, "another session's token"),
        ("", {"Origin": "", "Referer": f"http://evil.example:{s.url.rsplit(':', 1)[1]}/ui/"}, "another site's Referer"),
    ):
        hdrs = dict(headers)
        if hdrs.get("Origin") == "":
            del hdrs["Origin"]
        with fleet.ops.http() as c:
            data = dict(form, **({"csrf": own if csrf == "" else csrf} if csrf is not None else {}))
            base = {} if "Referer" in hdrs else {"Origin": s.url}
            r = c.post(path, data=data, headers={**base, **hdrs})
        assert r.status_code == 403, (why, r.status_code, r.text[:300])
        assert "ota_flash" not in r.cookies and 'id="refused"' in r.text, why
    assert api(s, f"{DEVAUTH}/{device_id}")["status"] == "pending"
    refusals = audit_since(s, before)
    assert len(refusals) == 4 and {e["summary"] for e in refusals} == {"refused: missing or wrong CSRF token"}
    assert {e["actor"] for e in refusals} == {"ops"}

    # a cross-site post carries no session: login required, nothing done
    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post(path, data=dict(form, csrf=own), headers={"Origin": "https://evil.example"})
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?")
    # the honest post works (so each refusal above was for its own defect)
    ok, text, _ = fleet.ops.act(path, form)
    assert ok and api(s, f"{DEVAUTH}/{device_id}")["status"] == "accepted"


def test_attack_read_scope_cannot_act(fleet: Fleet) -> None:
    """A read-only token sees no forms, and a forged post — even with the CSRF token its session would have — is
    refused and written to the audit log."""
    from ota_server.settings import load_or_create_secrets

    s = fleet.server
    d = pending_device(s)
    device_id = d.id()
    auth_id = api(s, f"{DEVAUTH}/{device_id}")["auth_sets"][0]["id"]
    dep_id = deploy(s, name="read cannot abort", artifact_name="vv-app-2.0", devices=[accepted_device(s)[1]])
    for page in ("/ui/", f"/ui/devices/{device_id}", f"/ui/deployments/{dep_id}", "/ui/deployments", "/ui/groups/yard"):
        html = fleet.viewer.page(page)
        assert 'name="csrf"' not in html and 'method="post" action="/ui/logout"' in html, page
        assert "<form" not in html.replace('<form class="logout"', ""), page
    with fleet.viewer.http() as c:
        assert c.get("/ui/deploy").status_code == 403

    import hashlib
    import hmac

    key = load_or_create_secrets(s.workdir / "storage").session_key
    mac = hmac.new(key, f"csrf1.session.{fleet.viewer.cookie}".encode(), hashlib.sha256).digest()
    csrf = base64.urlsafe_b64encode(mac).decode().rstrip("=")
    before, count = last_audit_id(s), deployment_count(s)
    for path, form in ((f"/ui/devices/{device_id}/auth/{auth_id}/status", {"status": "accepted"}),
                       ("/ui/devices/pending", {"ids": device_id, "decision": "accept"}),
                       ("/ui/deploy", _deploy_form(target="all")),
                       (f"/ui/deployments/{dep_id}/status", {"status": "aborted"}),
                       (f"/ui/deployments/{dep_id}/rollback", {}),
                       (f"/ui/devices/{device_id}/config", _config_form([("A", "1", False)])),
                       ("/ui/groups/yard/config", _config_form([("A", "1", False)]))):
        r = fleet.viewer.post(path, form, csrf=csrf)
        assert r.status_code == 403 and "needs a token with scope" in r.text, (path, r.status_code)
    assert api(s, f"{DEVAUTH}/{device_id}")["status"] == "pending" and deployment_count(s) == count
    assert api(s, f"{DEPLOYMENTS}/{dep_id}")["status"] == "pending"
    assert api(s, f"{CONFIG}/device/{device_id}")["configured"] == {}
    entries = audit_since(s, before)
    assert len(entries) == 7 and {(e["actor"], e["summary"]) for e in entries} == {
        ("viewer", "refused: needs scope operate")}


def test_flash_cookie_is_signed_and_strict(fleet: Fleet) -> None:
    r = fleet.ops.post("/ui/devices/pending", {"decision": "accept"})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    for attr in ("HttpOnly", "SameSite=strict", "Path=/ui", "Max-Age=120"):
        assert attr.lower() in cookie.lower(), cookie
    flash = r.cookies["ota_flash"]
    assert 'id="flash"' in fleet.ops.page("/ui/", flash=flash)
    kind, payload, mac = flash.split(".")
    forged = base64_json([False, "Your session expired: log in at https://evil.example"])
    for bad in (f"{kind}.{forged}.{mac}", f"{kind}.{payload}.{mac[:-2]}", "garbage"):
        assert 'id="flash"' not in fleet.ops.page("/ui/", flash=bad)


def base64_json(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


# ---------------------------------------------------------------------------------------------------------
# A real browser clicks through


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands
    on its fd 3, answers and events on its fd 4, JSON messages ended by NUL), in its own process group."""

    def __init__(self, binary: str, profile: Path) -> None:
        from .test_dashboard import CHROMIUM_FLAGS

        to_chrome, self._in = os.pipe()
        self._out, from_chrome = os.pipe()

        def fds() -> None:  # in the child, before exec
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=fds, close_fds=False, start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf = b""
        self._next = 0
        self.session = ""
        target = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.send("Page.enable")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._in, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._out, 1 << 20)
                assert chunk, "Chromium closed the DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
        raise TimeoutError(method)

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        """Evaluate until true in JavaScript's sense (a navigation in between destroys the context: try again)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                if self.js(f"!!({expression})") is True:
                    return
            if time.monotonic() > deadline:
                where = self.js("location.href + ' ' + document.title + ': ' + document.body.innerText.slice(0, 500)")
                raise AssertionError(f"timed out waiting for {expression} on {where}")
            time.sleep(0.2)

    def go(self, url: str, ready: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for(ready)

    def click(self, selector: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        print(f"screenshot: {path}")

    def close(self) -> None:
        from .test_dashboard import _kill_group

        with contextlib.suppress(OSError):
            os.close(self._in)
        with contextlib.suppress(OSError):
            os.close(self._out)
        _kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _flash_is(text: str) -> str:
    return f"(document.querySelector('#flash') || {{}}).textContent === {json.dumps(text)}"


@pytest.mark.slow
def test_chromium_clicks_through(fleet: Fleet, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An operator in a real browser accepts a pending device from the pending list, deploys to it from its page,
    and aborts the deployment: real form posts with the browser's own cookies, Origin and CSRF field."""
    from .test_dashboard import SCREENSHOTS, _group_alive, chromium_binary

    s = fleet.server
    d = pending_device(s)
    device_id = d.id()
    before = last_audit_id(s)
    browser = Browser(chromium_binary(), tmp_path / "profile")
    request.addfinalizer(browser.close)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    backend = "postgresql" if s.db_url.startswith("postgresql") else "sqlite"

    with httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.post("/ui/login-link", params={"next": "/ui/"}, headers={"Authorization": f"Bearer {fleet.tokens['ops']}"})
    assert r.status_code == 200, r.text
    browser.go(s.url + r.json()["url"], "document.querySelector('#review-pending')")
    browser.click("#review-pending")
    browser.wait_for(f"document.querySelector('#tick-{device_id}')")
    browser.screenshot(SCREENSHOTS / f"actions-{backend}-1-pending.png")
    browser.click(f"#tick-{device_id}")
    browser.click("#accept-selected")
    browser.wait_for(_flash_is("accepted 1 of 1 device(s)"))
    browser.screenshot(SCREENSHOTS / f"actions-{backend}-2-accepted.png")
    assert api(s, f"{DEVAUTH}/{device_id}")["status"] == "accepted"

    browser.go(f"{s.url}/ui/devices/{device_id}", "document.querySelector('#deploy-here')")
    browser.click("#deploy-here")
    browser.wait_for(f"document.querySelector('#deploy-devices') && "
                     f"document.querySelector('#deploy-devices').value === {json.dumps(device_id)}")
    browser.js("document.querySelector('#deploy-name').value = 'chromium rollout'; "
               "document.querySelector('#deploy-artifact').value = 'vv-app-2.0'")
    browser.screenshot(SCREENSHOTS / f"actions-{backend}-3-deploy-form.png")
    browser.click("#create-deployment")
    browser.wait_for(_flash_is("deployment 'chromium rollout' created"))
    deployment_id = browser.js("location.pathname").rsplit("/", 1)[1]
    doc = api(s, f"{DEPLOYMENTS}/{deployment_id}")
    assert doc["name"] == "chromium rollout" and doc["target"] == {"devices": [device_id]}
    browser.screenshot(SCREENSHOTS / f"actions-{backend}-4-deployment.png")

    browser.click("#abort")
    browser.wait_for(_flash_is("deployment aborted"))
    browser.screenshot(SCREENSHOTS / f"actions-{backend}-5-aborted.png")
    assert api(s, f"{DEPLOYMENTS}/{deployment_id}")["status"] == "aborted"
    assert "abort" not in browser.js("document.querySelector('#actions') ? 'abort' : ''")
    entries = [e for e in reversed(audit_since(s, before)) if not e["summary"].startswith("dashboard login")]
    assert [(e["actor"], e["path"]) for e in entries] == [
        ("ops", "/ui/devices/pending"), ("ops", "/ui/deploy"), ("ops", f"/ui/deployments/{deployment_id}/status")]
    browser.close()
    assert not _group_alive(browser.proc.pid), "Chromium processes left behind"
