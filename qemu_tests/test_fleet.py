"""A fleet in QEMU: enrolled from an Ansible inventory (issue 15), then operated from the CLI (issue 16).

Enrolment, nothing done by hand on the server:

One small inventory (group ``site_north`` with ``DVR_IP`` in ``group_vars/``; ``cam-north-01`` with its own
``DVR_IP`` in ``host_vars/``; ``cam-lost-03``, a card that goes missing) and v1's image:

- ``build.py keys fleet-ca`` makes the enrolment CA; the server runs with ``--fleet-ca``;
- ``build.py provision`` writes ``cam-north-01``'s card and registers it (preauthorized key, group, variables);
  ``cam-north-02`` and ``cam-lost-03`` are written ``--no-register``: they enrol with their certificate only, their
  group and server-side variables waiting as staged hosts from ``build.py fleet import-ansible``;
- ``cam-lost-03``'s certificate is revoked (``build.py fleet revoke-cert``) before it is ever used;
- both good cards boot in QEMU at once and end ``accepted`` with their own hostname and ``DVR_IP`` in the app's
  environment, one of them reached with the fleet's operator SSH key (``/data/ota/authorized_keys``);
- the revoked card's key and certificate (read from the card image) stay out;
- ``ansible-inventory`` (ansible-core's, through contrib/ansible/vv_ota_inventory.py) lists both with their group.

Operations, on the same two devices (``build.py fleet …``; the transcript goes to out/test-transcripts/):

- a dynamic deployment of v2 to group ``canary`` (cam-north-01 only); cam-north-02 is moved into the group while
  cam-north-01 installs, and gets v2 too;
- ``fleet rollback``: both go back to v1, the release still in their inactive slot, and the server's access log
  shows no artifact download after the rollback started;
- a configuration change that breaks the app (an empty ``DVR_IP`` for cam-north-02) is applied within a poll,
  fails the app's health, is reverted and reported; the app keeps its old value.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devkit.net import free_port
from devkit.qemu import Vm
from devkit.server import OtaServer
from tests.test_provision import debugfs

from .conftest import GROW, NAME, Fleet, timing

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

REPO = Path(__file__).resolve().parents[1]
TRANSCRIPT = REPO / "out" / "test-transcripts" / "fleet-rollout.txt"
GOOD = ("cam-north-01", "cam-north-02")
LOST = "cam-lost-03"
DVR = {"cam-north-01": "10.0.2.61", "cam-north-02": "10.0.2.60"}  # host_vars / group_vars


def build_py(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    assert proc.returncode == 0, f"build.py {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_inventory(root: Path) -> Path:
    inv = root / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    (inv / "hosts.yml").write_text(
        "all:\n  children:\n    site_north:\n      hosts:\n"
        "        cam-north-01: {ansible_host: 192.168.50.11, ansible_user: pi}\n"
        "        cam-north-02:\n        cam-lost-03:\n")
    (inv / "group_vars" / "site_north.yml").write_text(f"DVR_IP: {DVR['cam-north-02']}\nTZ: Europe/Lisbon\n")
    (inv / "host_vars" / "cam-north-01.yml").write_text(f"DVR_IP: {DVR['cam-north-01']}\n")
    return inv


@dataclass
class Enrolled:
    server: OtaServer
    env: dict[str, str]  # what the operator's commands get: server URL, token, CA
    vms: dict[str, Vm]
    cards: Path
    provision_seconds: float


@pytest.fixture(scope="module")
def enrolled(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enrolled]:
    work = tmp_path_factory.mktemp("onboarding")
    inv = write_inventory(work)
    ops_key = work / "ops"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops@fleet", "-f", str(ops_key)], check=True)
    build_py("keys", "fleet-ca", "--out", work / "fleet-ca")
    with ExitStack() as cleanup:
        server = OtaServer(work / "server", fleet.public, "--fleet-ca", str(work / "fleet-ca" / "fleet-ca.pem"),
                           "--access-log", port=fleet.port, tls=fleet.tls, ca_file=fleet.ca)
        server.start()
        cleanup.callback(server.stop)
        env = {"OTA_SERVER_URL": server.url, "OTA_ADMIN_TOKEN": server.admin_token, "OTA_CA_FILE": str(fleet.ca)}
        device_url = f"https://10.0.2.2:{fleet.port}"  # QEMU's view of this machine
        cards = work / "cards"
        common: list[str | Path] = ["provision", "--release", fleet.releases["1.0.0"] / "qemu-virt", "--inventory", inv,
                  "--fleet-ca", work / "fleet-ca", "--server", device_url, "--server-ca", fleet.ca,
                  "--ssh-key", ops_key.with_suffix(".pub"), "--out", cards]
        started = time.monotonic()
        build_py(*common, "--limit", "cam-north-01", "--register-url", server.url, env=env)
        build_py(*common, "--limit", f"cam-north-02,{LOST}", "--no-register", env=env)
        provision_seconds = (time.monotonic() - started) / 3
        timing("provision one card (personalised image + bmap; per card, 3 cards)", provision_seconds)
        # the inventory's groups and variables, and its hosts not enrolled yet staged on the server
        build_py("fleet", "import-ansible", inv, env=env)
        (work / "lost.pem").write_text(debugfs(cards / f"{LOST}.img", "cat /ota/device-cert.pem"))
        build_py("fleet", "revoke-cert", "--cert", work / "lost.pem", "--reason", "card lost in transit", env=env)

        vms = {}
        for name in GOOD:
            vm = Vm.device(cards / f"{name}.img", work / "vm", name=name, smp=1, grow_bytes=GROW,
                           ssh_key=ops_key if name == "cam-north-01" else fleet.ssh_key, ssh_port=free_port(),
                           server_log=server.log_path)
            cleanup.callback(vm.kill)
            vms[name] = vm
        booted = time.monotonic()
        for vm in vms.values():
            vm.start()
        for name, vm in vms.items():
            def accepted(name: str = name) -> bool:
                return any(d["status"] == "accepted" and d["identity_data"] == {"device_id": name}
                           for d in server.devices())

            accepted.__doc__ = f"{name} accepted by the server"
            vm.wait_for(accepted, 900, poll=3)
            timing(f"power on to accepted, {name} (two devices booting at once)", time.monotonic() - booted)
        yield Enrolled(server, env, vms, cards, provision_seconds)


def device_of(server: OtaServer, name: str) -> dict[str, Any]:
    (dev,) = [d for d in server.devices() if d["identity_data"] == {"device_id": name}]
    return dev


def test_both_cards_end_accepted_with_their_hostname_and_dvr_ip(enrolled: Enrolled) -> None:
    server = enrolled.server
    for name, vm in enrolled.vms.items():
        dev = device_of(server, name)
        assert dev["status"] == "accepted"

        def reported(dev_id: str = dev["id"], name: str = name) -> bool:
            attrs = server.attributes(dev_id)
            return attrs.get("hostname") == name and attrs.get("artifact_name") == f"{NAME}-1.0.0"

        reported.__doc__ = f"{name}'s inventory (hostname, artifact)"
        vm.wait_for(reported, 600, poll=3)
        vm.wait_for_ssh(300)
        assert vm.ssh("hostname").stdout.strip() == name
        pid = vm.ssh("systemctl show -p MainPID --value vv-video-ai").stdout.strip()
        environ = dict(line.split("=", 1) for line in vm.ssh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
                       .splitlines() if "=" in line)
        assert environ["DVR_IP"] == DVR[name] and environ["DEVICE_ID"] == name
        # the application is healthy with it (its /health answers 200 only with DVR_IP and DEVICE_ID set)
        assert vm.ssh("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8081/health')"
                      ".status)\"").stdout.strip() == "200"


def test_nothing_was_done_by_hand_on_the_server(enrolled: Enrolled) -> None:
    """One card was accepted through its preauthorization, the other through its fleet certificate; both got their
    group and variables from the inventory; no administrator accepted anything."""
    server = enrolled.server
    audit = server.get("/api/management/v1/audit?limit=500").json()
    for name in GOOD:
        dev = device_of(server, name)
        config = server.get(f"/api/management/v1/deviceconfig/configurations/device/{dev['id']}").json()
        assert config["group"] == "site_north" and config["effective"]["DVR_IP"] == DVR[name], config
    summaries = [e["summary"] for e in audit]
    assert not [e for e in audit if e["method"] == "PUT" and "/auth/" in e["path"]]  # no accept by hand
    assert any("accepted by fleet certificate" in s and "(cam-north-02)" in s for s in summaries), summaries
    assert any("provisioned device" in s and "cam-north-01" in s for s in summaries), summaries


def test_the_fleet_operator_key_logs_in(enrolled: Enrolled) -> None:
    vm = enrolled.vms["cam-north-01"]  # its Vm reaches it with the provisioned operator key only
    assert "ops@fleet" in vm.ssh("cat /data/ota/authorized_keys").stdout
    fingerprints = enrolled.server.attributes(device_of(enrolled.server, "cam-north-01")["id"]).get(
        "ssh_authorized_keys")
    assert fingerprints and "SHA256:" in json.dumps(fingerprints)
    assert vm.ssh("sshd -T -C user=root,host=x,addr=1.2.3.4 | grep -E '^(passwordauthentication|"
                  "kbdinteractiveauthentication) '").stdout.split() == [
        "passwordauthentication", "no", "kbdinteractiveauthentication", "no"]


def test_a_card_whose_certificate_was_revoked_stays_out(enrolled: Enrolled) -> None:
    """The card's own key, identity and certificate (read from its image), as its agent would send them."""
    card = enrolled.cards / f"{LOST}.img"
    key = serialization.load_pem_private_key(debugfs(card, "cat /ota/device-key.pem").encode(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    pubkey = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    identity = {"device_id": debugfs(card, "cat /ota/device_id").strip()}
    body = json.dumps({"id_data": json.dumps(identity), "pubkey": pubkey,
                       "device_cert": debugfs(card, "cat /ota/device-cert.pem")}).encode()
    for _ in range(2):  # asking again changes nothing
        r = enrolled.server.request("POST", "/api/devices/v1/authentication/auth_requests", body, "application/json",
                                    headers={"X-MEN-Signature": base64.b64encode(key.sign(body)).decode()})
        assert r.status == 401 and "revoked" in r.body.decode(), r
    assert device_of(enrolled.server, LOST)["status"] == "pending"


def test_ansible_inventory_lists_both_devices_with_their_group(enrolled: Enrolled) -> None:
    script = REPO / "contrib" / "ansible" / "vv_ota_inventory.py"
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(script), "--list"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **enrolled.env})
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert set(GOOD) <= set(listed["site_north"]["hosts"]), listed
    for name in GOOD:
        assert listed["_meta"]["hostvars"][name]["ota_status"] == "accepted"
    assert LOST not in json.dumps(listed)


# ---------------------------------------------------------------------------------------------------------
# Operations


def fleet_cli(enrolled: Enrolled, *args: str) -> str:
    """``build.py fleet ARGS`` as an operator runs it; the command and its output go to the transcript."""
    out = build_py("fleet", *args, env=enrolled.env).stdout
    TRANSCRIPT.parent.mkdir(parents=True, exist_ok=True)
    with TRANSCRIPT.open("a") as f:
        f.write(f"$ build.py fleet {' '.join(args)}\n{out}\n")
    return out


def wait_running(enrolled: Enrolled, name: str, version: str, slot: str, timeout: float) -> None:
    dev_id = device_of(enrolled.server, name)["id"]

    def check() -> bool:
        attrs = enrolled.server.attributes(dev_id)
        return attrs.get("artifact_name") == f"{NAME}-{version}" and attrs.get("ota_slot") == slot

    check.__doc__ = f"{name} running {version} from slot {slot}"
    enrolled.vms[name].wait_for(check, timeout, poll=3)


def deployment_devices(enrolled: Enrolled, dep_id: str) -> dict[str, str]:
    return {d["id"]: d["status"] for d in
            enrolled.server.get(f"/api/management/v1/deployments/deployments/{dep_id}/devices").json()}


@pytest.fixture(scope="module")
def rollout(enrolled: Enrolled, fleet: Fleet) -> dict[str, str]:
    """v2 rolled out to group canary through the CLI, cam-north-02 joining mid-rollout; the deployment's id."""
    TRANSCRIPT.unlink(missing_ok=True)
    for version in ("1.0.0", "2.0.0"):  # what the devices run is on the server too (a rollback's fallback download)
        assert enrolled.server.upload_artifact(fleet.artifact(version)).status == 201
    one, two = (device_of(enrolled.server, n)["id"] for n in GOOD)
    fleet_cli(enrolled, "group", "set", one, "--group", "canary")
    dep = json.loads(fleet_cli(enrolled, "deploy", f"{NAME}-2.0.0", "--group", "canary", "--dynamic", "--json"))["id"]
    started = time.monotonic()

    def installing() -> bool:
        return deployment_devices(enrolled, dep).get(one) in ("downloading", "installing", "rebooting", "success")

    installing.__doc__ = "cam-north-01 installing v2"
    enrolled.vms["cam-north-01"].wait_for(installing, 600, poll=2)
    joined_during = deployment_devices(enrolled, dep)[one]
    fleet_cli(enrolled, "group", "set", two, "--group", "canary")  # mid-rollout: it joins the dynamic deployment
    for name in GOOD:
        wait_running(enrolled, name, "2.0.0", "B", 1500)
        timing(f"dynamic rollout of v2 (full artifact), {name} done", time.monotonic() - started)
    fleet_cli(enrolled, "close", dep)
    fleet_cli(enrolled, "status", dep)
    return {"id": dep, "one": one, "two": two, "joined_during": joined_during}


def test_a_dynamic_group_rollout_takes_a_device_moved_in_mid_rollout(enrolled: Enrolled, rollout: dict[str, str]
                                                                     ) -> None:
    assert rollout["joined_during"] != "success"  # cam-north-02 joined while cam-north-01 was still installing
    assert deployment_devices(enrolled, rollout["id"]) == {rollout["one"]: "success", rollout["two"]: "success"}
    status = json.loads(build_py("fleet", "status", rollout["id"], "--json", env=enrolled.env).stdout)
    assert "success" in json.dumps(status)


def test_fleet_rollback_uses_the_inactive_slot_without_a_download(enrolled: Enrolled, rollout: dict[str, str]
                                                                  ) -> None:
    log = enrolled.server.log_path
    mark = log.stat().st_size
    started = time.monotonic()
    back = json.loads(fleet_cli(enrolled, "rollback", rollout["id"], "--json"))
    for name in GOOD:
        wait_running(enrolled, name, "1.0.0", "A", 1200)
        timing(f"fleet rollback to v1 from the inactive slot, {name} done", time.monotonic() - started)
    fleet_cli(enrolled, "status", back["id"])
    after = log.read_text(errors="replace")[mark:]
    gets = [line for line in after.splitlines() if '"GET /api/devices/v1/download/' in line]
    headers = [line for line in gets if re.search(r'"GET /api/devices/v1/download/[^/?" ]+/header[?" ]', line)]
    downloads = [line for line in gets if line not in headers]
    assert not downloads, downloads  # no artifact byte left the server
    assert len(headers) >= len(GOOD), gets  # each device checked its slot against the signed header
    assert deployment_devices(enrolled, back["id"]) == {rollout["one"]: "success", rollout["two"]: "success"}


def test_a_configuration_that_breaks_the_app_is_reverted_and_reported(enrolled: Enrolled,
                                                                      rollout: dict[str, str]) -> None:
    name, dev_id = "cam-north-02", rollout["two"]
    vm = enrolled.vms[name]
    fleet_cli(enrolled, "config", "set", "--device", dev_id, "DVR_IP=")

    def reported() -> dict[str, Any] | None:
        attrs = enrolled.server.attributes(dev_id)
        return attrs if attrs.get("config_status") == "reverted" else None

    reported.__doc__ = f"{name} reporting the configuration reverted"
    attrs = vm.wait_for(reported, 600, poll=3)
    assert attrs.get("config_refused"), attrs
    config = enrolled.server.get(f"/api/management/v1/deviceconfig/configurations/device/{dev_id}").json()
    assert config["in_sync"] is False and config["config_status"] == "reverted", config
    pid = vm.ssh("systemctl show -p MainPID --value vv-video-ai").stdout.strip()
    environ = vm.ssh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
    assert f"DVR_IP={DVR[name]}" in environ  # the app runs with the configuration from before
    fleet_cli(enrolled, "config", "get", "--device", dev_id)
