"""Fleet onboarding against the real server: an Ansible inventory imported before the devices exist (staged, then
applied when each is accepted), INI and the resolved form, vaults decrypted on the operator's side with
ansible-core's own library, bulk accept with its audit entries, and ``build.py fleet`` as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import BUILD_PY, REPO
from .server_helpers import ADMIN_TOKEN, Device, Server

IMPORT = "/api/management/v1/inventory/import/ansible"
STAGED = IMPORT + "/staged"
ACCEPT = "/api/management/v2/devauth/devices/accept"
CONFIG = "/api/management/v1/deviceconfig/configurations"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"
AUDIT = "/api/management/v1/audit"
VAULT_PASSWORD = "correct horse battery staple"


def fleet_cli(server: Server, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OTA_SERVER_URL=server.url, OTA_ADMIN_TOKEN=ADMIN_TOKEN)
    return subprocess.run([sys.executable, str(BUILD_PY), "fleet", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO)


def pending(server: Server, identity: dict[str, Any]) -> Device:
    dev = Device(server, identity=identity)
    assert dev.auth().status_code == 401
    return dev


def audit(server: Server) -> list[str]:
    with server.admin() as a:
        return [e["summary"] for e in a.get(AUDIT, params={"limit": 50}).json()]


def test_ini_inventory_imported_before_the_devices_exist_applies_on_bulk_accept(server: Server) -> None:
    ini = ("[stage_north]\nstage-pi01 DVR_IP=10.7.0.1 ansible_host=192.168.1.50 ansible_user=pi\n"
           "stage-pi02 DEVICE_ID=cam-0002\n[stage_north:vars]\nTZ=Europe/Oslo\nansible_become_pass=hunter2\n")
    with server.admin() as a:
        dry = a.post(IMPORT, params={"dry_run": "true"}, content=ini.encode(), headers={"Content-Type": "text/x-ini"})
        assert dry.status_code == 200, dry.text
        assert dry.json()["dry_run"] is True and a.get(STAGED).json() == []
        r = a.post(IMPORT, content=ini.encode())  # INI found by sniffing: the first line is a section
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["matched"] == [] and [s["host"] for s in answer["staged"]] == ["stage-pi01", "stage-pi02"]
        assert {u["host"] for u in answer["unmatched"]} == {"stage-pi01", "stage-pi02"}  # as before, with the reason
        assert all("staged" in u["reason"] for u in answer["unmatched"])
        assert {d["owner"]: d["names"] for d in answer["dropped"]} == {
            "group stage_north": ["ansible_become_pass"], "host stage-pi01": ["ansible_host", "ansible_user"]}
        staged = {s["host"]: s for s in a.get(STAGED).json()}
        assert staged["stage-pi02"]["device_id_var"] == "cam-0002" and staged["stage-pi01"]["group"] == "stage_north"
    assert b"hunter2" not in server.stored_bytes() and b"192.168.1.50" not in server.stored_bytes()

    # the cards boot: one sends its hostname, the other its DEVICE_ID; a stranger arrives too
    pi01 = pending(server, {"hostname": "stage-pi01", "mac": "02:00:00:00:07:01"})
    pi02 = pending(server, {"DEVICE_ID": "cam-0002", "mac": "02:00:00:00:07:02"})
    stranger = pending(server, {"hostname": "stranger-x"})
    with server.admin() as a:
        r = a.post(ACCEPT, json={"filter": {"status": "pending", "identity": {"mac": "02:00:00:00:07:01"}}})
        assert r.status_code == 200, r.text
        assert [x["result"] for x in r.json()["results"]] == ["accepted"]
        r = a.post(ACCEPT, json={"ids": [pi01.id(), pi02.id(), "no-such-device"]})
        results = {x["id"]: x for x in r.json()["results"]}
        assert results[pi01.id()]["result"] == "already accepted"  # idempotent
        assert results[pi02.id()]["result"] == "accepted" and "stage-pi02" in results[pi02.id()]["staged"]
        assert results["no-such-device"]["result"] == "not found" and r.json()["accepted"] == 1
        assert a.get(STAGED).json() == []
        assert a.get(f"/api/management/v2/devauth/devices/{stranger.id()}").json()["status"] == "pending"
    assert pi01.auth().status_code == 200 and pi02.auth().status_code == 200
    assert pi01.http.get(DEVICE_CONFIG, headers=pi01.headers).json() == {"TZ": "Europe/Oslo", "DVR_IP": "10.7.0.1"}
    assert pi02.http.get(DEVICE_CONFIG, headers=pi02.headers).json() == {"TZ": "Europe/Oslo", "DEVICE_ID": "cam-0002"}
    entries = audit(server)
    assert any(f"device {pi02.id()} set to accepted (bulk accept); staged host stage-pi02 applied" in e for e in entries)
    assert any("imported an Ansible inventory: 0 host(s) matched, 2 staged" in e for e in entries)


def test_preauthorized_device_gets_its_staged_configuration(server: Server) -> None:
    with server.admin() as a:
        r = a.post(IMPORT, content=b"all:\n  hosts:\n    preauth-cam:\n      DVR_IP: 10.8.0.1\n",
                   headers={"Content-Type": "application/yaml"})
        assert [s["host"] for s in r.json()["staged"]] == ["preauth-cam"]
        dev = Device(server, identity={"hostname": "preauth-cam"})
        r = a.post("/api/management/v2/devauth/devices", json={"identity_data": dev.identity, "pubkey": dev.pubkey})
        assert r.status_code == 201, r.text
        assert a.get(STAGED).json() == []
    assert dev.auth().status_code == 200
    assert dev.http.get(DEVICE_CONFIG, headers=dev.headers).json() == {"DVR_IP": "10.8.0.1"}


def test_bulk_accept_leaves_a_second_key_and_refuses_bad_requests(server: Server) -> None:
    dev = Device(server, identity={"hostname": "rotating-key"})
    dev_id = dev.accept()
    clone = Device(server, identity=dev.identity)  # same identity, another key: a clone or a rotation
    assert clone.auth().status_code == 401
    with server.admin() as a:
        r = a.post(ACCEPT, json={"ids": [dev_id]})
        assert r.json()["results"] == [{"id": dev_id, "result": "already accepted; another key is pending: review "
                                                                    "it by hand"}]
        for body in ({}, {"ids": [dev_id], "filter": {}}, {"ids": []}, {"filter": {"status": "rejected"}},
                     {"filter": {"group": "../x"}}, {"ids": [dev_id], "extra": 1}):
            assert a.post(ACCEPT, json=body).status_code in (400, 422), body
    assert clone.auth().status_code == 401


def test_variable_name_with_a_trailing_newline_is_refused(server: Server) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    with server.admin() as a:
        r = a.put(f"{CONFIG}/device/{dev_id}", json={"DVR_IP\n": "10.0.0.1"})
        assert r.status_code == 400 and "invalid variable name" in r.json()["error"]
        r = a.post(IMPORT, json={"hosts": {"h": {"vars": {"X\nY": "1"}}}})
        assert r.status_code == 400 and "invalid variable name" in r.json()["error"]


def vault_encrypt(text: str) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    vault = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))])
    return bytes(vault.encrypt(text)).decode()


def test_cli_imports_a_vaulted_inventory_directory_and_bulk_accepts(server: Server, tmp_path: Path) -> None:
    inv = tmp_path / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    (inv / "hosts.yml").write_text("vault_site:\n  hosts:\n    vault-pi01:\n    vault-pi02:\n")
    (inv / "group_vars" / "vault_site.yml").write_text(vault_encrypt("SITE_TOKEN: site-secret-42\nTZ: UTC\n"))
    token = "\n".join("      " + line for line in vault_encrypt("dvr-pass-99").splitlines())
    (inv / "host_vars" / "vault-pi01.yml").write_text(f"DVR_IP: 10.9.0.1\nDVR_PASSWORD: !vault |\n{token}\n")
    password = tmp_path / "vault-pass"
    password.write_text(VAULT_PASSWORD + "\n")

    refused = fleet_cli(server, "import-ansible", inv)
    assert refused.returncode == 2 and "vault-encrypted" in refused.stderr and "--vault-password-file" in refused.stderr
    wrong = tmp_path / "wrong-pass"
    wrong.write_text("nope\n")
    assert fleet_cli(server, "import-ansible", inv, "--vault-password-file", wrong).returncode == 2

    done = fleet_cli(server, "import-ansible", inv, "--vault-password-file", password)
    assert done.returncode == 0, done.stderr
    assert "staged   vault-pi01 (group vault_site; 2 variable(s))" in done.stdout
    assert "imported: 0 matched, 2 staged, 1 group(s)" in done.stdout
    for plaintext in (b"site-secret-42", b"dvr-pass-99"):
        assert plaintext not in server.stored_bytes()
    with server.admin() as a:
        assert a.get(f"{CONFIG}/group/vault_site").json()["secrets"] == ["SITE_TOKEN", "TZ"]

    pi01 = pending(server, {"hostname": "vault-pi01"})
    pending(server, {"hostname": "vault-pi02"})
    acc = fleet_cli(server, "accept", "--identity", "hostname=vault-pi01")
    assert acc.returncode == 0, acc.stderr
    assert f"{pi01.id()}: accepted (staged host vault-pi01 applied" in acc.stdout
    assert "accepted 1 of 1 device(s)" in acc.stdout
    assert pi01.auth().status_code == 200
    assert pi01.http.get(DEVICE_CONFIG, headers=pi01.headers).json() == {
        "SITE_TOKEN": "site-secret-42", "TZ": "UTC", "DVR_IP": "10.9.0.1", "DVR_PASSWORD": "dvr-pass-99"}
    rest = fleet_cli(server, "accept", "--all-pending", "--json")
    assert rest.returncode == 0, rest.stderr
    results = json.loads(rest.stdout)["results"]
    assert any(r["result"] == "accepted" and "staged host vault-pi02 applied (group vault_site" in r.get("staged", "")
               for r in results)


def test_cli_refuses_unclear_choices_and_a_missing_server(server: Server, tmp_path: Path) -> None:
    r = fleet_cli(server, "accept", "--all-pending", "--id", "x")
    assert r.returncode == 2 and "one way" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "OTA_SERVER_URL"}
    (tmp_path / "hosts").write_text("[g]\nh\n")
    r = subprocess.run([sys.executable, str(BUILD_PY), "fleet", "import-ansible", str(tmp_path / "hosts")],
                       capture_output=True, text=True, env=dict(env, PYTHONPATH=str(REPO), OTA_ADMIN_TOKEN="x" * 40),
                       cwd=REPO)
    assert r.returncode == 2 and "--server URL or $OTA_SERVER_URL" in r.stderr
