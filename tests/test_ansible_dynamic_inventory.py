"""contrib/ansible/vv_ota_inventory.py read by the real ``ansible-inventory`` (PyPI's ansible-core) against the
real server: accepted devices under their groups with their inventory attributes; pending ones left out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO
from .server_helpers import ADMIN_TOKEN, Device, Server, server_fixture  # noqa: F401 - fixture

SCRIPT = REPO / "contrib" / "ansible" / "vv_ota_inventory.py"


def ansible_inventory() -> str:
    """PyPI's ansible-core in this virtualenv (pyproject extra ``ansible``, installed by scripts/install.sh): a pip
    program, not a Debian one."""
    tool = Path(sys.executable).parent / "ansible-inventory"
    assert tool.exists(), f"{tool} is missing: run scripts/install.sh (pyproject extra: ansible)"
    return str(tool)


def test_ansible_inventory_lists_the_accepted_devices_with_groups_and_attributes(server: Server, tmp_path: Path
                                                                                  ) -> None:
    tool = ansible_inventory()
    north = Device(server, identity={"hostname": "inv-north-1", "mac": "02:00:00:00:09:01"})
    north_id = north.accept()
    loose = Device(server, identity={"mac": "02:00:00:00:09:02"})  # no name: listed by its device id
    loose_id = loose.accept()
    lurker = Device(server, identity={"hostname": "inv-lurker"})
    assert lurker.auth().status_code == 401  # pending: not listed
    with server.admin() as a:
        assert a.put(f"/api/management/v1/inventory/devices/{north_id}/group", json={"group": "north"}).status_code == 204
    r = north.http.patch("/api/devices/v1/inventory/device/attributes", headers=north.headers, json=[
        {"name": "artifact_name", "value": "release-1.2.0"}, {"name": "ota_slot", "value": "B"},
        {"name": "device_type", "value": "rpi4"}, {"name": "ipv4", "value": "10.1.2.3/24"}])
    assert r.status_code == 200, r.text

    env = dict(os.environ, OTA_SERVER_URL=server.url, OTA_ADMIN_TOKEN=ADMIN_TOKEN, ANSIBLE_HOME=str(tmp_path),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"), ANSIBLE_INVENTORY_UNPARSED_FAILED="true",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run([tool, "-i", str(SCRIPT), "--list"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["north"]["hosts"] == ["inv-north-1"]
    assert loose_id in doc["ungrouped"]["hosts"]
    assert "inv-lurker" not in proc.stdout
    hv = doc["_meta"]["hostvars"]["inv-north-1"]
    assert hv == {"ota_device_id": north_id, "ota_status": "accepted", "ota_group": "north",
                  "artifact_name": "release-1.2.0", "ota_slot": "B", "device_type": "rpi4", "ota_ipv4": "10.1.2.3/24"}
    assert not any(k.startswith("ansible_") for h in doc["_meta"]["hostvars"].values() for k in h)

    host = subprocess.run([tool, "-i", str(SCRIPT), "--host", "inv-north-1"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout)["ota_slot"] == "B"

    bad = subprocess.run([tool, "-i", str(SCRIPT), "--list"], capture_output=True, text=True, timeout=120,
                         env=dict(env, OTA_ADMIN_TOKEN="not-a-token-" + "x" * 30))
    assert bad.returncode != 0 and "HTTP 401" in bad.stderr
