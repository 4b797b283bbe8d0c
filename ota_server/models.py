"""Tables. Portable types only (SQLite and PostgreSQL): string ids (UUID text), timestamps as epoch seconds
(``Double``), JSON columns through SQLAlchemy's ``JSON`` type. The migrations in ``migrations/`` create them."""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Device(Base):
    __tablename__ = "devices"
    #: stale devices are counted and listed by status and last_seen (``lastseen.stale_clause``)
    __table_args__ = (sa.Index("ix_devices_status_last_seen", "status", "last_seen"),)
    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    identity_json: Mapped[str] = mapped_column(sa.Text)
    identity_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    #: derived from the auth sets: accepted > preauthorized > pending > rejected
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    group_name: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    inventory: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    #: hash of the last ``device_provides`` merged into the inventory (so an unchanged poll writes nothing)
    provides_hash: Mapped[str | None] = mapped_column(sa.String(64))
    device_type: Mapped[str | None] = mapped_column(sa.String(128))
    created: Mapped[float] = mapped_column(sa.Double)
    updated: Mapped[float] = mapped_column(sa.Double)
    inventory_updated: Mapped[float | None] = mapped_column(sa.Double)
    #: the accepted auth set (NULL when none is): a device token is valid only for this set ...
    auth_set_id: Mapped[str | None] = mapped_column(sa.String(36))
    #: ... and this epoch, raised whenever an auth set is accepted or the accepted one stops being accepted, so
    #: that rejecting, replacing (accepting another key) or re-accepting ends every token issued before
    token_epoch: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    #: the last authenticated device request (poll, status, log, inventory, configuration), written in batches
    #: (:mod:`.lastseen`); NULL: none since the column exists
    last_seen: Mapped[float | None] = mapped_column(sa.Double)
    #: sha256 of the effective configuration (:mod:`.confighash`), recomputed when it changes and sent with every
    #: ``next`` answer; NULL: the empty configuration's
    config_hash: Mapped[str | None] = mapped_column(sa.String(64))


class AuthSet(Base):
    __tablename__ = "auth_sets"
    __table_args__ = (sa.UniqueConstraint("device_id", "pubkey_hash"),)
    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    pubkey: Mapped[str] = mapped_column(sa.Text)
    #: (indexed: revoking a device certificate rejects every auth set of its key)
    pubkey_hash: Mapped[str] = mapped_column(sa.String(64), index=True)
    status: Mapped[str] = mapped_column(sa.String(16))
    created: Mapped[float] = mapped_column(sa.Double)
    #: the fleet certificate (serial, lower-case hex) that accepted this set, or the last one refused for it ...
    cert_serial: Mapped[str | None] = mapped_column(sa.String(40), index=True)
    #: ... and why it was refused (a :data:`ota_common.fleetca.REFUSAL_REASONS` word; NULL: not refused)
    cert_refused: Mapped[str | None] = mapped_column(sa.String(32))


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256), index=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    device_types: Mapped[list[str]] = mapped_column(sa.JSON)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    signed: Mapped[bool] = mapped_column(sa.Boolean)
    signed_by: Mapped[str | None] = mapped_column(sa.String(255))
    #: provides, depends, payload types, clears_provides (as ``build.py artifact show --json`` names them)
    info: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created: Mapped[float] = mapped_column(sa.Double)


class ArtifactTarget(Base):
    """What makes two artifacts conflict, one row per device type of an artifact: the same name for the same
    device type and the same source image (``source``: the ``rootfs-image.checksum`` a delta depends on, ``""``
    for a full artifact). The primary key is the unique index behind the upload's 409: of two concurrent
    uploads only one can insert its rows."""

    __tablename__ = "artifact_targets"
    name: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    device_type: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    source: Mapped[str] = mapped_column(sa.String(256), primary_key=True)
    artifact_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("artifacts.id", ondelete="CASCADE"),
                                             index=True)


class ArtifactSbom(Base):
    """The SBOM (CycloneDX JSON) of an artifact's image as the operator uploaded it (issue 17). Its sha256 is the
    one the artifact's signed meta-data names (``vv.sbom_sha256``), checked at upload; ``packages`` are its
    components with a purl, ``[[name, version, purl], ...]`` sorted, read once at upload for the package lists
    and diffs (:mod:`.sbom`)."""

    __tablename__ = "artifact_sboms"
    artifact_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("artifacts.id", ondelete="CASCADE"),
                                             primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size: Mapped[int] = mapped_column(sa.Integer)
    #: the exact bytes (UTF-8 JSON), so that a reader can check them against the signed hash again
    document: Mapped[str] = mapped_column(sa.Text)
    packages: Mapped[list[list[str]]] = mapped_column(sa.JSON)
    created: Mapped[float] = mapped_column(sa.Double)


class ArtifactProvenance(Base):
    """The in-toto/SLSA provenance (a DSSE envelope) of an artifact as the operator uploaded it: one of its
    subjects is the artifact's sha256, and its signature verified with ``signed_by`` (a release key of the
    server; NULL: the server has no release keys, so it is stored unverified)."""

    __tablename__ = "artifact_provenance"
    artifact_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("artifacts.id", ondelete="CASCADE"),
                                             primary_key=True)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size: Mapped[int] = mapped_column(sa.Integer)
    envelope: Mapped[str] = mapped_column(sa.Text)
    signed_by: Mapped[str | None] = mapped_column(sa.String(255))
    #: the subject that is the artifact (its name in the release)
    subject: Mapped[str] = mapped_column(sa.String(512))
    created: Mapped[float] = mapped_column(sa.Double)


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(256))
    artifact_name: Mapped[str] = mapped_column(sa.String(256), index=True)
    #: pending, inprogress, paused, finished, aborted
    status: Mapped[str] = mapped_column(sa.String(16), index=True)
    created: Mapped[float] = mapped_column(sa.Double)
    finished: Mapped[float | None] = mapped_column(sa.Double)
    device_count: Mapped[int] = mapped_column(sa.Integer)
    #: [{"batch_size": %, "start_ts": epoch, "device_count": n}]; gated deployments add per phase "wait_s",
    #: "start_at", "gate" and "gate_passed_ts", and "start_ts" is null while the phase waits for its gate
    phases: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    failure_threshold: Mapped[float | None] = mapped_column(sa.Double)
    allow_downgrade: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    retries: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: what the request targeted: {"devices": [...]} | {"all_devices": true} | {"group": name}, the last one
    #: with {"filter": {attribute: value}} added, or {"filter": {...}} alone (every accepted device that matches)
    target: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    #: a dynamic deployment takes the devices that join its target later, until it is closed
    dynamic: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    #: while a dynamic deployment takes joiners: its group, or ``*`` for all devices; NULL otherwise (not
    #: dynamic, closed, aborted). Indexed: a poll asks for the open dynamic deployments of the device's group
    join_group: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    #: ``{inventory attribute: value}``: a deployment to a filter takes the devices whose inventory has every
    #: attribute equal (strings); with ``dynamic``, also the ones that match later while ``join_group`` is set
    join_filter: Mapped[dict[str, str] | None] = mapped_column(sa.JSON)
    #: when a dynamic deployment was closed (stopped taking joiners)
    closed: Mapped[float | None] = mapped_column(sa.Double)
    #: {"max_failed_pct": P, "on_failure": "pause" | "abort"} (see ota_server/gates.py)
    failure_limit: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    #: why the deployment was paused or aborted by the server (the failure limit), for the operator
    status_reason: Mapped[str | None] = mapped_column(sa.Text)
    #: ``software``, or ``rollback``: each device is sent back to what it ran before ``rollback_of``
    #: (``deployment_devices.target_artifact``; see ota_server/rollback.py)
    kind: Mapped[str] = mapped_column(sa.String(16), default="software", server_default="software")
    rollback_of: Mapped[str | None] = mapped_column(sa.String(36))


class DeploymentDevice(Base):
    """One device in one deployment. ``active`` is true until the device's status is final; the poll path
    asks only ``WHERE device_id = ? AND active`` (indexed)."""

    __tablename__ = "deployment_devices"
    __table_args__ = (
        sa.Index("ix_deployment_devices_device_active", "device_id", "active"),
        sa.Index("ix_deployment_devices_deployment_status", "deployment_id", "status"),
        sa.Index("ix_deployment_devices_deployment_active", "deployment_id", "active"),
    )
    deployment_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    #: no foreign key: the history outlives a decommissioned device
    device_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(32))
    substate: Mapped[str | None] = mapped_column(sa.Text)
    active: Mapped[bool] = mapped_column(sa.Boolean)
    phase: Mapped[int] = mapped_column(sa.Integer)
    #: the device's phase start: it gets the deployment from then on
    not_before: Mapped[float] = mapped_column(sa.Double)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: the attempt ``next`` last handed to the device: after a retry, reports about an older attempt (a
    #: resent ``failure``) arrive before this catches up with ``attempts`` and are ignored
    delivered_attempt: Mapped[int | None] = mapped_column(sa.Integer)
    created: Mapped[float] = mapped_column(sa.Double)
    started: Mapped[float | None] = mapped_column(sa.Double)
    finished: Mapped[float | None] = mapped_column(sa.Double)
    has_log: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    #: the device's inventory ``artifact_name`` when ``next`` first handed it this deployment (what a rollback
    #: of the deployment sends it back to); NULL: not handed out yet, or handed out before the column existed
    from_artifact: Mapped[str | None] = mapped_column(sa.String(256))
    #: the artifact this device is sent instead of the deployment's ``artifact_name`` (rollback deployments)
    target_artifact: Mapped[str | None] = mapped_column(sa.String(256))


class DeploymentLog(Base):
    __tablename__ = "deployment_logs"
    __table_args__ = (sa.Index("ix_deployment_logs_deployment_device", "deployment_id", "device_id"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(sa.String(36), sa.ForeignKey("deployments.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(sa.String(36))
    created: Mapped[float] = mapped_column(sa.Double)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    #: len(messages), so that readers can page from the newest message without loading every row
    message_count: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    #: bytes charged against the log quota (UTF-8 JSON of the messages; the rest of the quota when truncated)
    size: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")


class ConfigValue(Base):
    """A configuration variable of a device (``scope="device"``, owner = device id) or of a group
    (``scope="group"``, owner = group name). Secret values hold a Fernet token, never the plaintext."""

    __tablename__ = "config_values"
    scope: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    owner: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    value: Mapped[str] = mapped_column(sa.Text)
    secret: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    updated: Mapped[float] = mapped_column(sa.Double)


class StagedHost(Base):
    """A host of an Ansible import that no device matched yet: its variables wait (``config_values`` of scope
    ``staged``, owner = host) for a device whose id or identity equals ``host`` or ``device_key`` (the host's
    ``DEVICE_ID``), and are applied when that device is accepted."""

    __tablename__ = "staged_hosts"
    host: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    device_key: Mapped[str | None] = mapped_column(sa.String(128), index=True)
    group_name: Mapped[str | None] = mapped_column(sa.String(64))
    created: Mapped[float] = mapped_column(sa.Double)
    updated: Mapped[float] = mapped_column(sa.Double)


class RevokedCertificate(Base):
    """A revoked device certificate of the fleet CA: never again accepted by its serial, nor any certificate for
    its public key (``pubkey_hash``: the SHA-256 of its normalized PEM, as ``auth_sets.pubkey_hash``, when known);
    ``device_id`` is the certificate's ``DEVICE_ID`` when known."""

    __tablename__ = "revoked_certificates"
    serial: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    pubkey_hash: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    device_id: Mapped[str | None] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.String(256))
    revoked_by: Mapped[str] = mapped_column(sa.String(128))
    revoked: Mapped[float] = mapped_column(sa.Double)


class ApiToken(Base):
    """A named management API token. Only the SHA-256 of the token is stored; ``id`` is the public part of
    the token (``vvota_<id>_<secret>``) used to find the row before the hash is compared in constant time."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    #: read, operate or admin (each includes the ones before it)
    scope: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64))
    created: Mapped[float] = mapped_column(sa.Double)
    created_by: Mapped[str] = mapped_column(sa.String(128))


class AuditEntry(Base):
    """One management change (or a refused attempt): who (token name), what (method, path, summary), when."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(sa.Double, index=True)
    actor: Mapped[str] = mapped_column(sa.String(128))
    method: Mapped[str] = mapped_column(sa.String(16))
    path: Mapped[str] = mapped_column(sa.Text)
    summary: Mapped[str] = mapped_column(sa.Text)


devices = cast(sa.Table, Device.__table__)
auth_sets = cast(sa.Table, AuthSet.__table__)
artifacts = cast(sa.Table, Artifact.__table__)
artifact_targets = cast(sa.Table, ArtifactTarget.__table__)
artifact_sboms = cast(sa.Table, ArtifactSbom.__table__)
artifact_provenance = cast(sa.Table, ArtifactProvenance.__table__)
deployments = cast(sa.Table, Deployment.__table__)
deployment_devices = cast(sa.Table, DeploymentDevice.__table__)
deployment_logs = cast(sa.Table, DeploymentLog.__table__)
config_values = cast(sa.Table, ConfigValue.__table__)
staged_hosts = cast(sa.Table, StagedHost.__table__)
revoked_certificates = cast(sa.Table, RevokedCertificate.__table__)
api_tokens = cast(sa.Table, ApiToken.__table__)
audit_log = cast(sa.Table, AuditEntry.__table__)
