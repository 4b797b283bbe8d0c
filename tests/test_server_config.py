"""Update server: configuration variables (device and group, secrets encrypted at rest) and the Ansible
inventory import. The tests on the ``server`` fixture run on SQLite and on PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

from .server_helpers import Device, Server

CONFIG = "/api/management/v1/deviceconfig/configurations"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"


def test_device_and_group_variables_with_secrets(server: Server) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    other = Device(server)
    other.accept()
    with server.admin() as a:
        assert a.put(f"/api/management/v1/inventory/devices/{dev_id}/group", json={"group": "site-a"}).status_code == 204
        r = a.put(f"{CONFIG}/group/site-a", json={"DVR_IP": "10.0.0.1", "NTP": "pool.ntp.org", "SITE_KEY": "grp-secret-77",
                                                  "_secrets": ["SITE_KEY"]})
        assert r.status_code == 204, r.text
        r = a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-17", "DVR_IP": "10.0.0.5", "PORT": 554,
                                                     "DEBUG": False, "DVR_PASSWORD": "hunter2-plaintext",
                                                     "_secrets": ["DVR_PASSWORD"]})
        assert r.status_code == 204, r.text
        doc = a.get(f"{CONFIG}/device/{dev_id}").json()
        assert doc["configured"] == {"DEBUG": "false", "DEVICE_ID": "cam-17", "DVR_IP": "10.0.0.5", "DVR_PASSWORD": "********",
                                     "PORT": "554"}
        assert doc["secrets"] == ["DVR_PASSWORD"] and doc["group"] == "site-a"
        assert doc["effective"]["DVR_IP"] == "10.0.0.5" and doc["effective"]["NTP"] == "pool.ntp.org"
        assert doc["effective"]["SITE_KEY"] == "********"
        g = a.get(f"{CONFIG}/group/site-a").json()
        assert g["configured"]["SITE_KEY"] == "********" and g["secrets"] == ["SITE_KEY"]
    # the device gets its group's values overridden by its own, secrets in clear
    r = dev.http.get(DEVICE_CONFIG, headers=dev.headers)
    assert r.status_code == 200
    assert r.json() == {"DEVICE_ID": "cam-17", "DVR_IP": "10.0.0.5", "NTP": "pool.ntp.org", "PORT": "554", "DEBUG": "false",
                        "DVR_PASSWORD": "hunter2-plaintext", "SITE_KEY": "grp-secret-77"}
    assert other.http.get(DEVICE_CONFIG, headers=other.headers).json() == {}
    assert dev.http.get(DEVICE_CONFIG).status_code == 401
    # secrets are encrypted at rest: the plaintext is nowhere in the database file
    raw = server.stored_bytes()
    assert b"hunter2-plaintext" not in raw and b"grp-secret-77" not in raw
    rows = dict(server.query("SELECT name, value FROM config_values WHERE owner = :o", o=dev_id))
    assert rows["DEVICE_ID"] == "cam-17" and rows["DVR_PASSWORD"].startswith("gAAAA")  # a Fernet token
    # writing the mask back keeps the secret (GET, edit, PUT round trip)
    with server.admin() as a:
        doc = a.get(f"{CONFIG}/device/{dev_id}").json()
        assert a.put(f"{CONFIG}/device/{dev_id}", json={**doc["configured"], "DVR_IP": "10.0.0.6",
                                                        "_secrets": doc["secrets"]}).status_code == 204
    got = dev.http.get(DEVICE_CONFIG, headers=dev.headers).json()
    assert got["DVR_PASSWORD"] == "hunter2-plaintext" and got["DVR_IP"] == "10.0.0.6"
    with server.admin() as a:  # PUT replaces: a variable left out is gone
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-17"}).status_code == 204
    got = dev.http.get(DEVICE_CONFIG, headers=dev.headers).json()
    assert "DVR_PASSWORD" not in got and got["DVR_IP"] == "10.0.0.1"


def test_config_validation(server: Server) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    with server.admin() as a:
        for body, msg in (([1], "object"), ({"1BAD": "x"}, "invalid variable name"), ({"A": None}, "string"),
                          ({"A": {"x": 1}}, "string"), ({"A": "x", "_secrets": ["B"]}, "not set"),
                          ({"A": "x", "_secrets": "A"}, "list")):
            r = a.put(f"{CONFIG}/device/{dev_id}", json=body)
            assert r.status_code == 400 and msg in r.json()["error"], (body, r.text)
        assert a.put(f"{CONFIG}/device/{dev_id}", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
        assert a.put(f"{CONFIG}/device/nope", json={"A": "1"}).status_code == 404
        assert a.get(f"{CONFIG}/device/nope").status_code == 404
        assert a.put(f"{CONFIG}/group/bad%20name", json={"A": "1"}).status_code == 400
        assert a.put(f"{CONFIG}/group/ok", json={"A": "x" * 70_000}).status_code == 400
        # the operators' SSH keys give root a shell on the device: a bad value is refused where it is set
        good = _ssh_key("ops@laptop")
        for value, msg in ((f'command="/bin/sh" {good}', "not a key type"),
                           ("ssh-ed25519 " + _ssh_key().split()[1][:-8] + "AAAAAAA=", "key line 1"),
                           (f"{good}\nssh-rsa {good.split()[1]}", "key line 2: the key blob is a 'ssh-ed25519' key")):
            for url in (f"{CONFIG}/device/{dev_id}", f"{CONFIG}/group/ops"):
                r = a.put(url, json={"SSH_AUTHORIZED_KEYS": value})
                assert r.status_code == 400 and "SSH_AUTHORIZED_KEYS: " in r.json()["error"], r.text
                assert msg in r.json()["error"], r.text
        r = a.put(f"{CONFIG}/group/ops", json={"SSH_AUTHORIZED_KEYS": f"{good};{_ssh_key('second')}"})
        assert r.status_code == 204, r.text
    assert dev.http.get(DEVICE_CONFIG, headers=dev.headers).status_code == 200


def _ssh_key(comment: str = "") -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".rstrip()


INVENTORY = """
all:
  vars:
    NTP: ntp.example.org
    TZ: UTC
  hosts:
    lonely-cam:
      DEVICE_ID: lonely
  children:
    site_north:
      vars:
        DVR_IP: 10.1.0.1
        DVR_PASSWORD: north-secret
        _secrets: [DVR_PASSWORD]
      children:
        north_lobby:
          vars:
            TZ: Europe/Oslo
          hosts:
            cam-n1:
              DEVICE_ID: cam-n1
              DVR_IP: 10.1.0.9
            cam-n2:
    site_south:
      hosts:
        {south_host}:
          DEVICE_ID: south-7
          PORT: 554
        ghost-cam:
          DEVICE_ID: ghost
"""


def test_ansible_import(server: Server) -> None:
    n1 = Device(server, identity={"hostname": "cam-n1", "mac": "02:00:00:00:00:01"})
    n1_id = n1.accept()
    n2 = Device(server, identity={"device_id": "cam-n2"})
    n2_id = n2.accept()
    south = Device(server, identity={"serial": "SN-99"})
    south_id = south.accept()
    lonely = Device(server, identity={"DEVICE_ID": "lonely"})
    lonely_id = lonely.accept()
    text = INVENTORY.replace("{south_host}", south_id)
    with server.admin() as a:
        r = a.post("/api/management/v1/inventory/import/ansible", content=text.encode(),
                   headers={"Content-Type": "application/yaml"})
        assert r.status_code == 200, r.text
        result = r.json()
        matched = {m["host"]: m for m in result["matched"]}
        assert matched["cam-n1"]["device_id"] == n1_id and matched["cam-n1"]["group"] == "north_lobby"
        assert matched["cam-n2"]["device_id"] == n2_id
        assert matched[south_id]["device_id"] == south_id and matched[south_id]["group"] == "site_south"
        assert matched["lonely-cam"]["device_id"] == lonely_id and matched["lonely-cam"]["group"] is None
        assert [u["host"] for u in result["unmatched"]] == ["ghost-cam"]
        assert set(result["groups"]) == {"site_north", "north_lobby", "site_south"}
        assert "north_lobby" in a.get("/api/management/v1/inventory/groups").json()
        g = a.get(f"{CONFIG}/group/north_lobby").json()
        assert g["configured"]["DVR_PASSWORD"] == "********" and g["configured"]["TZ"] == "Europe/Oslo"

    # Ansible precedence: host > child group > parent group > all
    assert n1.http.get(DEVICE_CONFIG, headers=n1.headers).json() == {
        "NTP": "ntp.example.org", "TZ": "Europe/Oslo", "DVR_IP": "10.1.0.9", "DVR_PASSWORD": "north-secret",
        "DEVICE_ID": "cam-n1"}
    assert n2.http.get(DEVICE_CONFIG, headers=n2.headers).json()["DVR_IP"] == "10.1.0.1"
    assert south.http.get(DEVICE_CONFIG, headers=south.headers).json() == {
        "NTP": "ntp.example.org", "TZ": "UTC", "DEVICE_ID": "south-7", "PORT": "554"}
    assert lonely.http.get(DEVICE_CONFIG, headers=lonely.headers).json() == {
        "NTP": "ntp.example.org", "TZ": "UTC", "DEVICE_ID": "lonely"}
    assert b"north-secret" not in server.stored_bytes()


def test_ansible_import_rejects_bad_input(server: Server) -> None:
    url = "/api/management/v1/inventory/import/ansible"
    with server.admin() as a:
        for text, msg in (("all: [1, 2", "YAML"), ("- a\n- b\n", "mapping"), ("all:\n  children:\n    'bad group':\n      hosts: {}\n", "group name"),
                          ("all:\n  hosts:\n    h1:\n      X: !vault |\n        abc\n", "YAML"),
                          ("all:\n  hosts:\n    h1:\n      X: {a: 1}\n", "string"),
                          (f"all:\n  vars:\n    SSH_AUTHORIZED_KEYS: 'no-pty {_ssh_key()}'\n",
                           "SSH_AUTHORIZED_KEYS: key line 1: starts with 'no-pty'")):
            r = a.post(url, content=text.encode())
            assert r.status_code == 400 and msg in r.json()["error"], (text, r.text)
        assert server.client().post(url, content=b"all: {}").status_code == 401
