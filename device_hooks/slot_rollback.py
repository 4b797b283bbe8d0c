"""Instant rollback: re-arm the inactive slot that still holds the release a rollback deployment asks for,
instead of downloading and writing it again.

A rollback deployment of our server (ota_server/rollback.py) sends in ``next``, besides Mender's download
link, ``vv_rollback.header_uri``: a signed link to the artifact's signed header part alone (``version``,
``manifest``, ``manifest.sig``, ``header.tar*``; a few KB). When the agent's record of the inactive slot
(``slots.json``) names the deployment's artifact, :func:`rearm`:

1. fetches that header (at most :data:`artifacts.format.MAX_HEADER_PART` bytes, through the agent's session:
   the same TLS and redirect rules as every request);
2. verifies it exactly as an install verifies a header: the manifest signature against the trusted, not
   revoked keys, the header's checksum against the manifest, the signed artifact name against the
   deployment's, then :func:`.install.check_compatible` (device type, depends, payload type, the security
   floor, and a downgrade only when the deployment allows it);
3. reads the inactive slot and hashes it over the image's size. The slot holds the release when that hash is
   the checksum the signed header carries (a ``rootfs-image``: its payload file's sha256 in the signed
   manifest; a ``rootfs-delta``: its target ``rootfs-image.checksum``): a slot written and never booted since.
   A slot the device *ran* never hashes to it: the root file system is mounted read-write, so its superblock,
   journal and whatever the system wrote changed. Such a slot is accepted when the hash is the one this agent
   recorded when it left the slot (:func:`record_left`: the other slot committed, this one not mounted any
   more) and the record's image checksum is the signed one: the slot was written from that signed image,
   verified, booted, and not changed since the device left it. A rollback always goes back to a slot the device
   ran, so without that record it could never be instant (a factory slot after its first boot included).

Only then is the slot treated as installed: the header's state scripts are stored, ``ArtifactInstall`` runs,
and the agent goes on exactly as after a download (``rebooting``, ``ArtifactReboot_Enter``, :func:`.install.arm`,
the trial boot, the health verdict, commit or roll back). Nothing is written before the arming, so a power cut
at any point leaves what an interrupted install leaves before its first write.

A header that fails verification (step 2), or one larger than the cap, fails the deployment like an install
with that header would: the server offered something this device must not run. Anything that only makes the
shortcut impossible — no hint, a record naming another artifact, the header not fetched, an image size not
known, a slot whose content no longer matches (it was overwritten since) — falls back to the normal download,
with the reason in the deployment's log and on the console, and that log uploaded with the ``downloading``
report (whose substate says it too), so the operator sees on the server why a rollback downloaded.

Trust: the record of a used slot lives on ``/data``, which is not trusted to override the signed image's
decisions. It does not: the signed header still decides what may run (signature, name, device type, security
floor, downgrade); the record only vouches that the slot's bytes are those the agent verified and then booted.
Whoever can write ``/data`` can already arm the inactive slot (an ``armed`` state file re-arms its target), and
the agent forgets a slot's record before it writes that slot, so an interrupted install never leaves a record
that vouches for half-written bytes.
"""

from __future__ import annotations

import io
import logging
import os
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import requests

from artifacts import ArtifactReader, Verifier
from artifacts.format import MAX_HEADER_PART, ROOTFS_CHECKSUM_KEY
from artifacts.header import ArtifactHeader
from ota_common.errors import ArtifactError, DownloadError, IncompatibleArtifact, MalformedArtifact

from . import validate
from .agentstate import Phase, Slot
from .api import Deployment
from .download import MAX_REDIRECTS
from .install import DELTA, DeviceFacts, InstallResult, SlotVerifyError, check_compatible, slot_sha256
from .scripts import store_scripts
from .slots import check_writable_target, slot_name
from .state import read_json, write_json
from .transport import transport_errors

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

EXT4_MAGIC = b"\x53\xef"
EXT4_INCOMPAT_64BIT = 0x80
LEFT_KEY = "left_sha256"  # slots.json: the slot's hash when the device left it (see record_left)
BLOCKINDEX_KEY = "blockindex"  # slots.json: the generation of the slot's block index (device_hooks.blockindex)
SHA256_HEX = frozenset("0123456789abcdef")


class HeaderTooLarge(MalformedArtifact):
    """The server sent more than :data:`MAX_HEADER_PART` bytes for a header part: refused, not read."""


def rearm(agent: Agent, dep: Deployment, facts: DeviceFacts, target: Slot) -> InstallResult | None:
    """The install of ``dep`` into ``target`` without a download when the slot still holds its artifact (see
    the module docstring); None when the normal install must run instead. Raises :class:`ArtifactError` for a
    header this device refuses (the deployment fails, nothing changed), ``OSError``/:class:`OTAError` as an
    install does."""
    if not dep.rollback_header_uri:
        return None
    if not dep.artifact_name:
        fall_back(agent, dep, "warning", "the deployment names no artifact to look for in the inactive slot")
        return None
    rec = agent.slot_record(int(target))
    held = rec.get("artifact_name")
    if held != dep.artifact_name:
        fall_back(agent, dep, "info", f"slot {target.label} holds {held or 'nothing this agent recorded'}")
        return None
    started = time.monotonic()
    try:
        data = fetch_header(agent.api.session, dep.rollback_header_uri, timeout=agent.cfg.server.request_timeout)
    except (DownloadError, validate.UntrustedInput) as e:
        fall_back(agent, dep, "warning", f"the rollback header was not fetched ({e})")
        return None
    header, provides, checksum = verify_header(data, agent.verifiers(), facts, dep)
    dev = check_writable_target(agent.slots, int(target))
    size = image_size(rec, dev)
    if size is None:
        fall_back(agent, dep, "warning", f"the size of the image in slot {target.label} is not known (no size "
                                         "recorded and no ext4 superblock, or larger than the partition)")
        return None
    left = left_hash(rec, checksum)
    agent.dlog(dep.id, "info", f"signature verified; {dep.artifact_name} (version "
                               f"{provides.get('rootfs-image.version', '?')}) fits this device; checking slot "
                               f"{target.label}, which should still hold it ({size} bytes"
                               + (", booted since it was written" if left else "") + ")")
    agent.report(dep.id, "installing")
    read_from = time.monotonic()
    try:
        digest = slot_sha256(dev, size)
    except SlotVerifyError as e:
        fall_back(agent, dep, "warning", f"slot {target.label} no longer holds {dep.artifact_name} ({e})")
        return None
    if digest == checksum:
        how = "as written, never booted since"
    elif left is not None and digest == left:
        how = "as this device left it (booted since it was written)"
    else:
        fall_back(agent, dep, "warning", f"slot {target.label} no longer holds {dep.artifact_name}: "
                                         f"{mismatch(rec, checksum, digest)}")
        return None
    verified = time.monotonic()
    cur = agent.current
    assert cur is not None
    with agent.scripts(dep.id).state("ArtifactInstall", lambda out: agent.dlog(dep.id, "info", out)) as install:
        store_scripts(agent.scripts_dir(dep.id), header.scripts)
        cur.phase, cur.verified = Phase.INSTALLING, True
        agent.save()
        install.enter()
    slots = read_json(agent.dir / "slots.json")
    # the slot is about to be booted: its hash and its blocks will change
    kept = {k: v for k, v in rec.items() if k not in (LEFT_KEY, BLOCKINDEX_KEY)}
    agent.slot_index(int(target)).invalidate()
    slots[str(int(target))] = {**kept, "provides": provides, "size": size}  # the signed provides from now on
    write_json(agent.dir / "slots.json", slots)
    agent.dlog(dep.id, "info", f"slot {target.label} holds {dep.artifact_name} {how}: re-armed without a "
                               f"download (header {len(data)} bytes; slot read and hashed in "
                               f"{verified - read_from:.1f}s)")
    return InstallResult(dep.artifact_name, provides, size, checksum, dict(header.scripts),
                         time.monotonic() - started, 0.0, verified - read_from, 0)


def fall_back(agent: Agent, dep: Deployment, level: str, why: str) -> None:
    """The rollback cannot use the slot: say why in the deployment's log (and so on the console), then report
    ``downloading`` with the reason as its substate and the log uploaded, so the server shows it."""
    message = f"rollback to {dep.artifact_name or 'an unnamed artifact'} downloads it: {why}"
    agent.dlog(dep.id, level, message)
    agent.report(dep.id, "downloading", message, upload_log=True)


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= SHA256_HEX


def left_hash(rec: dict[str, Any], checksum: str) -> str | None:
    """The hash recorded when the device left the slot, when the record says the slot was written from the image
    whose signed checksum is ``checksum``; else None."""
    provides = rec.get("provides")
    recorded = provides.get(ROOTFS_CHECKSUM_KEY) if isinstance(provides, dict) else None
    left = rec.get(LEFT_KEY)
    return left if is_sha256(left) and recorded == checksum else None


def mismatch(rec: dict[str, Any], checksum: str, digest: str) -> str:
    """Why a slot's hash ``digest`` is not accepted for the image ``checksum`` (see :func:`rearm`)."""
    said = f"its content hashes to {digest[:16]}…, not to the signed image's {checksum[:16]}…"
    provides = rec.get("provides")
    recorded = provides.get(ROOTFS_CHECKSUM_KEY) if isinstance(provides, dict) else None
    if recorded != checksum:
        return f"{said}, and this agent's record of the slot names another image ({str(recorded)[:16]}…)"
    if not is_sha256(rec.get(LEFT_KEY)):
        return (f"{said}; the slot was booted since it was written (a mounted root file system changes) and this "
                "agent has no record of its content from when the device left it")
    return f"{said} nor to the {str(rec[LEFT_KEY])[:16]}… recorded when the device left it: it changed since"


def record_left(agent: Agent, part: int) -> str | None:
    """Record in ``slots.json`` the hash of slot ``part`` as the device left it: called when the other slot was
    committed, so ``part`` is not mounted and stays as it is until the agent writes it again (it forgets the
    record first) or re-arms it (the hash is dropped then). Only a slot with a record of what it holds is
    hashed (its recorded size, else its ext4 size). Returns a line for the deployment's log, or None when
    there is nothing to record; never raises for the medium (the rollback then downloads)."""
    rec = agent.slot_record(part)
    if not rec.get("artifact_name"):
        return None
    label = slot_name(part)
    index = agent.slot_index(part)
    provides = rec.get("provides")
    checksum = provides.get(ROOTFS_CHECKSUM_KEY) if isinstance(provides, dict) else None
    blocks = bytearray() if index.enabled and is_sha256(checksum) else None
    try:
        dev = agent.slots.device(part)
        size = image_size(rec, dev)
        if size is None:
            return f"slot {label} left behind: the size of its image is not known, its state is not recorded"
        started = time.monotonic()
        digest = slot_sha256(dev, size, blocks=blocks)
    except (OSError, SlotVerifyError) as e:
        return f"slot {label} left behind: its state is not recorded ({e})"
    slots = read_json(agent.dir / "slots.json")
    if slots.get(str(part)) != rec:  # changed meanwhile: what was hashed is not what the record says
        return None
    left = {**rec, "size": size, LEFT_KEY: digest}
    left.pop(BLOCKINDEX_KEY, None)
    indexed = ""
    if blocks is not None:
        # the same read gives the slot's block index, so the next install into this slot need not read it first;
        # written before the record names its generation (a power cut in between leaves a stale, unused index)
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                capacity = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
            generation = index.save(device_size=capacity, payload_size=size, checksum=str(checksum),
                                    digests=bytes(blocks))
        except OSError as e:
            indexed = f"; its block index not written ({e.strerror or e}): the next install reads it"
        else:
            if generation:
                left[BLOCKINDEX_KEY] = generation
                indexed = " and indexed"
    slots[str(part)] = left
    write_json(agent.dir / "slots.json", slots)
    return (f"slot {label} left behind with {rec['artifact_name']}: its state recorded for an instant rollback "
            f"({size} bytes hashed{indexed} in {time.monotonic() - started:.1f}s)")


def fetch_header(session: requests.Session, url: str, *, timeout: float, cap: int = MAX_HEADER_PART) -> bytes:
    """The body of the header link, at most ``cap`` bytes (never decompressed; redirects followed by hand, each
    checked like a download's). Raises :class:`DownloadError` when it cannot be fetched, :class:`HeaderTooLarge`
    when the server sends or announces more than ``cap``."""
    for _ in range(MAX_REDIRECTS + 1):
        with transport_errors("rollback header"):
            resp = session.get(url, headers={"Accept-Encoding": "identity"}, stream=True, timeout=timeout,
                               allow_redirects=False)
        if resp.status_code not in (301, 302, 303, 307, 308):
            break
        location = resp.headers.get("Location", "")
        resp.close()
        url = validate.redirect(url, urllib.parse.urljoin(url, location),
                                allow_http=bool(getattr(session, "allow_http", False)))
    else:
        raise DownloadError(f"rollback header: more than {MAX_REDIRECTS} redirects")
    try:
        if resp.status_code != 200:
            raise DownloadError(f"rollback header: the server answered {resp.status_code}")
        length = resp.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and int(length) > cap:
            raise HeaderTooLarge(f"the rollback header is {length} bytes, larger than the {cap} this agent takes")
        with transport_errors("rollback header"):
            body: bytes = resp.raw.read(cap + 1, decode_content=False)
    finally:
        resp.close()
    if len(body) > cap:
        raise HeaderTooLarge(f"the rollback header is larger than the {cap} bytes this agent takes")
    if length.isascii() and length.isdigit() and int(length) != len(body):
        raise DownloadError(f"rollback header: {len(body)} of {length} bytes received")
    return body


def verify_header(data: bytes, verifiers: list[Verifier], facts: DeviceFacts, dep: Deployment
                  ) -> tuple[ArtifactHeader, dict[str, str], str]:
    """Verify a header part as an install verifies the header (see the module docstring). Returns the header,
    the provides the slot has with it, and the image checksum it signs. Raises :class:`ArtifactError`."""
    if not verifiers:
        raise ArtifactError("no trusted release keys on this device: refusing to install anything")
    reader = ArtifactReader(io.BytesIO(data), verifiers=verifiers, require_signature=True, source_size=len(data),
                            what="rollback header")
    header = reader.read_header()
    name = header.info.artifact_name
    if name != dep.artifact_name:
        raise IncompatibleArtifact(f"artifact name mismatch: the deployment is for {dep.artifact_name!r}, the "
                                   f"signed header is {name!r}")
    provides = check_compatible(header, facts, allow_downgrade=dep.allow_downgrade)
    ti = header.type_infos[0]
    claimed = ti.provides.get(ROOTFS_CHECKSUM_KEY)
    if ti.type == DELTA:
        if not claimed:
            raise IncompatibleArtifact("delta artifact does not provide rootfs-image.checksum: nothing to check against")
        checksum = claimed
    else:
        assert reader.manifest is not None
        files = reader.manifest.data_files(0)
        if len(files) != 1:
            raise IncompatibleArtifact(f"artifact {name!r} has {len(files)} payload files; a root filesystem "
                                       "image is one")
        checksum = next(iter(files.values()))
        if claimed is not None and claimed != checksum:
            raise MalformedArtifact(f"rollback header: type-info provides {ROOTFS_CHECKSUM_KEY}={claimed[:16]}… but "
                                    f"the signed manifest says {checksum[:16]}…")
    provides[ROOTFS_CHECKSUM_KEY] = checksum
    return header, provides, checksum


def image_size(rec: dict[str, Any], dev: os.PathLike[str] | str) -> int | None:
    """How many bytes of the slot the image covers: the ``size`` this agent recorded when it wrote the slot,
    else the ext4 file system's own size (the factory slot, or one an older agent wrote). Neither needs trust:
    only the image's own bytes hash to the signed checksum."""
    size = rec.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        size = ext4_size(dev)
    if size is None:
        return None
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        capacity = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return size if size <= capacity else None


def ext4_size(dev: os.PathLike[str] | str) -> int | None:
    """The size of the ext4 file system at the start of ``dev`` from its superblock, None when there is none."""
    try:
        with open(dev, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 1024 or sb[56:58] != EXT4_MAGIC:
        return None
    log_block = int.from_bytes(sb[24:28], "little")
    if log_block > 6:  # 64 KiB blocks at most
        return None
    blocks = int.from_bytes(sb[4:8], "little")
    if int.from_bytes(sb[0x60:0x64], "little") & EXT4_INCOMPAT_64BIT:
        blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
    return blocks * (1024 << log_block) or None


__all__ = ["LEFT_KEY", "HeaderTooLarge", "ext4_size", "fall_back", "fetch_header", "image_size", "left_hash",
           "rearm", "record_left", "verify_header"]
