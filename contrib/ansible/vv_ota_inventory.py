#!/usr/bin/env python3
"""Ansible dynamic inventory of the update server's devices: ``ansible-inventory -i vv_ota_inventory.py --list``.

Reads ``OTA_SERVER_URL``, ``OTA_ADMIN_TOKEN`` (a token with scope ``read`` is enough) and, for a private CA,
``OTA_CA_FILE``. Lists the **accepted** devices only (a pending device's identity is whatever it claims), each
under its server group (or ``ungrouped``), named by its identity's ``DEVICE_ID``, ``device_id`` or ``hostname``
(the device id when none is a usable host name or when two devices claim the same name), with host variables
``ota_device_id``, ``ota_status``, ``ota_group``, ``artifact_name``, ``ota_slot``, ``device_type`` and, when the
device reports one address, ``ota_ipv4``. No ``ansible_*`` variable is set: connection settings stay in your
own inventory or configuration.

Standard library and requests only; copy it anywhere (``chmod +x``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import requests

INVENTORY_PATH = "/api/management/v1/inventory/devices"
PER_PAGE = 500
NAME_KEYS = ("DEVICE_ID", "device_id", "hostname")
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a name Ansible takes as a group without a warning
HOSTVARS = {"artifact_name": "artifact_name", "ota_slot": "ota_slot", "device_type": "device_type"}


def fetch_devices(url: str, token: str, verify: str | bool) -> list[dict[str, Any]]:
    """Every device's inventory document (the management API, page by page)."""
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        r = requests.get(url.rstrip("/") + INVENTORY_PATH, params={"page": page, "per_page": PER_PAGE},
                         headers={"Authorization": f"Bearer {token}"}, timeout=60, verify=verify)
        if r.status_code != 200:
            raise SystemExit(f"vv_ota_inventory: {url} answered HTTP {r.status_code}: {r.text[:300]}")
        batch = r.json()
        out += batch
        if len(batch) < PER_PAGE:
            return out
        page += 1


def _attrs(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    by_scope: dict[str, dict[str, Any]] = {"identity": {}, "inventory": {}, "system": {}}
    for a in doc.get("attributes", []):
        by_scope.setdefault(a.get("scope", ""), {})[a.get("name")] = a.get("value")
    return by_scope["identity"], by_scope["inventory"], by_scope["system"]


def build(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``--list`` answer: groups with their hosts, ``_meta.hostvars``."""
    groups: dict[str, list[str]] = {}
    hostvars: dict[str, dict[str, Any]] = {}
    for doc in devices:
        identity, inventory, system = _attrs(doc)
        if identity.get("status") != "accepted":
            continue
        name = next((str(identity[k]) for k in NAME_KEYS if HOST_RE.fullmatch(str(identity.get(k, "")))), doc["id"])
        if name in hostvars:
            name = doc["id"]
        group = system.get("group")
        group = group if isinstance(group, str) and GROUP_RE.fullmatch(group) and group not in ("all",) else "ungrouped"
        groups.setdefault(group, []).append(name)
        hv: dict[str, Any] = {"ota_device_id": doc["id"], "ota_status": identity.get("status"),
                              "ota_group": system.get("group")}
        hv.update({var: inventory[attr] for attr, var in HOSTVARS.items() if attr in inventory})
        if isinstance(inventory.get("ipv4"), str):
            hv["ota_ipv4"] = inventory["ipv4"]
        hostvars[name] = hv
    answer: dict[str, Any] = {g: {"hosts": sorted(h)} for g, h in sorted(groups.items())}
    answer["all"] = {"children": sorted({*groups, "ungrouped"})}
    answer["_meta"] = {"hostvars": hostvars}
    return answer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ansible inventory of the update server's accepted devices")
    p.add_argument("--list", action="store_true")
    p.add_argument("--host")
    args = p.parse_args(argv)
    url, token = os.environ.get("OTA_SERVER_URL", ""), os.environ.get("OTA_ADMIN_TOKEN", "")
    if not url or not token:
        print("vv_ota_inventory: set OTA_SERVER_URL and OTA_ADMIN_TOKEN", file=sys.stderr)
        return 2
    verify: str | bool = os.environ.get("OTA_CA_FILE") or True
    try:
        inv = build(fetch_devices(url, token, verify))
    except requests.RequestException as e:
        print(f"vv_ota_inventory: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    json.dump(inv["_meta"]["hostvars"].get(args.host, {}) if args.host else inv, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
