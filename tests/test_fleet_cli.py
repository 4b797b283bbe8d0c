"""``build.py fleet`` as an operator runs it against the real server with simulated devices: listing, accepting,
rejecting and grouping devices, deploying to a group and following the rollout to its end, aborting, the
configuration round trip that keeps stored secrets, the token from ``cli.toml`` and its permission check, and
bad input that changes nothing. Attack stories: a device that writes terminal escapes or rich markup into its
identity or log, a device that claims a group, and ``--server`` pointed elsewhere to steal the file's token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from build import main
from cli.fleet_deploy import parse_phases, phases_body

from .conftest import BUILD_PY, REPO

# one SQLite server for the module: the CLI's logic does not depend on the database
from .server_helpers import ADMIN_TOKEN, Device, Server, server_fixture, upload, write_artifact  # noqa: F401 - fixture

DEVAUTH = "/api/management/v2/devauth/devices"
CONFIG = "/api/management/v1/deviceconfig/configurations"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"
ESC = "\x1b"


@pytest.fixture(name="config_home")
def config_home_fixture(tmp_path: Path) -> Path:
    """An empty XDG_CONFIG_HOME: the caller's own cli.toml never takes part."""
    home = tmp_path / "xdg"
    home.mkdir()
    return home


Fleet = Callable[..., Result]


@pytest.fixture(name="fleet")
def fleet_fixture(server: Server, config_home: Path) -> Fleet:
    """``build.py fleet ARGS`` in process, with the server and the admin token in the environment."""

    def run(*args: str, env: dict[str, str] | None = None, token: bool = True, input: str | None = None) -> Result:
        base = {"OTA_SERVER_URL": server.url, "XDG_CONFIG_HOME": str(config_home)}
        if token:
            base["OTA_ADMIN_TOKEN"] = ADMIN_TOKEN
        return CliRunner().invoke(main, ["fleet", *args], env={**base, **(env or {})}, input=input)

    return run


def ok(r: Result) -> str:
    assert r.exit_code == 0, (r.exit_code, r.output, r.stderr)
    return r.stdout


def one_line_error(r: Result, code: int, words: str) -> None:
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr


def pending(server: Server, **identity: str) -> Device:
    dev = Device(server, identity=identity or None)
    assert dev.auth().status_code == 401
    return dev


def accepted(server: Server, group: str | None = None, **identity: str) -> tuple[Device, str]:
    dev = Device(server, identity=identity or None)
    device_id = dev.accept()
    if group:
        with server.admin() as a:
            assert a.put(f"/api/management/v1/inventory/devices/{device_id}/group", json={"group": group}).status_code == 204
    return dev, device_id


def status_of(server: Server, device_id: str) -> str:
    with server.admin() as a:
        return str(a.get(f"{DEVAUTH}/{device_id}").json()["status"])


# ---------------------------------------------------------------------------------------------------------
# Devices and groups


def test_devices_accept_reject_and_groups(server: Server, fleet: Fleet) -> None:
    tag = os.urandom(3).hex()
    _, b, c = (pending(server, hostname=f"cli-{tag}-{n}", site=f"s{tag}") for n in "abc")
    listed = json.loads(ok(fleet("devices", "--status", "pending", "--filter", f"site=s{tag}", "--json")))
    assert sorted(d["identity_data"]["hostname"] for d in listed) == [f"cli-{tag}-{n}" for n in "abc"]
    ids = {d["identity_data"]["hostname"][-1]: d["id"] for d in listed}
    assert all(d["status"] == "pending" and len(d["auth_sets"]) == 1 for d in listed)

    ok(fleet("accept", "--id", ids["a"], "--id", ids["b"]))
    assert b.auth().status_code == 200
    # an unknown id among known ones: one line, and the known device is not rejected
    one_line_error(fleet("reject", ids["c"], "no-such-device"), 2, "unknown device 'no-such-device'")
    assert status_of(server, ids["c"]) == "pending"
    answer = json.loads(ok(fleet("reject", ids["c"], "--json")))
    assert answer["rejected"] == 1 and status_of(server, ids["c"]) == "rejected"
    assert c.auth().status_code == 401
    assert "already rejected" in ok(fleet("reject", ids["c"]))

    group = f"lobby_{tag}"
    one_line_error(fleet("group", "set", ids["a"], "nope", "--group", group), 2, "unknown device 'nope'")
    assert json.loads(ok(fleet("devices", "--group", group, "--json"))) == []
    ok(fleet("group", "set", ids["a"], ids["b"], "--group", group))
    one_line_error(fleet("group", "set", ids["a"], "--group", "bad group"), 2, "invalid group name")
    groups = {g["group"]: g for g in json.loads(ok(fleet("groups", "--json")))}
    assert groups[group]["devices"] == 2 and groups[group]["by_status"] == {"accepted": 2}
    assert group in ok(fleet("groups"))
    in_group = json.loads(ok(fleet("devices", "--group", group, "--json")))
    assert sorted(d["id"] for d in in_group) == sorted([ids["a"], ids["b"]])
    table = ok(fleet("devices", "--group", group))
    assert ids["a"] in table and f"cli-{tag}-a" in table and "accepted" in table

    shown = json.loads(ok(fleet("device", "show", ids["a"], "--json")))
    assert shown["group"] == group and shown["identity_data"]["hostname"] == f"cli-{tag}-a"
    assert shown["auth_sets"][0]["status"] == "accepted" and "BEGIN PUBLIC KEY" in shown["auth_sets"][0]["pubkey"]
    assert f"cli-{tag}-a" in ok(fleet("device", "show", ids["a"]))
    one_line_error(fleet("device", "show", "no-such-device"), 2, "unknown device")

    ok(fleet("group", "unset", ids["b"]))
    assert [d["id"] for d in json.loads(ok(fleet("devices", "--group", group, "--json")))] == [ids["a"]]
    assert "in no group" in ok(fleet("group", "unset", ids["b"]))

    # decommission asks first; without a terminal it needs --yes
    one_line_error(fleet("decommission", ids["b"]), 2, "--yes")
    assert status_of(server, ids["b"]) == "accepted"
    ok(fleet("decommission", ids["b"], "--yes"))
    with server.admin() as adm:
        assert adm.get(f"{DEVAUTH}/{ids['b']}").status_code == 404
    assert b.next().status_code == 401


def test_a_device_cannot_draw_on_the_operators_terminal_or_claim_a_group(server: Server, fleet: Fleet) -> None:
    """Attack: identity and inventory are the device's words. Escape sequences (a title change, a hyperlink, a
    cursor move that hides a line) and rich markup in them are shown as text, and an inventory attribute named
    ``group`` does not put the device in that group."""
    evil = f"pi{ESC}]0;owned{ESC}\\[link=https://evil.example]click[/link][red]x\u202e"
    dev, device_id = accepted(server, hostname=evil, mac=f"02:{os.urandom(4).hex()}")
    r = dev.http.patch("/api/devices/v1/inventory/device/attributes", headers=dev.headers,
                       json=[{"name": "group", "value": "vip"}, {"name": "artifact_name", "value": f"v1{ESC}[2K"}])
    assert r.status_code == 200, r.text
    for args in (("devices",), ("device", "show", device_id)):
        out = ok(fleet(*args))
        assert ESC not in out and "\u202e" not in out
        assert "\\x1b]0;owned" in out and "[link=https://evil.example]click[/link]" in out
    shown = json.loads(ok(fleet("device", "show", device_id, "--json")))
    assert shown["group"] is None and shown["inventory"].get("group") == "vip"
    assert device_id not in {d["id"] for d in json.loads(ok(fleet("devices", "--group", "vip", "--json")))}


# ---------------------------------------------------------------------------------------------------------
# Deployments


@pytest.fixture(name="artifact", scope="module")
def artifact_fixture(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
                     ) -> str:
    name = f"cli-{os.urandom(3).hex()}"
    out = tmp_path_factory.mktemp("art") / f"{name}.mender"

    def run_cli(*args: Any, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True,
                              check=check, cwd=REPO)

    write_artifact(run_cli, out, name, key=keys["ec"][0])
    assert upload(server, out).status_code == 201
    return name


def watch_process(server: Server, config_home: Path, deployment_id: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OTA_SERVER_URL=server.url, OTA_ADMIN_TOKEN=ADMIN_TOKEN,
               XDG_CONFIG_HOME=str(config_home))
    return subprocess.Popen([sys.executable, str(BUILD_PY), "fleet", "watch", deployment_id, "--interval", "0.3",
                             "--timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)


def install(dev: Device, deployment_id: str, final: str = "success") -> None:
    r = dev.next(artifact_name="old")
    assert r.status_code == 200 and r.json()["id"] == deployment_id, r.text
    for s in ("downloading", "installing", "rebooting", final):
        assert dev.status(deployment_id, s).status_code == 204


def test_deploy_to_a_group_status_watch_until_finished_and_logs(server: Server, fleet: Fleet, artifact: str,
                                                                config_home: Path) -> None:
    group = f"rollout_{os.urandom(3).hex()}"
    devs = [accepted(server, group=group) for _ in range(2)]
    dep = ok(fleet("deploy", artifact, "--group", group, "--name", "spring", "--phases", "50%@0,100%@0",
                   "--failure-threshold", "50%")).strip()
    with server.admin() as a:
        doc = a.get(f"{DEPLOYMENTS}/{dep}").json()
    assert doc["target"] == {"group": group} and doc["device_count"] == 2 and doc["failure_threshold"] == 50
    assert [p["batch_size"] for p in doc["phases"]] == [50, 50]

    listed = json.loads(ok(fleet("status", "--json")))
    assert any(d["id"] == dep and d["statistics"]["pending"] == 2 for d in listed)
    assert dep in ok(fleet("status"))
    one = json.loads(ok(fleet("status", dep, "--json")))
    assert one["deployment"]["name"] == "spring" and sorted(d["id"] for d in one["devices"]) == sorted(i for _, i in devs)
    assert "spring" in ok(fleet("status", dep))

    watcher = watch_process(server, config_home, dep)
    try:
        time.sleep(1.0)
        assert watcher.poll() is None  # still watching: nothing has finished
        for dev, _ in devs:
            install(dev, dep)
        devs[0][0].http.put(f"/api/devices/v1/deployments/device/deployments/{dep}/log", headers=devs[0][0].headers,
                            json={"messages": [{"timestamp": "2026-12-01T10:00:00Z", "level": "info",
                                                "message": f"installed {ESC}[31mred{ESC}[0m"}]})
        out, err = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, (out, err)
    lines = out.splitlines()
    assert any(f"deployment {dep} finished: success 2" in line for line in lines), out
    for _, device_id in devs:
        assert any(f"device {device_id} " in line and line.endswith("success") for line in lines), out

    log = ok(fleet("logs", dep, devs[0][1]))
    assert "installed \\x1b[31mred\\x1b[0m" in log and ESC not in log
    one_line_error(fleet("logs", dep, "no-such-device"), 2, "no log")
    assert json.loads(ok(fleet("status", dep, "--json")))["statistics"]["success"] == 2


def test_abort_and_watch_of_a_failed_rollout(server: Server, fleet: Fleet, artifact: str) -> None:
    (dev1, id1), (dev2, id2) = accepted(server), accepted(server)
    dep = json.loads(ok(fleet("deploy", artifact, "--devices", f"{id1},{id2}", "--json")))["id"]
    install(dev1, dep, final="failure")
    ok(fleet("abort", dep))
    assert dev2.next().status_code == 204
    r = fleet("watch", dep)
    assert r.exit_code == 1 and "was aborted" in r.stderr, r.output
    assert json.loads(ok(fleet("status", dep, "--json")))["deployment"]["status"] == "aborted"
    one_line_error(fleet("abort", dep), 2, "already ended")
    one_line_error(fleet("watch", "no-such-deployment"), 2, "unknown deployment")

    (dev3, id3) = accepted(server)
    dep = ok(fleet("deploy", artifact, "--devices", id3)).strip()
    install(dev3, dep, final="failure")
    r = fleet("watch", dep)
    assert r.exit_code == 1 and "1 of 1 device(s) not updated" in r.stderr, r.output


def test_bad_deployments_are_refused_in_one_line_and_create_nothing(server: Server, fleet: Fleet, artifact: str) -> None:
    _, device_id = accepted(server)

    def count() -> int:
        with server.admin() as a:
            return len(a.get(DEPLOYMENTS).json())

    before = count()
    for args, words in [
        (("--devices", device_id, "--phases", "10%@0,50%@1h"), "reach 100%"),
        (("--devices", device_id, "--phases", "50%@1h,100%@0"), "must not go back"),
        (("--devices", device_id, "--phases", "ten%"), "PERCENT%[@WAIT]"),
        (("--devices", device_id, "--failure-threshold", "150"), "percentage"),
        (("--devices", device_id, "--group", "g"), "one way"),
        ((), "one way"),
        (("--devices", f"{device_id},no-such-device"), "unknown device(s): no-such-device"),
        (("--filter", "hostname"), "NAME=VALUE"),
        (("--filter", f"hostname=nobody-{os.urandom(3).hex()}"), "no accepted device matches"),
        (("--devices", device_id, "--dynamic"), "--dynamic goes with --group G, --all or --filter"),
        (("--filter", "a=1", "--filter", "a=2", "--dynamic"), "each named once"),
        (tuple(x for i in range(9) for x in ("--filter", f"a{i}=1")) + ("--dynamic",), "1-8 attributes"),
        (("--group", "g", "--gate", "90%+1h"), "--gate needs --phases"),
        (("--group", "g", "--phases", "50%,100%@1h", "--gate", "0%"), "above 0 %"),
        (("--group", "g", "--failure-limit", "x"), "--failure-limit"),
    ]:
        one_line_error(fleet("deploy", artifact, *args), 2, words)
    one_line_error(fleet("deploy", "no-such-release", "--devices", device_id), 2, "no artifact named")
    assert count() == before


def test_a_dynamic_gated_deployment_takes_joiners_until_closed(server: Server, fleet: Fleet, artifact: str) -> None:
    group = f"dyn-{os.urandom(3).hex()}"
    r = fleet("deploy", artifact, "--group", group, "--dynamic", "--phases", "50%,100%@1h", "--gate", "90%+30m",
              "--failure-limit", "20", "--on-failure", "abort", "--json")
    assert r.exit_code == 0, r.output
    dep_id = json.loads(r.output)["id"]
    with server.admin() as a:
        doc = a.get(f"{DEPLOYMENTS}/{dep_id}").json()
    assert doc.get("dynamic") is True, doc
    assert doc["phases"][1]["gate"] == {"min_success_pct": 90.0, "soak_s": 1800.0}, doc["phases"]
    assert doc["failure_limit"] == {"max_failed_pct": 20.0, "on_failure": "abort"}
    _, joiner = accepted(server)
    with server.admin() as a:  # moved into the group: it joins the open deployment
        assert a.put(f"/api/management/v1/inventory/devices/{joiner}/group", json={"group": group}).status_code == 204
        assert joiner in {d["id"] for d in a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}
    closed = fleet("close", dep_id)
    assert closed.exit_code == 0 and f"{dep_id}: closed" in closed.output
    one_line_error(fleet("close", dep_id), 2, "takes no joiners")
    _, late = accepted(server)
    with server.admin() as a:  # closed: a device moved in now does not get it
        assert a.put(f"/api/management/v1/inventory/devices/{late}/group", json={"group": group}).status_code == 204
        assert late not in {d["id"] for d in a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}


def test_a_dynamic_filter_goes_to_the_server(server: Server, fleet: Fleet, artifact: str) -> None:
    hw, group = f"rev-{os.urandom(4).hex()}", f"dynf-{os.urandom(3).hex()}"
    dep_id = json.loads(ok(fleet("deploy", artifact, "--group", group, "--filter", f"hw_rev={hw}", "--dynamic",
                                 "--json")))["id"]
    with server.admin() as a:
        doc = a.get(f"{DEPLOYMENTS}/{dep_id}").json()
    assert doc["dynamic"] is True and doc["target"] == {"group": group, "filter": {"hw_rev": hw}}, doc
    assert f"hw_rev={hw}" in doc["name"] and doc["device_count"] == 0
    dev, joiner = accepted(server, group)
    r = dev.http.patch("/api/devices/v1/inventory/device/attributes", headers=dev.headers,
                       json=[{"name": "hw_rev", "value": hw}])
    assert r.status_code == 200
    assert f"group {group}, inventory hw_rev={hw}" in ok(fleet("status", dep_id))
    with server.admin() as a:  # its inventory came to match: it is in the deployment
        assert joiner in {d["id"] for d in a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}
    assert f"{dep_id}: closed" in ok(fleet("close", dep_id))


def test_rollback_sends_each_device_back_and_names_the_skipped(server: Server, fleet: Fleet, artifact: str,
                                                               keys: dict[str, tuple[Path, Path]],
                                                               tmp_path: Path) -> None:
    def run_cli(*args: Any, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True,
                              check=check, cwd=REPO)

    # "old", what install() says the devices ran, is on the server; "factory-1" is not
    assert upload(server, write_artifact(run_cli, tmp_path / "old.mender", "old", key=keys["ec"][0])).status_code == 201
    (dev1, id1), (dev2, id2) = accepted(server), accepted(server)
    dep = ok(fleet("deploy", artifact, "--devices", f"{id1},{id2}")).strip()
    install(dev1, dep)
    assert dev2.next(artifact_name="factory-1").json()["id"] == dep
    for s in ("downloading", "installing", "rebooting", "success"):
        assert dev2.status(dep, s).status_code == 204
    r = fleet("rollback", dep, "--phases", "50%@0,100%@0", "--name", "undo")
    rb = ok(r).strip()
    assert "1 device(s) go back: 1 × old" in r.stderr and f"skipped {id2}" in r.stderr and "factory-1" in r.stderr
    with server.admin() as a:
        doc = a.get(f"{DEPLOYMENTS}/{rb}").json()
    assert (doc["kind"], doc["rollback_of"], doc["name"], len(doc["phases"])) == ("rollback", dep, "undo", 2)
    body = dev1.next(artifact_name=artifact).json()
    assert body["id"] == rb and body["artifact"]["artifact_name"] == "old" and "header_uri" in body["vv_rollback"]
    one_line_error(fleet("rollback", "no-such-deployment"), 2, "no deployment")
    one_line_error(fleet("rollback", rb), 2, "no device of deployment")


def test_phases_are_cumulative_shares_at_times_after_creation() -> None:
    assert phases_body(parse_phases("10%@0,50%@1h,100%@4h")) == [
        {"wait_s": 0.0, "batch_size": 10}, {"wait_s": 3600.0, "batch_size": 40}, {"wait_s": 10800.0}]
    assert phases_body(parse_phases("100%@30m")) == [{"wait_s": 1800.0}]
    assert phases_body(parse_phases("25%, 100%@2d")) == [{"wait_s": 0.0, "batch_size": 25}, {"wait_s": 172800.0}]


# ---------------------------------------------------------------------------------------------------------
# Configuration


def test_config_set_and_get_keep_a_stored_secret(server: Server, fleet: Fleet) -> None:
    dev, device_id = accepted(server, group=(group := f"cfg_{os.urandom(3).hex()}"))
    ok(fleet("config", "set", "--group", group, "DVR_IP=10.0.0.5", "DVR_PASSWORD=s3cret", "TZ=UTC",
             "--secret", "DVR_PASSWORD"))
    got = json.loads(ok(fleet("config", "get", "--group", group, "--json")))
    assert got["configured"] == {"DVR_IP": "10.0.0.5", "DVR_PASSWORD": "********", "TZ": "UTC"}
    assert got["secrets"] == ["DVR_PASSWORD"]
    shown = ok(fleet("config", "get", "--group", group))
    assert "********" in shown and "s3cret" not in shown

    # change one value, remove another: the secret is kept without ever leaving the server
    out = ok(fleet("config", "set", "--group", group, "DVR_IP=10.0.0.6", "--unset", "TZ"))
    assert "s3cret" not in out and "set DVR_IP" in out and "unset TZ" in out
    ok(fleet("config", "set", "--device", device_id, "DEVICE_ID=cam-1"))
    r = dev.http.get(DEVICE_CONFIG, headers=dev.headers)
    assert r.status_code == 200 and r.json() == {"DVR_IP": "10.0.0.6", "DVR_PASSWORD": "s3cret", "DEVICE_ID": "cam-1"}
    eff = json.loads(ok(fleet("config", "get", "--device", device_id, "--json")))
    assert eff["effective"]["DVR_PASSWORD"] == "********" and eff["effective_secrets"] == ["DVR_PASSWORD"]

    # a new value for a secret stays secret; a plain variable can become one
    ok(fleet("config", "set", "--group", group, "DVR_PASSWORD=n3w", "--secret", "DVR_IP"))
    got = json.loads(ok(fleet("config", "get", "--group", group, "--json")))
    assert got["secrets"] == ["DVR_IP", "DVR_PASSWORD"] and set(got["configured"].values()) == {"********"}
    assert dev.http.get(DEVICE_CONFIG, headers=dev.headers).json()["DVR_PASSWORD"] == "n3w"

    # bad input: one line, nothing written
    before = server.query("SELECT name, value, secret FROM config_values WHERE owner = :o ORDER BY name", o=group)
    for args, words in [
        (("--group", group, "DVR_IP"), "NAME=VALUE"),
        (("--group", group, "=x"), "NAME=VALUE"),
        (("--group", group, "1BAD=x"), "invalid variable name"),
        (("--group", group, "DVR_PASSWORD=********"), "masks secrets"),
        (("--group", group, "--unset", "NOPE"), "not set here"),
        (("--group", group, "A=1", "--unset", "A"), "both set and unset"),
        (("--group", group, "--secret", "NEW"), "give NEW=VALUE"),
        (("--group", group), "nothing to change"),
        (("--device", device_id, "--group", group, "A=1"), "one way"),
        (("--device", "no-such-device", "A=1"), "unknown device"),
    ]:
        one_line_error(fleet("config", "set", *args), 2, words)
    assert server.query("SELECT name, value, secret FROM config_values WHERE owner = :o ORDER BY name", o=group) == before


# ---------------------------------------------------------------------------------------------------------
# Where the token comes from


@pytest.fixture(name="cli_toml")
def cli_toml_fixture(server: Server, config_home: Path) -> Iterator[Path]:
    d = config_home / "vv-ota"
    d.mkdir()
    (d / "token").write_text(ADMIN_TOKEN + "\n")
    (d / "token").chmod(0o600)
    toml = d / "cli.toml"
    toml.write_text(f'server = "{server.url}"\ntoken_file = "token"\n')
    yield toml


def test_the_config_file_gives_server_and_token_and_guards_them(server: Server, fleet: Fleet, cli_toml: Path) -> None:
    # no environment at all: the file is enough
    r = fleet("devices", "--json", token=False, env={"OTA_SERVER_URL": ""})
    assert isinstance(json.loads(ok(r)), list)
    # the environment's token wins over the file's (a wrong one is refused, naming where it came from)
    one_line_error(fleet("devices", env={"OTA_ADMIN_TOKEN": "x" * 40}), 2, "refused the API token ($OTA_ADMIN_TOKEN)")

    # a token file others can read is refused, as ssh refuses such a key
    token = cli_toml.parent / "token"
    token.chmod(0o644)
    one_line_error(fleet("devices", token=False), 2, "accessible by other users (mode 0644): chmod 600")
    token.chmod(0o600)

    # attack: --server pointed elsewhere does not get the file's token
    for args in (("--server", "http://127.0.0.1:9/steal", "devices"), ("devices", "--server", "http://evil:1")):
        one_line_error(fleet(*args, token=False), 2, "is for " + server.url)

    # a token in cli.toml itself: the file must then be private
    cli_toml.write_text(f'server = "{server.url}"\ntoken = "{ADMIN_TOKEN}"\n')
    cli_toml.chmod(0o644)
    one_line_error(fleet("devices", token=False), 2, "the configuration file holding a token")
    cli_toml.chmod(0o600)
    ok(fleet("devices", token=False, env={"OTA_SERVER_URL": ""}))

    for text, words in [('server = "ftp://x"\n', "server must be http(s)"), ("tokn = 'x'\n", "unknown setting"),
                        ('token_file = "token"\n', "a token needs its server"), ("server = [\n", "not valid TOML"),
                        (f'server = "{server.url}"\ntoken = "a b"\n', "printable")]:
        cli_toml.write_text(text)
        one_line_error(fleet("devices", token=False), 2, words)


def test_no_server_anywhere_and_the_group_option(server: Server, fleet: Fleet, config_home: Path) -> None:
    one_line_error(fleet("devices", env={"OTA_SERVER_URL": ""}), 2, "--server URL or $OTA_SERVER_URL")
    # fleet --server works for every command, and a command's own --server overrides it
    assert isinstance(json.loads(ok(fleet("--server", server.url, "devices", "--json", env={"OTA_SERVER_URL": ""}))),
                      list)
    r = fleet("--server", "http://127.0.0.1:9", "devices", "--server", server.url, "--json")
    assert isinstance(json.loads(ok(r)), list)
    r = fleet("--server", "http://127.0.0.1:9", "devices")
    assert r.exit_code == 4 and "cannot reach the update server" in r.stderr
