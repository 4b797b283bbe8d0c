"""Ansible inventories read without Ansible (ota_common.ansible_inventory / ansible_files / ansible_wire): INI and
YAML, group_vars/host_vars, precedence, connection variables dropped, and the attack stories of an inventory from
somewhere else (hostile names, huge files, YAML bombs, paths out of the directory, vaults without a password)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ota_common.ansible_files import load_inventory
from ota_common.ansible_inventory import (
    MAX_TEXT,
    Inventory,
    InventoryError,
    Resolved,
    expand_hosts,
    parse_ini,
    parse_yaml,
)
from ota_common.ansible_wire import from_json, to_json

INI = """\
# the seed's inventory, as an operator writes it
lonely ansible_host=10.9.9.9 X=1
[north]
pi[01:03] DVR_IP=10.0.0.1 ansible_user=pi
cam-9:2222 NAME="a b" PORT=554 RATIO=0.5 DEBUG=False

[north:vars]
TZ = "Europe/Oslo"
ansible_become_pass=hunter2

[site:children]
north

[site:vars]
NTP=ntp.example.org
TZ=UTC
"""


def resolve_ini(text: str) -> Resolved:
    inv = Inventory()
    parse_ini(text, "hosts.ini", inv)
    return inv.resolve()


def resolve_yaml(text: str) -> Resolved:
    inv = Inventory()
    parse_yaml(text, "hosts.yml", inv)
    return inv.resolve()


def test_ini_groups_children_vars_ranges_and_literals() -> None:
    r = resolve_ini(INI)
    assert sorted(r.hosts) == ["cam-9", "lonely", "pi01", "pi02", "pi03"]
    assert r.groups["site"].values == {"NTP": "ntp.example.org", "TZ": "UTC"}
    # north inherits site's NTP and overrides its TZ (child group > parent group)
    assert r.groups["north"].values == {"NTP": "ntp.example.org", "TZ": "Europe/Oslo"}
    assert r.hosts["pi02"].groups == ("north",) and r.hosts["pi02"].vars.values == {"DVR_IP": "10.0.0.1"}
    assert r.hosts["cam-9"].vars.values == {"NAME": "a b", "PORT": 554, "RATIO": 0.5, "DEBUG": False}
    # a host outside every group keeps nothing from a group: it has none on the server
    assert r.hosts["lonely"].group is None and r.hosts["lonely"].vars.values == {"X": 1}


def test_connection_variables_are_dropped_and_reported_by_name_only() -> None:
    r = resolve_ini(INI)
    assert r.dropped == {"group north": ["ansible_become_pass"], "host cam-9": ["ansible_port"],
                         "host lonely": ["ansible_host"], "host pi01": ["ansible_user"],
                         "host pi02": ["ansible_user"], "host pi03": ["ansible_user"]}
    wire = json.dumps(to_json(r))
    assert "hunter2" not in wire and "ansible_" not in wire and "10.9.9.9" not in wire


def test_yaml_inventory_precedence_all_parent_child_host() -> None:
    r = resolve_yaml("""
all:
  vars: {NTP: ntp.example.org, TZ: UTC, LEVEL: all}
  hosts:
    lonely: {DEVICE_ID: lonely}
  children:
    site_north:
      vars: {LEVEL: parent, DVR_PASSWORD: s3cret, _secrets: [DVR_PASSWORD]}
      children:
        north_lobby:
          vars: {LEVEL: child}
          hosts:
            cam-n1: {LEVEL: host, ansible_ssh_common_args: -o ProxyCommand=evil}
""")
    assert r.groups["site_north"].values["LEVEL"] == "parent"
    assert r.groups["north_lobby"].values == {"NTP": "ntp.example.org", "TZ": "UTC", "LEVEL": "child",
                                              "DVR_PASSWORD": "s3cret"}
    assert r.groups["north_lobby"].secrets == {"DVR_PASSWORD"}  # secret where it is inherited too
    assert r.hosts["cam-n1"].group == "north_lobby" and r.hosts["cam-n1"].vars.values == {"LEVEL": "host"}
    assert r.hosts["lonely"].vars.values == {"NTP": "ntp.example.org", "TZ": "UTC", "LEVEL": "all",
                                             "DEVICE_ID": "lonely"}
    assert r.dropped == {"host cam-n1": ["ansible_ssh_common_args"]}


def test_host_in_two_groups_gets_the_other_groups_variables_on_the_device() -> None:
    r = resolve_yaml("""
cameras: {vars: {KIND: camera, TZ: UTC}, hosts: {pi01: {}}}
zz_lab: {vars: {TZ: Europe/Oslo}, hosts: {pi01: {}}}
""")
    # equal depth: by name, so zz_lab wins and is the one group the server keeps
    assert r.hosts["pi01"].groups == ("cameras", "zz_lab")
    assert r.hosts["pi01"].vars.values == {"KIND": "camera"}
    assert any("pi01 is in groups cameras, zz_lab" in w for w in r.warnings)


def test_group_vars_and_host_vars_directories_override_the_inventory(tmp_path: Path) -> None:
    (tmp_path / "hosts.ini").write_text("[north]\npi01 DVR_IP=1.1.1.1\npi02\n[north:vars]\nTZ=UTC\n")
    (tmp_path / "group_vars" / "north").mkdir(parents=True)
    (tmp_path / "group_vars" / "all.yml").write_text("NTP: ntp.example.org\nansible_python_interpreter: /usr/bin/python3\n")
    (tmp_path / "group_vars" / "north" / "10-site.yml").write_text("TZ: Europe/Oslo\nSITE: north\n")
    (tmp_path / "group_vars" / "north" / "README.md").write_text("ignored: [")
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "host_vars" / "pi02.yaml").write_text("DVR_IP: 2.2.2.2\nDVR_PASSWORD: pw\n_secrets: [DVR_PASSWORD]\n")
    (tmp_path / "host_vars" / "ghost.yml").write_text("X: 1\n")
    inv = load_inventory(tmp_path)
    r = inv.resolve()
    assert r.groups["north"].values == {"NTP": "ntp.example.org", "TZ": "Europe/Oslo", "SITE": "north"}
    assert r.hosts["pi01"].vars.values == {"DVR_IP": "1.1.1.1"}
    assert r.hosts["pi02"].vars.values == {"DVR_IP": "2.2.2.2", "DVR_PASSWORD": "pw"}
    assert r.hosts["pi02"].vars.secrets == {"DVR_PASSWORD"}
    assert r.dropped == {"group all": ["ansible_python_interpreter"]}
    assert any("host_vars/ghost.yml" in w and "ignored" in w for w in r.warnings)
    # the same directory given as its inventory file reads the same vars directories
    assert load_inventory(tmp_path / "hosts.ini").resolve().groups == r.groups


def test_wire_form_round_trip_and_checks() -> None:
    r = resolve_ini(INI)
    back = from_json(json.loads(json.dumps(to_json(r))))
    assert to_json(back) == to_json(r)
    bad = [
        ({"hosts": {"h": {"groups": ["nowhere"]}}}, "groups that the body's groups define"),
        ({"groups": {"../etc": {}}}, "invalid group name"),
        ({"hosts": {"h\n": {}}}, "invalid host name"),
        ({"hosts": {"h": {"vars": {"X\n": "1"}}}}, "invalid variable name"),
        ({"hosts": {"h": {"vars": {"X": [1]}}}}, "string, number or boolean"),
        ({"hosts": {"h": {"vars": {"X": "1"}, "secrets": ["Y"]}}}, "not set"),
        ({"hosts": {}, "extra": 1}, "only groups, hosts"),
    ]
    for doc, message in bad:
        with pytest.raises(InventoryError, match=message):
            from_json(doc)
    dropped = from_json({"hosts": {"h": {"vars": {"ansible_host": "x", "A": 1}, "secrets": ["ansible_host"]}}})
    assert dropped.hosts["h"].vars.values == {"A": 1} and dropped.dropped == {"host h": ["ansible_host"]}


def test_host_ranges() -> None:
    assert expand_hosts("pi[01:03]", "x") == ["pi01", "pi02", "pi03"]
    assert expand_hosts("n[a:c]-[1:2]", "x") == ["na-1", "na-2", "nb-1", "nb-2", "nc-1", "nc-2"]
    assert expand_hosts("x[0:10:5]", "x") == ["x0", "x5", "x10"]
    for bad in ("pi[1]", "pi[3:1]", "pi[01:100]", "pi[0:9999999]", "pi[a:9]", "pi[1:3:0]"):
        with pytest.raises(InventoryError):
            expand_hosts(bad, "hosts.ini:3")


@pytest.mark.parametrize(("text", "message"), [
    ("[north\npi01\n", "hosts.ini:1: bad section header"),
    ("[north:weird]\n", "unknown section kind"),
    ("[north]\npi01 novalue\n", "hosts.ini:2: expected name=value"),
    ("[north]\npi01 'unclosed\n", "cannot read the host line"),
    ("[north:vars]\njust-text\n", "expected name=value"),
    ("[../../etc]\npi01\n", "invalid group name"),
    ("[north]\n-rf X=1\n", "invalid host name"),
    ("[north]\npi01 X;Y=1\n", "invalid variable name"),
    ("[a:children]\nb\n[b:children]\na\n", "lead back"),
    ("[a:children]\nall\n", "cannot be a child"),
])
def test_bad_ini_names_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_ini(text)


@pytest.mark.parametrize(("text", "message"), [
    ("all: [1, 2", "hosts.yml: not valid YAML"),
    ("- a\n- b\n", "mapping of groups"),
    ("all:\n  hosts:\n    h1:\n      X: {a: 1}\n", "hosts.yml:4: X of host h1: the value must be a string"),
    ("all:\n  hosts:\n    h1:\n      X: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n        3031\n",
     "hosts.yml:4: X of host h1 is a vault-encrypted YAML value"),
    ("all:\n  hostz: {}\n", "only vars, hosts and children"),
    ("all:\n  hosts:\n    h1:\n      \"X\\nY\": 1\n", "invalid variable name"),
    ("all:\n  hosts:\n    h1:\n      X: .nan\n", "finite number"),
    ("all:\n  hosts:\n    h1:\n      X: " + "9" * 5000 + "\n", "hosts.yml: not valid YAML"),
    ("all:\n  vars:\n    X: " + "y" * (64 * 1024 + 1) + "\n", "longer than"),
])
def test_bad_yaml_names_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        resolve_yaml(text)


def test_attack_yaml_bomb_is_refused_before_it_is_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "all:\n  vars:\n" + "\n".join("    " + line for line in lines) + "\n"
    with pytest.raises(InventoryError, match="nodes once its aliases are expanded"):
        resolve_yaml(text)


def test_attack_deep_nesting_and_huge_text_are_refused() -> None:
    with pytest.raises(InventoryError, match="nested"):
        resolve_yaml("all:\n  vars:\n    X: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(InventoryError, match="larger than"):
        resolve_ini("[g]\n" + "#" * (MAX_TEXT + 1))
    deep = "g0:\n"
    for i in range(1, 30):
        deep += "  " * (2 * i - 1) + "children:\n" + "  " * (2 * i) + f"g{i}:\n"
    with pytest.raises(InventoryError, match="nest more than"):
        resolve_yaml(deep)


def test_attack_connection_variable_cannot_ride_in_under_another_case() -> None:
    r = resolve_ini("[g]\nh ANSIBLE_SSH_COMMON_ARGS=evil Ansible_Host=1.2.3.4 OK=1\n")
    assert r.hosts["h"].vars.values == {"OK": 1}
    assert r.dropped == {"host h": ["ANSIBLE_SSH_COMMON_ARGS", "Ansible_Host"]}


def test_attack_group_vars_symlink_out_of_the_inventory_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside.yml"
    secret.write_text("STOLEN: operator-private\n")
    inv_dir = tmp_path / "inv"
    (inv_dir / "group_vars").mkdir(parents=True)
    (inv_dir / "hosts").write_text("[north]\npi01\n")
    os.symlink(secret, inv_dir / "group_vars" / "north.yml")
    with pytest.raises(InventoryError, match="leads out of the inventory directory"):
        load_inventory(inv_dir)


def test_attack_group_name_cannot_point_the_reader_at_another_file(tmp_path: Path) -> None:
    """Files are found by listing group_vars/, never by joining a group name to a path: a group named like a
    path is refused by name, and a file for a group that does not exist is not read."""
    (tmp_path / "hosts").write_text("[north]\npi01\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "south.yml").write_text("X: [unreadable\n")
    assert load_inventory(tmp_path).resolve().groups["north"].values == {}
    (tmp_path / "hosts").write_text("[../group_vars/south]\npi01\n")
    with pytest.raises(InventoryError, match="invalid group name"):
        load_inventory(tmp_path)


def test_vault_encrypted_file_without_a_password_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("[north]\npi01\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "north.yml").write_text("$ANSIBLE_VAULT;1.1;AES256\n3031323334\n")
    with pytest.raises(InventoryError, match="group_vars/north.yml is vault-encrypted: give the vault password"):
        load_inventory(tmp_path)
