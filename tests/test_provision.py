"""``build.py provision``: the device list (Ansible inventory, CSV, --limit, ids), the refusals of --to (a fake
sysfs and mountinfo: every refusal without root), and — slow — real cards from a small release disk made with
image/disk.py's own functions, checked with debugfs (no mount) and registered on the real server."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from image.card import CardSettings, card_content, provisioned_env, ssh_key_lines
from image.fleet_devices import DeviceSpec, from_csv, from_inventory, select
from image.provision import check_outputs
from image.target_disk import SystemView, TargetRefused, check_target
from ota_common.errors import UserError

from .conftest import BUILD_PY, REPO

# ---------------------------------------------------------------------------------------------------------
# The device list


def inventory(root: Path, *, vault: str | None = None) -> Path:
    """Two sites; cam-01 has its own DVR_IP (host_vars), cam-02 its group's (group_vars) and a DEVICE_ID."""
    inv = root / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    (inv / "hosts.ini").write_text("[north]\ncam-01 ansible_host=192.168.1.50\ncam-02\n[south]\ncam-03\n"
                                   "[sites:children]\nnorth\nsouth\n")
    (inv / "group_vars" / "north.yml").write_text("DVR_IP: 10.1.0.254\nTZ: Europe/Oslo\nNTP_SERVER: ntp.north\n")
    (inv / "group_vars" / "south.yml").write_text("DVR_IP: 10.3.0.254\n")
    host = "DVR_IP: 10.1.0.1\nDEBUG: true\n"
    if vault is not None:
        host += "DVR_PASSWORD: !vault |\n" + "\n".join("  " + line for line in vault.splitlines()) + "\n"
    (inv / "host_vars" / "cam-01.yml").write_text(host)
    (inv / "host_vars" / "cam-02.yml").write_text("DEVICE_ID: cam-0002\n")
    return inv


def test_devices_from_an_inventory_with_group_and_host_variables(tmp_path: Path) -> None:
    fleet = from_inventory(inventory(tmp_path))
    devices = {d.host: d for d in select(fleet, None)}
    one, two, three = devices["cam-01"], devices["cam-02"], devices["cam-03"]
    assert (one.device_id, one.group) == ("cam-01", "north")
    assert one.values == {"DEVICE_ID": "cam-01", "DVR_IP": "10.1.0.1", "TZ": "Europe/Oslo", "NTP_SERVER": "ntp.north",
                          "DEBUG": "true"}  # the connection variable ansible_host never comes along
    assert two.device_id == "cam-0002" and two.values["DVR_IP"] == "10.1.0.254"  # from group_vars
    assert three.values == {"DEVICE_ID": "cam-03", "DVR_IP": "10.3.0.254"} and three.group == "south"
    # the server keeps a device's own variables apart from its group's, so a later change of the group reaches it
    assert one.server_values == {"DEVICE_ID": "cam-01", "DVR_IP": "10.1.0.1", "DEBUG": "true"}
    assert two.server_values == {"DEVICE_ID": "cam-0002"}
    assert fleet.groups["north"][0] == {"DVR_IP": "10.1.0.254", "TZ": "Europe/Oslo", "NTP_SERVER": "ntp.north"}


@pytest.mark.parametrize(("limit", "hosts"), [
    (None, ["cam-01", "cam-02", "cam-03"]),
    ("north", ["cam-01", "cam-02"]),
    ("sites", ["cam-01", "cam-02", "cam-03"]),
    ("sites,!north", ["cam-03"]),
    ("cam-0[13]", ["cam-01", "cam-03"]),
    ("cam-*:&north:!cam-02", ["cam-01"]),
    ("~cam-0[23]$", ["cam-02", "cam-03"]),
    ("a*", []),  # "all" is no wildcard's match
    ("all", ["cam-01", "cam-02", "cam-03"]),
])
def test_limit_selects_like_ansible(tmp_path: Path, limit: str | None, hosts: list[str]) -> None:
    fleet = from_inventory(inventory(tmp_path))
    if not hosts:
        with pytest.raises(UserError, match="selects no host"):
            select(fleet, limit)
        return
    assert [d.host for d in select(fleet, limit)] == hosts


def test_duplicate_and_bad_device_ids_are_refused_naming_the_host(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    (inv / "host_vars" / "cam-03.yml").write_text("DEVICE_ID: cam-0002\n")
    with pytest.raises(UserError, match=r"hosts cam-02 and cam-03 have the same DEVICE_ID \(cam-0002\)"):
        select(from_inventory(inv), None)
    assert [d.host for d in select(from_inventory(inv), "!cam-03")] == ["cam-01", "cam-02"]
    (inv / "host_vars" / "cam-03.yml").write_text("DEVICE_ID: CAM_0002\n")  # another id, the same hostname
    with pytest.raises(UserError, match="the same hostname cam-0002"):
        select(from_inventory(inv), None)
    (inv / "host_vars" / "cam-03.yml").write_text("DEVICE_ID: '-cam'\n")
    with pytest.raises(UserError, match=r"host cam-03: '-cam' \(its DEVICE_ID variable\) is not a valid DEVICE_ID"):
        from_inventory(inv)


def test_devices_from_csv_with_secret_columns(tmp_path: Path) -> None:
    f = tmp_path / "devices.csv"
    f.write_text("device_id,group,DVR_IP,secret:DVR_PASSWORD\ncsv-01,west,10.5.0.1,pw1\ncsv-02,,10.5.0.2,\n\n")
    devices = select(from_csv(f), None)
    assert [(d.device_id, d.group) for d in devices] == [("csv-01", "west"), ("csv-02", None)]
    assert devices[0].values == {"DEVICE_ID": "csv-01", "DVR_IP": "10.5.0.1", "DVR_PASSWORD": "pw1"}
    assert devices[0].secrets == {"DVR_PASSWORD"} and devices[1].secrets == frozenset()
    assert select(from_csv(f), "west") == devices[:1]
    for text, message in (("id,group\nx,g\n", "must start with device_id,group"),
                          ("device_id,group,A,secret:A\nx,,1,2\n", "the variable A has two columns"),
                          ("device_id,group,1A\nx,,1\n", "invalid variable name '1A'"),
                          ("device_id,group\nx,bad/group\n", r"devices.csv:2: invalid group name"),
                          ("device_id,group\nx,g,extra\n", "devices.csv:2: 3 cells, the header has 2"),
                          ("device_id,group\nx y,g\n", r"devices.csv:2 \(device x y\): 'x y'"),
                          ("device_id,group\na,g\na,h\n", "hosts a and a have the same DEVICE_ID"),
                          ("", "empty")):
        f.write_text(text)
        with pytest.raises(UserError, match=message):
            select(from_csv(f), None)


def spec(**values: str) -> DeviceSpec:
    return DeviceSpec("cam-01", "cam-01", "north", {"DEVICE_ID": "cam-01", **values}, frozenset({"DVR_PASSWORD"}))


def test_provisioned_env_holds_declared_names_only_and_refuses_what_an_env_file_cannot_hold() -> None:
    text, on_card, server_only = provisioned_env(spec(DVR_IP="10.0.0.1", DVR_PASSWORD='p "w$', EXTRA="x"),
                                                 frozenset({"DVR_IP", "DVR_PASSWORD", "TZ"}))
    assert text == b'DEVICE_ID=cam-01\nDVR_IP=10.0.0.1\nDVR_PASSWORD="p \\"w\\$"\n'
    assert on_card == ["DEVICE_ID", "DVR_IP", "DVR_PASSWORD"] and server_only == ["EXTRA"]
    with pytest.raises(UserError, match="host cam-01: DVR_IP cannot go into provisioned.env"):
        provisioned_env(spec(DVR_IP="10.0.0.1\nLD_PRELOAD=/tmp/x.so"), frozenset({"DVR_IP"}))


def test_ssh_keys_are_checked() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert ssh_key_lines(f"# ops\n\n{key} ops@laptop\n", "k") == [f"{key} ops@laptop"]
    for bad in ("ssh-ed25519 AAAA", 'command="sh" ' + key, "hello"):
        with pytest.raises(UserError, match="k: not SSH public keys: key line 1"):
            ssh_key_lines(bad, "k")
    content = card_content(spec(SSH_AUTHORIZED_KEYS=key), CardSettings(frozenset(), ssh_keys=(key,)))
    assert content.public["ota/authorized_keys"] == f"{key}\n".encode()  # once


def test_existing_outputs_are_kept_without_force(tmp_path: Path) -> None:
    check_outputs(tmp_path, [spec()], force=False)
    (tmp_path / "cam-01.img.bmap").write_text("old")
    with pytest.raises(UserError, match=r"cam-01.img.bmap exists: give --force"):
        check_outputs(tmp_path, [spec()], force=False)
    check_outputs(tmp_path, [spec()], force=True)


# ---------------------------------------------------------------------------------------------------------
# --to: every refusal, on a fake /sys and mountinfo


def fake_system(root: Path, *, mounts: str = "", holders: bool = False, sectors: int = 62_333_952,
                ro: str = "0") -> SystemView:
    """/dev/sdb (8:16) with partitions sdb1 (8:17), sdb2 (8:18); /dev/sda (8:0) holds the root filesystem."""
    sys_root = root / "sys"
    for disk, major_minor, parts in (("sda", "8:0", ("sda1",)), ("sdb", "8:16", ("sdb1", "sdb2"))):
        d = sys_root / "devices" / "pci0000:00" / "usb1" / "block" / disk
        d.mkdir(parents=True)
        (d / "dev").write_text(major_minor + "\n")
        (d / "size").write_text(f"{sectors}\n")
        (d / "ro").write_text(ro + "\n")
        for i, p in enumerate(parts, 1):
            (d / p).mkdir()
            (d / p / "partition").write_text(f"{i}\n")
            (d / p / "dev").write_text(f"8:{int(major_minor.split(':')[1]) + i}\n")
            (d / p / "holders").mkdir()
        (sys_root / "dev" / "block").mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(d, sys_root / "dev" / "block"), sys_root / "dev" / "block" / major_minor)
        for i, p in enumerate(parts, 1):
            os.symlink(os.path.relpath(d / p, sys_root / "dev" / "block"),
                       sys_root / "dev" / "block" / f"8:{int(major_minor.split(':')[1]) + i}")
    if holders:
        dm = sys_root / "devices" / "virtual" / "block" / "dm-0"
        dm.mkdir(parents=True)
        (dm / "dev").write_text("254:0\n")
        (sys_root / "class" / "block").mkdir(parents=True)
        os.symlink(dm, sys_root / "class" / "block" / "dm-0")
        os.symlink(dm, sys_root / "devices" / "pci0000:00" / "usb1" / "block" / "sdb" / "sdb2" / "holders" / "dm-0")
    info = root / "mountinfo"
    info.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
                    "25 22 0:5 / /proc rw - proc proc rw\n" + mounts)
    swaps = root / "swaps"
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n")
    return SystemView(sys_root, info, swaps, fake_stat)


def fake_stat(path: Path) -> Any:
    """/dev/sdXN as block devices with Linux's numbers (no mknod needed); anything else as it is."""
    m = re.fullmatch(r"/dev/sd([a-z])(\d*)", str(path))
    if m is None:
        return os.stat(path)
    minor = (ord(m.group(1)) - ord("a")) * 16 + int(m.group(2) or 0)
    return SimpleNamespace(st_mode=stat.S_IFBLK | 0o660, st_rdev=os.makedev(8, minor))


IMAGE = 2 << 30


def test_to_accepts_an_unused_disk_that_is_large_enough(tmp_path: Path) -> None:
    facts = check_target(Path("/dev/sdb"), IMAGE, fake_system(tmp_path))
    assert facts.name == "sdb" and set(facts.devnums) == {"8:16", "8:17", "8:18"}


@pytest.mark.parametrize(("device", "setup", "message"), [
    ("/dev/sda", {}, r"/dev/sda holds /: it is this machine's system disk"),
    ("/dev/sdb", {"mounts": "40 22 8:18 / /media/card rw - vfat /dev/sdb2 rw\n"},
     r"/dev/sdb: sdb2 is mounted on /media/card: unmount"),
    ("/dev/sdb", {"mounts": "40 22 8:17 / /boot rw - vfat /dev/sdb1 rw\n"}, r"/dev/sdb holds /boot: it is this "
                                                                             "machine's system disk"),
    ("/dev/sdb", {"mounts": "40 22 0:44 / /srv\\040x rw - btrfs /dev/sdb1 rw\n"}, r"sdb1 is mounted on /srv x"),
    ("/dev/sdb", {"mounts": "40 22 254:0 / /mnt rw - ext4 /dev/mapper/crypt rw\n", "holders": True},
     r"dm-0 \(on sdb2\) is mounted on /mnt"),
    ("/dev/sdb", {"holders": True}, r"/dev/sdb is in use by dm-0 \(on sdb2\)"),
    ("/dev/sdb1", {}, r"/dev/sdb1 is a partition of sdb: give the whole disk \(/dev/sdb\)"),
    ("/dev/sdb", {"sectors": 1000}, r"smaller than the card image"),
    ("/dev/sdb", {"ro": "1"}, r"read-only"),
])
def test_to_refuses(tmp_path: Path, device: str, setup: dict[str, Any], message: str) -> None:
    with pytest.raises(TargetRefused, match=message):
        check_target(Path(device), IMAGE, fake_system(tmp_path, **setup))


def test_to_refuses_a_regular_file_a_missing_device_and_an_unreadable_mountinfo(tmp_path: Path) -> None:
    view = fake_system(tmp_path)
    f = tmp_path / "card.img"
    f.write_bytes(b"")
    with pytest.raises(TargetRefused, match="is not a block device"):
        check_target(f, IMAGE, view)
    with pytest.raises(TargetRefused, match="no such device"):
        check_target(tmp_path / "sdz", IMAGE, view)
    with pytest.raises(TargetRefused, match="cannot read .*nothing is written"):
        check_target(Path("/dev/sdb"), IMAGE, dataclasses.replace(view, mountinfo=tmp_path / "gone"))


# ---------------------------------------------------------------------------------------------------------
# Real cards (slow): a small release disk made with image/disk.py's own functions

DECLARED = ["DEBUG", "DVR_IP", "DVR_PASSWORD", "TZ"]
VAULT_PASSWORD = "provision vault password"


def fake_release(root: Path) -> Path:
    """``root/1.0.0/qemu-virt``: disk.img (+ .bmap) as build.py release lays it out, and ``1.0.0/manifest.json``."""
    from image.disk import assemble, bmap, make_ext4, make_vfat, plan_layout
    from image.manifest import BaseEntry, BoardEntry, DiskEntry, ReleaseManifest, TrustEntry

    board = root / "1.0.0" / "qemu-virt"
    work = root / "work"
    (work / "rootfs" / "etc").mkdir(parents=True)
    (work / "rootfs" / "etc" / "hostname").write_text("vv-edge\n")
    (work / "rootfs" / "big").write_bytes(os.urandom(3 << 20))
    (work / "data" / "ota").mkdir(parents=True)
    (work / "data" / "ota" / "device_type").write_text("device_type=qemu-virt\n")
    (work / "data" / "ota" / "slots.json").write_text('{"2": {"artifact_name": "vv-1.0.0"}}\n')
    (work / "data" / "log" / "journal").mkdir(parents=True)
    (work / "boot.scr").write_bytes(b"echo boot")
    layout = plan_layout(slot_mib=64, boot_mib=64, data_mib=16, seed="prov")
    make_vfat(work / "boot.vfat", {"boot.scr": work / "boot.scr"}, size_mib=64, label="boot", seed="prov")
    make_ext4(work / "a.ext4", work / "rootfs", size_mib=64, label="rootfs", seed="prov-a")
    make_ext4(work / "data.ext4", work / "data", size_mib=16, label="data", seed="prov:data")
    board.mkdir(parents=True)
    assemble(board / "disk.img", layout, {"boot": work / "boot.vfat", "rootfs-a": work / "a.ext4",
                                          "data": work / "data.ext4"})
    bmap(board / "disk.img")
    manifest = ReleaseManifest(
        name="vv", version="1.0.0", artifact_name="vv-1.0.0", boards={"qemu-virt": BoardEntry("qemu-virt")},
        source_date_epoch=1_700_000_000, built_at=1_700_000_000, build_seconds=1.0, signed=True, security_version=0,
        trust=TrustEntry(None, [], [], 0, "", True, DECLARED), previous=None, kernel="", disk=DiskEntry("0", 64),
        layers={}, base=BaseEntry("k", "bookworm", ""), outputs={}, packages=[], tools={}, timings={})
    (root / "1.0.0" / "manifest.json").write_text(manifest.to_json())
    return board


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_release(tmp_path_factory.mktemp("release"))


def provision_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD_PY), "provision", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), cwd=REPO)


def data_offset(card: Path) -> int:
    from image.disk import partitions_of

    return int(str(partitions_of(card)[3]["start"])) * 512


def debugfs(card: Path, command: str) -> str:
    proc = subprocess.run(["debugfs", "-R", command, f"{card}?offset={data_offset(card)}"], capture_output=True)
    return proc.stdout.decode()


def inode(card: Path, path: str) -> tuple[str, int, int]:
    """(mode, uid, gid) of ``path`` on the card's data partition."""
    text = debugfs(card, f'stat "{path}"')
    mode = re.search(r"Mode:\s+(\d+)", text)
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    assert mode and owner, (path, text)
    return mode.group(1), int(owner.group(1)), int(owner.group(2))


def vault_encrypt(text: str) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    return bytes(VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt(text)).decode()


def tls_files(root: Path) -> tuple[Path, Path, str]:
    """A fleet CA directory, a server CA file, and an operator's SSH key line."""
    from ota_common.fleetca import make_fleet_ca
    from ota_common.tls import make_ca

    make_fleet_ca(root / "fleet-ca")
    ca_cert, _ = make_ca(root / "server-ca")
    ssh = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " ops@laptop"
    return root / "fleet-ca", ca_cert, ssh


@pytest.mark.slow
def test_cards_from_an_inventory_and_a_csv(release: Path, tmp_path: Path) -> None:
    try:
        vault: str | None = vault_encrypt("dvr-secret-1")
    except ImportError:
        vault = None
    inv = inventory(tmp_path, vault=vault)
    fleet_ca, server_ca, ssh = tls_files(tmp_path)
    (tmp_path / "ops.pub").write_text(ssh + "\n")
    (tmp_path / "vault-pass").write_text(VAULT_PASSWORD + "\n")
    out = tmp_path / "cards"
    common = ["--release", release, "--fleet-ca", fleet_ca, "--server", "https://ota.example.test",
              "--server-ca", server_ca, "--ssh-key", tmp_path / "ops.pub", "--no-register", "--out", out]
    done = provision_cli(*common, "--inventory", inv, "--vault-password-file", tmp_path / "vault-pass",
                         "--limit", "north")
    assert done.returncode == 0, done.stderr
    assert re.search(r"cam-01\s+cam-01\s+north\s+DEVICE_ID, DEBUG, DVR_IP, (DVR_PASSWORD, )?TZ \(server only: "
                     r"NTP_SERVER\)\s+[0-9a-f]+\s+\S+cam-01.img\s+\d+\.\d", done.stdout), done.stdout
    assert "wrote 2 card(s); registered nothing" in done.stdout
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text("device_id,group,DVR_IP,secret:DVR_PASSWORD\ncsv-01,west,10.5.0.1,csv-secret\n")
    assert provision_cli(*common, "--csv", csv_file).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["cam-0002.img", "cam-0002.img.bmap", "cam-01.img",
                                                     "cam-01.img.bmap", "csv-01.img", "csv-01.img.bmap"]

    card = out / "cam-01.img"
    assert debugfs(card, "cat /ota/device_id") == "cam-01\n"
    env = debugfs(card, "cat /ota/provisioned.env")
    assert env == ("DEVICE_ID=cam-01\nDEBUG=true\nDVR_IP=10.1.0.1\n" + ("DVR_PASSWORD=dvr-secret-1\n" if vault else "")
                   + "TZ=Europe/Oslo\n")
    assert debugfs(out / "cam-0002.img", "cat /ota/provisioned.env") == \
        "DEVICE_ID=cam-0002\nDVR_IP=10.1.0.254\nTZ=Europe/Oslo\n"  # DVR_IP from group_vars
    assert debugfs(out / "csv-01.img", "cat /ota/provisioned.env") == \
        "DEVICE_ID=csv-01\nDVR_IP=10.5.0.1\nDVR_PASSWORD=csv-secret\n"
    assert debugfs(card, "cat /ota/ota.conf") == \
        "[server]\nurl = https://ota.example.test\nca_file = /data/ota/server-ca.pem\n"
    assert x509.load_pem_x509_certificate(debugfs(card, "cat /ota/server-ca.pem").encode()) == \
        x509.load_pem_x509_certificate(server_ca.read_bytes())
    assert debugfs(card, "cat /ota/authorized_keys") == ssh + "\n"
    # what the release put there is kept
    assert debugfs(card, "cat /ota/device_type") == "device_type=qemu-virt\n"
    assert debugfs(card, "cat /ota/slots.json").startswith('{"2"')
    assert "journal" in debugfs(card, "ls /log")
    # owners and modes
    assert inode(card, "/ota") == ("0700", 0, 0)
    for path, mode in (("device-key.pem", "0600"), ("provisioned.env", "0600"), ("device_id", "0644"),
                       ("device-cert.pem", "0644"), ("ota.conf", "0644"), ("server-ca.pem", "0644"),
                       ("authorized_keys", "0644"), ("device_type", "0644")):
        assert inode(card, f"/ota/{path}") == (mode, 0, 0), path
    # the key matches the certificate, which names the device
    key_pem = debugfs(card, "cat /ota/device-key.pem").encode()
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ed25519.Ed25519PrivateKey) and key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    cert = x509.load_pem_x509_certificate(debugfs(card, "cat /ota/device-cert.pem").encode())
    assert cert.public_key() == key.public_key()
    assert cert.subject.rfc4514_string() == "CN=cam-01"
    assert f"{cert.serial_number:x}" in done.stdout
    # the private key is on its card and nowhere else in --out
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    holders = [p.name for p in out.iterdir() if key_pem in p.read_bytes() or raw in p.read_bytes()]
    assert holders == ["cam-01.img"]
    assert stat.S_IMODE(card.stat().st_mode) == 0o600
    # the other partitions and the partition table are the release's, byte for byte; holes stay holes
    original = (release / "disk.img").read_bytes()
    copy = card.read_bytes()
    offset = data_offset(card)
    end = offset + 16 * (1 << 20)
    assert len(copy) == len(original) and copy[:offset] == original[:offset] and copy[end:] == original[end:]
    assert card.stat().st_blocks * 512 < card.stat().st_size / 2
    (tmp_path / "data.ext4").write_bytes(copy[offset:end])
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "data.ext4")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    # the bmap reproduces the card
    subprocess.run(["bmaptool", "copy", "--bmap", str(out / "cam-01.img.bmap"), str(card),
                    str(tmp_path / "written.img")], check=True, capture_output=True)
    assert (tmp_path / "written.img").read_bytes() == copy

    # refusals: existing outputs, --to a regular file, --to with several devices
    again = provision_cli(*common, "--csv", csv_file)
    assert again.returncode == 2 and "csv-01.img exists" in again.stderr and "--force" in again.stderr
    assert debugfs(out / "csv-01.img", "cat /ota/device_id") == "csv-01\n"
    to_file = provision_cli(*common, "--csv", csv_file, "--to", tmp_path / "written.img")
    assert to_file.returncode == 2 and "is not a block device" in to_file.stderr
    several = provision_cli(*common, "--inventory", inv, "--vault-password-file", tmp_path / "vault-pass", "--to",
                            "/dev/null")
    assert several.returncode == 2 and "select exactly one device" in several.stderr
    forced = provision_cli(*common, "--csv", csv_file, "--force")
    assert forced.returncode == 0, forced.stderr
    assert debugfs(out / "csv-01.img", "cat /ota/device-key.pem") != debugfs(card, "cat /ota/device-key.pem")


@pytest.mark.slow
def test_registered_cards_boot_accepted_with_their_configuration(release: Path, server: Any, tmp_path: Path) -> None:
    """The whole story against the real server: provision registers the devices; a device holding its card's key and
    identity is accepted at its first auth request and gets its configuration; a new card retires the old one."""
    from .server_helpers import ADMIN_TOKEN, Device

    out = tmp_path / "cards"
    csv_file = tmp_path / "devices.csv"
    suffix = os.urandom(3).hex()  # one module server per database: ids of their own
    ids = [f"reg-{suffix}-1", f"reg-{suffix}-2"]
    csv_file.write_text("device_id,group,DVR_IP,SITE,secret:DVR_PASSWORD\n"
                        f"{ids[0]},reg_west,10.6.0.1,west,pw-{suffix}\n{ids[1]},,10.6.0.2,,\n")
    env = {"OTA_ADMIN_TOKEN": ADMIN_TOKEN}
    args = ["--release", release, "--csv", csv_file, "--server", server.url, "--out", out]
    refused = provision_cli(*args, env={"OTA_ADMIN_TOKEN": "x" * 40})
    assert refused.returncode == 2 and "refused the API token" in refused.stderr
    assert not out.exists() or not list(out.glob("*.img"))  # the token is checked before a card is written
    done = provision_cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert f"registered 2 devices on {server.url}" in done.stdout

    def card_device(device_id: str) -> Device:
        dev = Device(server, "ed25519", identity={"device_id": debugfs(out / f"{device_id}.img",
                                                                       "cat /ota/device_id").strip()})
        dev.key = serialization.load_pem_private_key(
            debugfs(out / f"{device_id}.img", "cat /ota/device-key.pem").encode(), None)
        dev.pubkey = dev.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return dev

    first = card_device(ids[0])
    assert first.auth().status_code == 200  # accepted at once: no administrator step
    assert first.http.get("/api/devices/v1/deviceconfig/configuration", headers=first.headers).json() == {
        "DEVICE_ID": ids[0], "DVR_IP": "10.6.0.1", "SITE": "west", "DVR_PASSWORD": f"pw-{suffix}"}
    second = card_device(ids[1])
    assert second.auth().status_code == 200
    with server.admin() as a:
        doc = a.get(f"/api/management/v1/deviceconfig/configurations/device/{first.id()}").json()
    assert doc["group"] == "reg_west" and doc["secrets"] == ["DVR_PASSWORD"]

    # a new card for the first device: its old card is out at once
    again = provision_cli(*args, "--limit", ids[0], "--force", env=env)
    assert again.returncode == 0, again.stderr
    assert "registered 1 devices" in again.stdout
    assert first.http.get("/api/devices/v1/deviceconfig/configuration", headers=first.headers).status_code == 401
    assert first.auth().status_code == 401
    assert card_device(ids[0]).auth().status_code == 200


@pytest.mark.slow
def test_registration_from_an_inventory_keeps_group_variables_on_the_group(release: Path, server: Any,
                                                                           tmp_path: Path) -> None:
    """The group's variables go to the group on the server (a later change of the group reaches its devices), the
    device keeps only its own; the card holds them all. The devices' URL differs from the operator's."""
    from .server_helpers import ADMIN_TOKEN

    inv = inventory(tmp_path)
    out = tmp_path / "cards"
    device_url = "https://ota.example.test:8443"  # what the card gets; this machine registers at server.url
    done = provision_cli("--release", release, "--inventory", inv, "--limit", "north", "--server", device_url,
                         "--register-url", server.url, "--out", out, env={"OTA_ADMIN_TOKEN": ADMIN_TOKEN})
    assert done.returncode == 0, done.stderr
    assert f"registered 2 devices on {server.url}; variables of group(s) north set" in done.stdout
    assert f"url = {device_url}" in debugfs(out / "cam-01.img", "cat /ota/ota.conf")
    assert "DVR_IP=10.1.0.254" in debugfs(out / "cam-0002.img", "cat /ota/provisioned.env").splitlines()
    config = "/api/management/v1/deviceconfig/configurations"
    with server.admin() as a:
        group = a.get(f"{config}/group/north").json()
        devs = {d["identity_data"].get("device_id"): d for d in a.get("/api/management/v2/devauth/devices",
                                                                      params={"per_page": "500"}).json()}
        own = a.get(f"{config}/device/{devs['cam-0002']['id']}").json()
    assert group["configured"] == {"DVR_IP": "10.1.0.254", "TZ": "Europe/Oslo", "NTP_SERVER": "ntp.north"}
    assert own["configured"] == {"DEVICE_ID": "cam-0002"} and own["group"] == "north"
    assert own["effective"]["DVR_IP"] == "10.1.0.254"


@pytest.mark.slow
def test_card_settings_refuse_plain_http_unless_the_release_allows_it(release: Path, tmp_path: Path) -> None:
    from image.card import Release
    from image.provision import card_settings
    from image.trust import InsecureServerError

    loaded = Release.load(release)
    strict = dataclasses.replace(loaded, manifest=dataclasses.replace(
        loaded.manifest, trust=dataclasses.replace(loaded.manifest.trust, insecure_http=False)))
    with pytest.raises(InsecureServerError, match="plain http"):
        card_settings(strict, server_url="http://ota.example.test", server_ca=None)
    with pytest.raises(UserError, match="--server-ca\\) goes with a server URL"):
        card_settings(loaded, server_url=None, server_ca=tmp_path / "ca.pem")
    settings, notes = card_settings(loaded, server_url="http://ota.example.test", server_ca=None)
    assert settings.server_url == "http://ota.example.test" and "plain http allowed" in notes[0]
    with pytest.raises(UserError, match="no disk.img here"):
        Release.load(tmp_path)
