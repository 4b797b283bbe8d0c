"""A personalised card (``build.py provision``): a copy of a release's ``disk.img`` whose data partition (4) holds
one device's identity, key, certificate, server settings and configuration. No root, no loop mounts.

The card layout on ``/data`` (the device side reads exactly this)::

    ota/device_id         one line: the DEVICE_ID
    ota/device-key.pem    the device's ed25519 private key (PKCS#8 PEM), 0600
    ota/device-cert.pem   its certificate from the fleet CA (with a fleet CA)
    ota/provisioned.env   DEVICE_ID and the configuration variables the release declares, 0600
    ota/ota.conf          [server] url (and ca_file = /data/ota/server-ca.pem with a server CA)
    ota/server-ca.pem     the server's CA certificates
    ota/authorized_keys   operator SSH keys

plus what the release put there (``ota/device_type``, ``ota/slots.json``, ``log/journal/``); everything owned by
root (0:0), ``/data/ota`` 0700.

How: the release's data filesystem is read with ``debugfs rdump`` and rebuilt with the public files by
:func:`image.disk.make_ext4` (same label and size; a filesystem UUID of its own per card, which is fine because
``/data`` is mounted by PARTUUID: layers/boot/templates/fstab.j2); the other partitions and the partition table
are copied from the release region by region (holes stay holes; ``copy_file_range`` shares extents where the
filesystem can). The secrets (the private key and ``provisioned.env``) never touch the host's disk: they are
written by ``debugfs`` straight into the card image from memory files (``memfd``), and the card image is 0600.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device_hooks import envvars
from ota_common.deviceid import hostname_for
from ota_common.errors import ToolError, UserError
from ota_common.fleetca import FleetCA, cert_pem
from ota_common.sshkeys import SSHKeyError, parse_keys
from ota_common.tools import run, tail

from .disk import MIB, SECTOR, make_ext4, partitions_of
from .fleet_devices import ID_VAR, DeviceSpec
from .manifest import MANIFEST, ReleaseManifest

DATA_PARTITION = 4
SSH_KEYS_VAR = "SSH_AUTHORIZED_KEYS"
#: mode of each file the card gets (directories: ota 0700)
MODES = {"ota": 0o700, "ota/device_id": 0o644, "ota/device-key.pem": 0o600, "ota/device-cert.pem": 0o644,
         "ota/provisioned.env": 0o600, "ota/ota.conf": 0o644, "ota/server-ca.pem": 0o644,
         "ota/authorized_keys": 0o644}
SECRET_FILES = ("ota/device-key.pem", "ota/provisioned.env")
SERVER_CA_ON_CARD = "/data/ota/server-ca.pem"


# ---------------------------------------------------------------------------------------------------------
# The release


@dataclass(frozen=True)
class Release:
    """A release's board directory (``out/<version>/<board>``) as provisioning needs it."""

    path: Path
    disk: Path
    manifest: ReleaseManifest
    board: str
    data_offset: int
    data_size: int
    data_label: str

    @property
    def size(self) -> int:
        return self.disk.stat().st_size

    @property
    def declared(self) -> frozenset[str]:
        """The configuration variables the image accepts (its manifest's trust.config_variables)."""
        return frozenset(self.manifest.trust.config_variables)

    @classmethod
    def load(cls, path: Path) -> Release:
        """Raises UserError when ``path`` is not a release's board directory."""
        disk = path / "disk.img"
        if not disk.is_file():
            raise UserError(f"{path}: no disk.img here; give a release's board directory (out/<version>/<board>)")
        found = [p for p in (path / MANIFEST, path.parent / MANIFEST) if p.is_file()]
        if not found:
            raise UserError(f"{path}: no {MANIFEST} here or in {path.parent}: not a release of build.py release")
        manifest = ReleaseManifest.from_json(found[0].read_bytes())
        if path.name not in manifest.boards:
            raise UserError(f"{path}: the release {manifest.version} has no board {path.name!r} (it has "
                            f"{', '.join(sorted(manifest.boards))})")
        parts = partitions_of(disk)
        if len(parts) < DATA_PARTITION:
            raise UserError(f"{disk}: {len(parts)} partitions, not the A/B layout (the data partition is number 4)")
        data = parts[DATA_PARTITION - 1]
        offset, size = int(str(data["start"])) * SECTOR, int(str(data["size"])) * SECTOR
        stats = _fs_stats(disk, offset)
        fs_size = int(stats.get("Block count", "0")) * int(stats.get("Block size", "0"))
        if fs_size <= 0 or fs_size % MIB or fs_size > size:
            raise UserError(f"{disk}: partition 4 does not hold a whole-MiB ext4 filesystem")
        return cls(path, disk, manifest, path.name, offset, fs_size, stats.get("Filesystem volume name", "data"))


def _image(disk: Path, offset: int) -> str:
    """The filesystem at ``offset`` of ``disk`` as e2fsprogs' unix I/O names it."""
    return f"{disk}?offset={offset}"


def _fs_stats(disk: Path, offset: int) -> dict[str, str]:
    proc = run(["debugfs", "-R", "stats", _image(disk, offset)], stage="read the release's data partition")
    out: dict[str, str] = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() not in out:
            out[name.strip()] = value.strip()
    if "Block count" not in out:
        raise UserError(f"{disk}: partition 4 is not an ext4 filesystem")
    return out


def dump_data_tree(release: Release, dest: Path) -> Path:
    """What the release put on the data partition, as a directory tree (modes kept; ``lost+found`` left out:
    mkfs makes its own)."""
    dest.mkdir(parents=True)
    _debugfs(_image(release.disk, release.data_offset), f'rdump / "{dest}"\n', "read the release's data partition",
             write=False)
    shutil.rmtree(dest / "lost+found", ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------------------------
# What goes on one card


@dataclass(frozen=True)
class CardSettings:
    """What every card of a run shares."""

    declared: frozenset[str]
    server_url: str | None = None
    server_ca: bytes | None = None
    ssh_keys: tuple[str, ...] = ()  # authorized_keys lines (checked)
    fleet_ca: FleetCA | None = None


@dataclass
class CardContent:
    """One device's files (relative to the data partition), the secret ones apart."""

    spec: DeviceSpec
    public: dict[str, bytes]
    secret: dict[str, bytes] = field(repr=False)
    pubkey_pem: str
    cert_serial: str | None
    on_card: list[str]  # variables in provisioned.env (DEVICE_ID included)
    server_only: list[str]  # variables the release does not declare: kept on the server only

    @property
    def hostname(self) -> str:
        return hostname_for(self.spec.device_id)


def env_quote(value: str) -> str:
    """As the agent quotes ``device.env`` (device_hooks/inventory.py), so systemd and the agent read the same."""
    if value and all(c.isalnum() or c in "._-/:@+," for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def provisioned_env(spec: DeviceSpec, declared: frozenset[str]) -> tuple[bytes, list[str], list[str]]:
    """``provisioned.env`` and the names on the card and kept on the server only. Raises UserError for a
    declared variable whose value cannot go into an environment file."""
    on_card = [ID_VAR, *sorted(n for n in spec.values if n in declared and n != ID_VAR)]
    server_only = sorted(n for n in spec.values if n not in declared and n != ID_VAR)
    lines = []
    for name in on_card:
        value = spec.values[name]
        if envvars.name_problem(name) or not envvars.VALUE.fullmatch(value):
            raise UserError(f"host {spec.host}: {name} cannot go into provisioned.env: "
                            f"{envvars.name_problem(name) or 'its value is not one line of printable text'}")
        lines.append(f"{name}={env_quote(value)}\n")
    return "".join(lines).encode(), on_card, server_only


def ssh_key_lines(text: str, where: str) -> list[str]:
    """The keys of an ``authorized_keys`` text (lines, or ``;``-separated as in ``SSH_AUTHORIZED_KEYS``), checked
    by :mod:`ota_common.sshkeys` as the server and the device check them (no options; blank and ``#`` lines
    skipped), one normalised line each. Raises UserError naming ``where`` and the line."""
    try:
        return [k.line for k in parse_keys(text)]
    except SSHKeyError as e:
        raise UserError(f"{where}: not SSH public keys: {e}") from None


def card_content(spec: DeviceSpec, settings: CardSettings) -> CardContent:
    """A new key for the device, its certificate, and every file of its card."""
    key = ed25519.Ed25519PrivateKey.generate()
    public_key = key.public_key()
    pubkey_pem = public_key.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    env, on_card, server_only = provisioned_env(spec, settings.declared)
    public = {"ota/device_id": f"{spec.device_id}\n".encode()}
    serial = None
    if settings.fleet_ca is not None:
        cert: x509.Certificate = settings.fleet_ca.issue(public_key, spec.device_id)
        public["ota/device-cert.pem"] = cert_pem(cert)
        serial = f"{cert.serial_number:x}"
    if settings.server_url:
        conf = f"[server]\nurl = {settings.server_url}\n"
        if settings.server_ca is not None:
            conf += f"ca_file = {SERVER_CA_ON_CARD}\n"
            public["ota/server-ca.pem"] = settings.server_ca
        public["ota/ota.conf"] = conf.encode()
    keys = list(settings.ssh_keys)
    if SSH_KEYS_VAR in spec.values:
        keys += ssh_key_lines(spec.values[SSH_KEYS_VAR], f"host {spec.host}: {SSH_KEYS_VAR}")
    if keys:
        public["ota/authorized_keys"] = "".join(f"{k}\n" for k in dict.fromkeys(keys)).encode()
    secret = {"ota/device-key.pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()),
              "ota/provisioned.env": env}
    return CardContent(spec, public, secret, pubkey_pem, serial, on_card, server_only)


# ---------------------------------------------------------------------------------------------------------
# Writing the card


def _debugfs(image: str, script: str, stage: str, *, write: bool = True) -> None:
    """Run a debugfs script; debugfs exits 0 when a command fails, so its stderr is the verdict."""
    proc = run(["debugfs", *(["-w"] if write else []), "-f", "-", image], stage=stage, input=script.encode())
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
              if line.strip() and not line.startswith("debugfs ")]
    if errors:
        raise ToolError(f"{stage}: debugfs: {errors[0]}", argv=proc.args, returncode=proc.returncode,
                        stderr=tail("\n".join(errors)))


@contextmanager
def memory_files(files: Mapping[str, bytes]) -> Iterator[dict[str, str]]:
    """Each content in an anonymous memory file; yields name → a path another process can open
    (``/proc/<pid>/fd/<n>``). Closed (and gone) at the end."""
    fds: dict[str, int] = {}
    try:
        for name, data in files.items():
            fd = os.memfd_create(f"card-{Path(name).name}", os.MFD_CLOEXEC)
            fds[name] = fd
            os.write(fd, data)
        yield {name: f"/proc/{os.getpid()}/fd/{fd}" for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)


def copy_regions(src: Path, dst_fd: int, start: int, end: int, dst_offset: int | None = None) -> None:
    """Copy the data regions of ``src`` in [start, end) to ``dst_fd`` (at the same offsets, or from
    ``dst_offset``); holes are skipped, so they stay holes in the freshly truncated destination."""
    shift = 0 if dst_offset is None else dst_offset - start
    with open(src, "rb") as f:
        fd = f.fileno()
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            pos = data
            while pos < hole:
                n = os.copy_file_range(fd, dst_fd, hole - pos, pos, pos + shift)
                if n <= 0:
                    raise OSError(f"copy_file_range stopped at {pos} of {src}")
                pos += n


def _owner_script(paths: list[str]) -> str:
    lines = []
    for rel in paths:
        if '"' in rel or "\n" in rel:
            raise UserError(f"the release's data partition has a path debugfs cannot name: {rel!r}")
        target = "/" + rel if rel else "/"
        lines += [f'sif "{target}" uid 0', f'sif "{target}" gid 0']
        if rel in MODES:
            kind = 0o040000 if rel == "ota" else 0o100000
            lines.append(f'sif "{target}" mode 0{kind | MODES[rel]:o}')
    return "\n".join(lines) + "\n"


def _tree_paths(tree: Path) -> list[str]:
    out = [""]
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in sorted(dirnames) + sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, name), tree))
    return out


@dataclass(frozen=True)
class WrittenCard:
    path: Path
    seconds: float


def write_card(release: Release, release_tree: Path, content: CardContent, dest: Path, work: Path) -> WrittenCard:
    """The card image ``dest`` (0600: it holds the device's private key). Written as ``dest.part`` and renamed
    at the end; nothing is left behind on failure."""
    started = time.monotonic()
    device_id = content.spec.device_id
    tree = work / f"tree-{device_id}"
    data_img = work / f"data-{device_id}.ext4"
    shutil.copytree(release_tree, tree, symlinks=True)
    try:
        for rel in content.secret:  # written by debugfs below, never in this tree
            (tree / rel).unlink(missing_ok=True)
        (tree / "ota").mkdir(exist_ok=True)
        (tree / "ota").chmod(MODES["ota"])
        for rel, data in content.public.items():
            (tree / rel).write_bytes(data)
            (tree / rel).chmod(MODES[rel])
        make_ext4(data_img, tree, size_mib=release.data_size // MIB, label=release.data_label,
                  seed=f"{release.manifest.name}:data:{device_id}")
        paths = _tree_paths(tree) + list(content.secret)
    except BaseException:
        data_img.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, release.size)
            copy_regions(release.disk, fd, 0, release.data_offset)
            copy_regions(release.disk, fd, release.data_offset + release.data_size, release.size)
            copy_regions(data_img, fd, 0, release.data_size, release.data_offset)
        finally:
            os.close(fd)
        data_img.unlink()
        with memory_files(content.secret) as sources:
            script = "".join(f'write {sources[rel]} "/{rel}"\n' for rel in content.secret)
            _debugfs(_image(part, release.data_offset), script + _owner_script(paths), f"card {device_id}")
        part.rename(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        data_img.unlink(missing_ok=True)
        raise
    return WrittenCard(dest, time.monotonic() - started)


def summary_row(content: CardContent) -> dict[str, str]:
    """What the summary table shows of one card (names only, never values)."""
    spec = content.spec
    return {"device": spec.device_id, "hostname": content.hostname, "group": spec.group or "-",
            "variables": ", ".join(content.on_card) + (f" (server only: {', '.join(content.server_only)})"
                                                      if content.server_only else ""),
            "certificate": content.cert_serial or "-"}


def registration_item(content: CardContent) -> dict[str, object]:
    """The device as ``POST .../devauth/devices/provision`` takes it."""
    spec = content.spec
    values = spec.server_values
    return {"identity_data": {"device_id": spec.device_id}, "pubkey": content.pubkey_pem, "group": spec.group,
            "variables": values, "secrets": sorted(spec.secrets & set(values))}


__all__ = ["DATA_PARTITION", "MODES", "CardContent", "CardSettings", "Release", "WrittenCard", "card_content",
           "copy_regions", "dump_data_tree", "env_quote", "provisioned_env", "registration_item",
           "ssh_key_lines", "summary_row", "write_card"]
