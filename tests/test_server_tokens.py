"""Update server: named API tokens with scopes (read < operate < admin), the ``build.py server token`` commands,
the bootstrap admin token's rules, the audit log (API and dashboard page), and /metrics, /docs behind a token.
The tests on the ``srv`` fixture run on SQLite and on PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_helpers import ADMIN_TOKEN, Device, Server, write_artifact
from .test_server_cli import one_error, run
from .test_server_sbom import provenance as sbom_provenance
from .test_server_sbom import release as sbom_release

MGMT = "/api/management"
DEVAUTH = f"{MGMT}/v2/devauth/devices"
TOKENS = f"{MGMT}/v1/tokens"
AUDIT = f"{MGMT}/v1/audit"
CONFIG = f"{MGMT}/v1/deviceconfig/configurations"


def create_token(db_url: str, name: str, scope: str) -> str:
    p = run("server", "token", "create", "--name", name, "--scope", scope, "--db", db_url)
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert re.fullmatch(r"vvota_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", token), p.stdout
    assert "shown only this once" in p.stderr
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def srv(db_url: str | None, tmp_path_factory: pytest.TempPathFactory,
        keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    """Two workers: a revocation must be seen by whichever worker answers. On each database (``db_url``)."""
    s = Server(tmp_path_factory.mktemp("tokens"), "--release-key", str(keys["ec"][1]), workers=2,
               db_url=db_url).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokens(srv: Server) -> dict[str, str]:
    """One token per scope, made with the CLI on the running server's database."""
    return {scope: create_token(srv.db_url, f"t-{scope}", scope) for scope in ("read", "operate", "admin")}


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_token_cli(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/ota.db"
    token = create_token(db, "ci-publisher", "operate")
    assert create_token(db, "ops_2", "admin") != token
    # listed without the token; `server --db URL token list` takes the server's --db
    for args in (("server", "token", "list", "--db", db), ("server", "--db", db, "token", "list")):
        p = run(*args)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0].split() == ["NAME", "SCOPE", "ID", "CREATED", "CREATED", "BY"]
        assert [line.split()[:2] for line in lines[1:]] == [["ci-publisher", "operate"], ["ops_2", "admin"]]
        assert token not in p.stdout and token.split("_")[1] in p.stdout  # the public id only
    listed = json.loads(run("server", "token", "list", "--json", "--db", db).stdout)
    assert [(t["name"], t["scope"]) for t in listed] == [("ci-publisher", "operate"), ("ops_2", "admin")]
    assert all(t["created_by"].startswith("cli:") and set(t) == {"name", "scope", "id", "created", "created_by"}
               for t in listed)
    # only the hash is stored
    stored = (tmp_path / "ota.db").read_bytes() + ((tmp_path / "ota.db-wal").read_bytes()
                                                   if (tmp_path / "ota.db-wal").exists() else b"")
    assert token.encode() not in stored and token.split("_", 2)[2].encode() not in stored
    # refusals: one error line, exit 2
    for args, message in ((("--name", "ci-publisher", "--scope", "read"), "exists"),
                          (("--name", "bad name", "--scope", "read"), "invalid token name"),
                          (("--name", "-x", "--scope", "read"), "invalid token name"),
                          (("--name", "bootstrap", "--scope", "read"), "bootstrap"),
                          (("--name", "x" * 65, "--scope", "read"), "invalid token name")):
        p = run("server", "token", "create", *args, "--db", db)
        assert p.returncode == 2 and message in one_error(p), (args, p.stderr)
    p = run("server", "token", "create", "--name", "x", "--scope", "root", "--db", db)
    assert p.returncode == 2 and "root" in p.stderr
    p = run("server", "token", "revoke", "ci-publisher", "--db", db)
    assert p.returncode == 0 and "revoked" in p.stderr, p.stderr
    for name, message in (("ci-publisher", "no token named"), ("bootstrap", "OTA_ADMIN_TOKEN")):
        p = run("server", "token", "revoke", name, "--db", db)
        assert p.returncode == 2 and message in one_error(p)
    p = run("server", "token", "list", "--db", db)
    assert "ci-publisher" not in p.stdout and "ops_2" in p.stdout
    # the name is free again; the token is a new one
    assert create_token(db, "ci-publisher", "read") != token
    # every change is in the audit log, by the command line's user
    import sqlalchemy as sa

    engine = sa.create_engine(db)
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT actor, method, path, summary FROM audit_log ORDER BY id")).all()
    engine.dispose()
    assert [r.summary for r in rows] == [
        "created API token 'ci-publisher' with scope operate", "created API token 'ops_2' with scope admin",
        "revoked API token 'ci-publisher' (scope operate)", "created API token 'ci-publisher' with scope read"]
    assert all(r.actor.startswith("cli:") and r.method == "CLI" and r.path.startswith("server token ") for r in rows)
    # `build.py server` itself is still the server command (its options, then the subcommand)
    p = run("server", "--help")
    assert p.returncode == 0 and "--device-token-ttl" in p.stdout and "token" in p.stdout
    assert "create" in run("server", "token", "--help").stdout


@pytest.mark.parametrize("how", ["env", "file"])
def test_short_bootstrap_token_refused(tmp_path: Path, how: str) -> None:
    base = ["server", "--storage", tmp_path / "s", "--db", f"sqlite:///{tmp_path}/db.sqlite"]
    short = "x" * 31
    if how == "env":
        p = run(*base, env={"OTA_ADMIN_TOKEN": short})
        where = "OTA_ADMIN_TOKEN"
    else:
        (tmp_path / "token").write_text(short + "\n")
        p = run(*base, "--admin-token-file", tmp_path / "token")
        where = "--admin-token-file"
    error = one_error(p)
    assert p.returncode == 2 and where in error and "at least 32 characters" in error and "31" in error


def test_bootstrap_token_not_in_the_workers_environment(srv: Server) -> None:
    """The workers get the bootstrap token's SHA-256 only (OTA_ADMIN_TOKEN is dropped before they start)."""
    assert srv.proc is not None
    children = [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()]
    workers = []
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if b"OTA_SERVER_SETTINGS=" in environ:
            workers.append(pid)
            assert ADMIN_TOKEN.encode() not in environ and b"OTA_ADMIN_TOKEN" not in environ
    assert len(workers) >= 2, children  # the workers (and any helper process spawned with their environment)


# ---------------------------------------------------------------------------------------------------------
# Scopes


def test_scopes(srv: Server, tokens: dict[str, str]) -> None:
    c = srv.client()
    read, operate, admin = (bearer(tokens[s]) for s in ("read", "operate", "admin"))
    dev = Device(srv, "ed25519")
    body = {"identity_data": dev.identity, "pubkey": dev.pubkey}
    # reading: every scope
    for h in (read, operate, admin, bearer(ADMIN_TOKEN)):
        assert c.get(DEVAUTH, headers=h).status_code == 200
        assert c.get(f"{MGMT}/v1/deployments/deployments", headers=h).status_code == 200
    # changing the fleet: operate and above; read gets a 403 that says what is missing
    r = c.post(DEVAUTH, headers=read, json=body)
    assert r.status_code == 403
    assert r.json()["error"] == f"the token 't-read' has scope 'read'; POST {DEVAUTH} needs 'operate'"
    r = c.post(DEVAUTH, headers=operate, json=body)
    assert r.status_code == 201
    device_id = r.headers["Location"].rsplit("/", 1)[1]
    assert c.put(f"{CONFIG}/device/{device_id}", headers=read, json={"A": 1}).status_code == 403
    assert c.put(f"{CONFIG}/device/{device_id}", headers=operate, json={"A": 1}).status_code == 204
    assert c.delete(f"{DEVAUTH}/{device_id}", headers=read).status_code == 403
    # tokens and the audit log: admin only
    for h, status in ((read, 403), (operate, 403), (admin, 200), (bearer(ADMIN_TOKEN), 200)):
        assert c.get(TOKENS, headers=h).status_code == status
        assert c.get(AUDIT, headers=h).status_code == status
    r = c.post(TOKENS, headers=operate, json={"name": "sneaky", "scope": "admin"})
    assert r.status_code == 403 and "needs 'admin'" in r.json()["error"]
    # none, unknown, malformed, a device token: 401 (never 403)
    dev2 = Device(srv)
    dev2.accept()
    wrong = tokens["admin"][:-4] + "AAAA"
    for h in ({}, {"Authorization": "Bearer"}, bearer("garbage"), bearer(wrong), bearer("vvota_0123456789abcdef_x"),
              bearer(ADMIN_TOKEN + "x"), dev2.headers, {"Authorization": f"Basic {tokens['admin']}"}):
        r = c.post(DEVAUTH, headers=h, json=body)
        assert r.status_code == 401 and r.json()["error"], (h, r.text)
    # whatever the body: a token without the scope is 403 before the body is looked at
    r = c.post(DEVAUTH, headers={**read, "Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 403
    r = c.post(DEVAUTH, headers={"Content-Type": "application/json"}, content=b"{not json")
    assert r.status_code == 401


def test_every_management_route_declares_its_scope(tmp_path: Path) -> None:
    """The app's routes, each with the scope it declares; a read token gets 403 on every route that needs more."""
    from ota_server.app import create_app, route_scopes
    from ota_server.db import migrate
    from ota_server.settings import Settings

    url = f"sqlite:///{tmp_path}/ota.db"
    migrate(url)
    app = create_app(Settings(db_url=url, storage=tmp_path, admin_token_sha256="0" * 64))
    declared = {f"{method} {path}": scope for (method, path), scope in route_scopes(app).items()}
    management = {k: v for k, v in declared.items() if k.split(" ", 1)[1].startswith(MGMT)}
    assert len(management) >= 30 and None not in management.values(), management
    for label, scope in management.items():
        method, path = label.split(" ", 1)
        wanted = "admin" if path.startswith((TOKENS, AUDIT)) else "read" if method == "GET" else "operate"
        assert scope == wanted, (label, scope)
    assert declared["GET /metrics"] == declared["GET /openapi.json"] == declared["GET /docs"] == "read"
    assert declared["POST /ui/login-link"] == "read"
    unprotected = {k for k, v in declared.items() if v is None}
    assert all(k.split(" ", 1)[1].startswith(("/api/devices/", "/ui", "/health")) or k.split(" ", 1)[1] == "/"
               for k in unprotected), unprotected
    # the schema says it too
    schema = app.openapi()
    op = schema["paths"][DEVAUTH]["post"]
    assert op["x-required-scope"] == "operate" and "scope `operate`" in op["description"]
    app.state.ctx.db.dispose()


def test_read_token_refused_on_every_change(srv: Server, tokens: dict[str, str]) -> None:
    from ota_server.app import create_app, route_scopes
    from ota_server.settings import Settings

    app = create_app(Settings(db_url=srv.db_url, storage=srv.storage, admin_token_sha256="0" * 64))
    c = srv.client()
    checked = 0
    for (method, route_path), scope in route_scopes(app).items():
        if scope in (None, "read"):
            continue
        path = re.sub(r"\{[^}]+\}", "x", route_path)
        for token, status in ((tokens["read"], 403), (tokens["operate"], 403 if scope == "admin" else None)):
            r = c.request(method, path, headers={**bearer(token), "Content-Type": "application/json"},
                          content=b"{}")
            if status is not None:
                assert r.status_code == status and f"needs '{scope}'" in r.json()["error"], (method, path, r.text)
            else:
                assert r.status_code not in (401, 403), (method, path, r.text)
        checked += 1
    assert checked >= 12
    app.state.ctx.db.dispose()


def test_revoked_token_refused_at_once(srv: Server) -> None:
    token = create_token(srv.db_url, "short-lived", "operate")
    c = srv.client()
    for _ in range(6):  # both workers know it
        assert c.get(DEVAUTH, headers=bearer(token)).status_code == 200
    with srv.admin() as a:
        assert a.delete(f"{TOKENS}/short-lived").status_code == 204
        assert a.delete(f"{TOKENS}/short-lived").status_code == 404
        assert a.delete(f"{TOKENS}/bootstrap").status_code == 400
    for _ in range(6):  # neither worker accepts it any more
        r = c.get(DEVAUTH, headers=bearer(token))
        assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_token_api(srv: Server, tokens: dict[str, str]) -> None:
    c = srv.client()
    admin = bearer(tokens["admin"])
    r = c.post(TOKENS, headers=admin, json={"name": "made-by-api", "scope": "read"})
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    made = r.json()
    assert made["name"] == "made-by-api" and made["scope"] == "read" and made["token"].startswith("vvota_")
    assert c.get(DEVAUTH, headers=bearer(made["token"])).status_code == 200
    assert c.post(TOKENS, headers=admin, json={"name": "made-by-api", "scope": "read"}).status_code == 409
    for bad in ({"name": "x y", "scope": "read"}, {"name": "x", "scope": "root"}, {"name": "bootstrap", "scope": "read"},
                {"name": "x", "scope": "read", "token": "chosen"}):
        assert c.post(TOKENS, headers=admin, json=bad).status_code == 400, bad
    listed = {t["name"]: t for t in c.get(TOKENS, headers=admin).json()}
    assert listed["made-by-api"]["created_by"] == "token:t-admin" and listed["t-read"]["scope"] == "read"
    assert all(set(t) == {"name", "scope", "id", "created", "created_by"} for t in listed.values())
    assert c.delete(f"{TOKENS}/made-by-api", headers=admin).status_code == 204
    assert c.get(DEVAUTH, headers=bearer(made["token"])).status_code == 401


# ---------------------------------------------------------------------------------------------------------
# The audit log


def test_audit_log(srv: Server, tokens: dict[str, str]) -> None:
    c = srv.client()
    operate, admin = bearer(tokens["operate"]), bearer(tokens["admin"])
    dev = Device(srv, "ec")
    assert dev.auth().status_code == 401
    device_id = dev.id()
    aset = c.get(f"{DEVAUTH}/{device_id}", headers=operate).json()["auth_sets"][0]["id"]
    assert c.put(f"{DEVAUTH}/{device_id}/auth/{aset}/status", headers=operate,
                 json={"status": "accepted"}).status_code == 204
    assert c.put(f"{MGMT}/v1/inventory/devices/{device_id}/group", headers=operate,
                 json={"group": "lobby"}).status_code == 204
    assert c.put(f"{CONFIG}/group/lobby", headers=operate,
                 json={"DVR_IP": "10.0.0.5", "DVR_PASSWORD": "s3cret", "_secrets": ["DVR_PASSWORD"]}).status_code == 204
    assert c.put(f"{CONFIG}/group/lobby", headers=bearer(tokens["read"]), json={}).status_code == 403
    assert c.put(f"{CONFIG}/group/lobby", headers=operate, json={"bad name": 1}).status_code == 400  # no change
    assert c.delete(f"{DEVAUTH}/{device_id}", headers=operate).status_code == 204
    entries = c.get(AUDIT, headers=admin, params={"limit": 5}).json()
    assert [(e["actor"], e["method"], e["summary"]) for e in reversed(entries)] == [
        ("t-operate", "PUT", f"auth set {aset} of device {device_id} set to accepted (device now accepted)"),
        ("t-operate", "PUT", f"device {device_id} moved to group lobby"),
        ("t-operate", "PUT", "replaced the variables of group lobby: DVR_IP, DVR_PASSWORD (secret: DVR_PASSWORD)"),
        ("t-read", "PUT", "refused: needs scope operate"),
        ("t-operate", "DELETE", f"decommissioned device {device_id}"),
    ]
    assert entries[0]["path"] == f"{DEVAUTH}/{device_id}" and entries[-1]["path"] == f"{DEVAUTH}/{device_id}/auth/{aset}/status"
    assert "s3cret" not in json.dumps(entries)  # names, never values
    assert all(abs(e["ts"] - time.time()) < 120 and e["time"].endswith("Z") for e in entries)
    # paging: before = the last id seen
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True)
    older = c.get(AUDIT, headers=admin, params={"limit": 2, "before": ids[1]}).json()
    assert [e["id"] for e in older] == ids[2:4]
    everything = c.get(AUDIT, headers=admin, params={"limit": 1000}).json()
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)
    for bad in ({"limit": 0}, {"limit": 1001}, {"before": 0}, {"limit": "x"}):
        assert c.get(AUDIT, headers=admin, params=bad).status_code == 400


def test_every_change_is_audited(srv: Server, tokens: dict[str, str], run_cli: Any, keys: dict[str, tuple[Path, Path]],
                                  tmp_path: Path) -> None:
    """Each route that changes something, called once with success, adds exactly one entry naming the token,
    the method and the path; together they cover every non-GET management route. The audit reads pass
    ``before=2**62`` (the largest the API takes): on PostgreSQL, whose id column is 32 bits, that once gave a 500."""
    from ota_server.app import create_app, route_scopes
    from ota_server.settings import Settings

    c = srv.client()
    h = bearer(tokens["operate"])
    last = c.get(AUDIT, headers=bearer(tokens["admin"]), params={"limit": 1}).json()[0]["id"]
    done: list[tuple[str, str]] = []

    def call(method: str, path: str, status: int, **kw: Any) -> httpx.Response:
        nonlocal last
        r = c.request(method, path, headers={**h, **kw.pop("headers", {})}, **kw)
        assert r.status_code == status, (method, path, r.text)
        new = c.get(AUDIT, headers=bearer(tokens["admin"]), params={"before": 2**62}).json()
        new = [e for e in new if e["id"] > last]
        assert [(e["actor"], e["method"], e["path"]) for e in new] == [("t-operate", method, path)], new
        assert new[0]["summary"]
        last = new[0]["id"]
        done.append((method, path))
        return r

    dev = Device(srv, "ec")
    r = call("POST", DEVAUTH, 201, json={"identity_data": dev.identity, "pubkey": dev.pubkey})
    device_id = r.headers["Location"].rsplit("/", 1)[1]
    assert dev.auth().status_code == 200  # preauthorized: accepted now
    aset = c.get(f"{DEVAUTH}/{device_id}", headers=h).json()["auth_sets"][0]["id"]
    call("PUT", f"{DEVAUTH}/{device_id}/auth/{aset}/status", 204, json={"status": "accepted"})
    assert dev.auth().status_code == 200
    newcomer = Device(srv, "ec")
    assert newcomer.auth().status_code == 401  # pending
    r = call("POST", f"{DEVAUTH}/accept", 200, json={"filter": {"identity": newcomer.identity}})
    assert [x["result"] for x in r.json()["results"]] == ["accepted"]  # bulk accept: one entry per accepted device
    call("POST", f"{MGMT}/v2/devauth/certificates/revoked", 201, json={"serial": "a1b2c3", "reason": "audited"})
    card = Device(srv, "ed25519", identity={"device_id": "audited-card"})
    call("POST", f"{DEVAUTH}/provision", 200, json={"devices": [  # one device provisioned: one entry
        {"identity_data": card.identity, "pubkey": card.pubkey, "group": None, "variables": {}, "secrets": []}]})
    call("PUT", f"{MGMT}/v1/inventory/devices/{device_id}/group", 204, json={"group": "audited"})
    call("PUT", f"{CONFIG}/device/{device_id}", 204, json={"A": "1"})
    call("PUT", f"{CONFIG}/group/audited", 204, json={"B": "2"})
    call("POST", f"{MGMT}/v1/inventory/import/ansible", 200, content=b"all:\n  hosts:\n    nobody: {}\n",
         headers={"Content-Type": "application/yaml"})
    art = write_artifact(run_cli, tmp_path / "a.mender", "audit-1", key=keys["ec"][0])
    with open(art, "rb") as f:
        r = call("POST", f"{MGMT}/v1/deployments/artifacts", 201, files={"artifact": ("a.mender", f)})
    artifact_id = r.headers["Location"].rsplit("/", 1)[1]
    (tmp_path / "sbom").mkdir()
    documented, sbom = sbom_release(tmp_path / "sbom", "audit-sbom", [("libc6", "2.36-9")], keys["ec"][0])
    with open(documented, "rb") as f:
        r = call("POST", f"{MGMT}/v1/deployments/artifacts", 201, files={"artifact": ("s.mender", f)})
    documented_id = r.headers["Location"].rsplit("/", 1)[1]
    call("PUT", f"{MGMT}/v1/deployments/artifacts/{documented_id}/sbom", 204, content=sbom,
         headers={"Content-Type": "application/json"})
    call("PUT", f"{MGMT}/v1/deployments/artifacts/{documented_id}/provenance", 204,
         content=sbom_provenance(keys["ec"][0], artifact=documented), headers={"Content-Type": "application/json"})
    r = call("POST", f"{MGMT}/v1/deployments/deployments", 201,
             json={"name": "audit", "artifact_name": "audit-1", "devices": [device_id]})
    deployment_id = r.headers["Location"].rsplit("/", 1)[1]
    before = write_artifact(run_cli, tmp_path / "b.mender", "audit-0", key=keys["ec"][0], seed=2)
    with open(before, "rb") as f:  # what the device ran: a rollback sends it back there
        call("POST", f"{MGMT}/v1/deployments/artifacts", 201, files={"artifact": ("b.mender", f)})
    assert dev.next("audit-0").json()["id"] == deployment_id
    assert dev.status(deployment_id, "success").status_code == 204
    r = call("POST", f"{MGMT}/v1/deployments/deployments/{deployment_id}/rollback", 201, json={"name": "undo"})
    call("PUT", f"{MGMT}/v1/deployments/deployments/{r.json()['id']}/status", 204, json={"status": "aborted"})
    call("DELETE", f"{MGMT}/v1/deployments/artifacts/{artifact_id}", 204)
    call("DELETE", f"{MGMT}/v1/inventory/devices/{device_id}/group/audited", 204)
    call("DELETE", f"{DEVAUTH}/{device_id}", 204)
    h = bearer(tokens["admin"])
    tokens_before = last
    r = c.post(TOKENS, headers=h, json={"name": "audited", "scope": "read"})
    assert r.status_code == 201
    assert c.delete(f"{TOKENS}/audited", headers=h).status_code == 204
    new = [e for e in c.get(AUDIT, headers=h).json() if e["id"] > tokens_before]
    assert [(e["actor"], e["method"], e["path"]) for e in reversed(new)] == [
        ("t-admin", "POST", TOKENS), ("t-admin", "DELETE", f"{TOKENS}/audited")]
    done += [("POST", TOKENS), ("DELETE", f"{TOKENS}/audited")]
    # every changing management route was among them
    app = create_app(Settings(db_url=srv.db_url, storage=srv.storage, admin_token_sha256="0" * 64))
    changing = {(m, p) for (m, p), scope in route_scopes(app).items() if p.startswith(MGMT) and m != "GET"}
    app.state.ctx.db.dispose()
    covered = {(m, p) for m, p in changing
               for dm, dp in done if dm == m and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", p), dp)}
    assert covered == changing, changing - covered


# ---------------------------------------------------------------------------------------------------------
# /metrics and /docs


def test_metrics_and_docs_need_a_token(srv: Server, tokens: dict[str, str]) -> None:
    c = srv.client()
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        r = c.get(path)
        assert r.status_code == 401 and r.json()["error"], path
        assert c.get(path, headers=bearer("wrong")).status_code == 401
        assert c.get(path, headers=bearer(tokens["read"])).status_code == 200, path
    assert "ota_http_requests_total" in c.get("/metrics", headers=bearer(tokens["read"])).text
    assert c.get("/openapi.json", headers=bearer(tokens["read"])).json()["paths"]
    assert c.get("/health").status_code == 200  # the load balancer's check stays open


def test_public_metrics_and_docs(tmp_path: Path) -> None:
    s = Server(tmp_path, "--public-metrics", "--public-docs").start()
    try:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(s.url + path).status_code == 200, path
        schema = httpx.get(s.url + "/openapi.json").json()
        assert "x-required-scope" not in schema["paths"]["/metrics"]["get"]
        assert httpx.get(s.url + DEVAUTH).status_code == 401  # the API itself is not public
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------------
# Dashboard


def _session(srv: Server, token: str) -> str:
    r = httpx.post(srv.url + "/ui/login", data={"token": token, "next": "/ui/"})
    assert r.status_code == 303, r.text
    m = re.match(r"ota_session=([^;]+);", r.headers["set-cookie"])
    assert m
    return m.group(1)


def _page(srv: Server, path: str, session: str | None = None, token: str | None = None) -> httpx.Response:
    headers = bearer(token) if token else {}
    cookies = {"ota_session": session} if session else None
    return httpx.get(srv.url + path, headers=headers, cookies=cookies, follow_redirects=False)


def test_dashboard_with_named_tokens(srv: Server, tokens: dict[str, str]) -> None:
    # every scope can log in and read; the session names the token, never holds it
    reader = _session(srv, tokens["read"])
    assert reader.startswith("s2.t-read.") and tokens["read"] not in reader
    r = _page(srv, "/ui/", reader)
    assert r.status_code == 200 and 't-read</span>' in r.text
    assert "/ui/audit" not in r.text  # no audit link for a reader
    r = _page(srv, "/ui/audit", reader)
    assert r.status_code == 403 and "scope <b>admin</b>" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'none'")
    # admin: the link on the overview, the page with the entries (escaped, no script)
    admin = _session(srv, tokens["admin"])
    r = _page(srv, "/ui/", admin)
    assert r.status_code == 200 and 'id="audit-link" href="/ui/audit"' in r.text
    with srv.admin() as a:
        assert a.put(f"{CONFIG}/group/{'x' * 10}", json={"<script>alert(1)</script>": 1}).status_code == 400
        assert a.put(f"{CONFIG}/group/ui-test", json={"NAME_1": "v"}).status_code == 204
    r = _page(srv, "/ui/audit", admin)
    assert r.status_code == 200 and "replaced the variables of group ui-test: NAME_1" in r.text
    assert "dashboard login (form)" in r.text and "<code>t-read</code>" in r.text
    assert "<script" not in r.text and r.headers["content-security-policy"] == _page(srv, "/ui/", admin).headers[
        "content-security-policy"]
    first = int(re.search(r'<td class="num">(\d+)</td>', r.text).group(1))  # type: ignore[union-attr]
    r = _page(srv, f"/ui/audit?before={first}", admin)
    assert r.status_code == 200 and f'<td class="num">{first}</td>' not in r.text
    assert _page(srv, "/ui/audit?before=0", admin).status_code == 400
    # Bearer named tokens work on pages; wrong ones are refused
    assert _page(srv, "/ui/audit", token=tokens["admin"]).status_code == 200
    assert _page(srv, "/ui/", token=tokens["operate"]).status_code == 200
    assert _page(srv, "/ui/", token="vvota_0123456789abcdef_nope").status_code == 401
    # login links carry the token that asked for them
    r = httpx.post(srv.url + "/ui/login-link?next=/ui/audit", headers=bearer(tokens["read"]))
    assert r.status_code == 200
    r = httpx.get(srv.url + r.json()["url"], follow_redirects=False)
    assert r.status_code == 303 and "ota_session=s2.t-read." in r.headers["set-cookie"]
    # revoking a token ends its sessions at their next page
    temp = create_token(srv.db_url, "ui-temp", "admin")
    session = _session(srv, temp)
    assert _page(srv, "/ui/audit", session).status_code == 200
    p = run("server", "token", "revoke", "ui-temp", "--db", srv.db_url)
    assert p.returncode == 0, p.stderr
    r = _page(srv, "/ui/", session)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    # a token recreated under the same name does not revive the old sessions
    create_token(srv.db_url, "ui-temp", "admin")
    assert _page(srv, "/ui/", session).status_code == 303


# ---------------------------------------------------------------------------------------------------------
# Schema


def test_migration_0002(tmp_path: Path) -> None:
    """0001 -> 0002 keeps an accepted device's auth set (its new tokens verify), and the migrated schema is the
    one the models describe."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext

    from ota_server.db import MIGRATIONS, head_revision, migrate
    from ota_server.models import Base

    url = f"sqlite:///{tmp_path}/old.db"
    engine = sa.create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(sa.text("INSERT INTO devices (id, identity_json, identity_hash, status, inventory, created, "
                             "updated) VALUES ('d1', '{}', 'h1', 'accepted', '{}', 0, 0), "
                             "('d2', '{}', 'h2', 'pending', '{}', 0, 0)"))
        conn.execute(sa.text("INSERT INTO auth_sets (id, device_id, pubkey, pubkey_hash, status, created) VALUES "
                             "('a0', 'd1', 'k0', 'p0', 'rejected', 0), ('a1', 'd1', 'k1', 'p1', 'accepted', 1), "
                             "('a2', 'd2', 'k2', 'p2', 'pending', 0)"))
    migrate(url)  # 0002 and every later revision
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, auth_set_id, token_epoch FROM devices ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("d1", "a1", 0), ("d2", None, 0)]
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == [], diff
    with engine.begin() as conn:  # and back
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
        assert "api_tokens" not in sa.inspect(conn).get_table_names()
    engine.dispose()
