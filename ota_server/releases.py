"""Management API: artifacts (releases) and deployments (reads need scope ``read``, changes ``operate``; every
change is written to the audit log)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from artifacts import ArtifactReader
from ota_common.errors import ArtifactError

from . import deployments as rollout
from .apitokens import READ, Operator
from .audit import names
from .context import ServerContext, get_ctx
from .db import where_given
from .device_api import AttributeName
from .device_logs import device_log
from .errors import APIError, bad_request, conflict, found_or_404
from .management import DEFAULT_PER_PAGE, READS, Page, PerPage
from .models import artifact_targets as targets_t
from .models import artifacts as art_t
from .models import deployment_devices as dd
from .models import deployments as dep
from .models import devices
from .timeutil import now, rfc3339

router = APIRouter(dependencies=[Depends(READ)])
Ctx = Annotated[ServerContext, Depends(get_ctx)]
ARTIFACTS = "/api/management/v1/deployments/artifacts"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
MAX_FIELD = 64 * 1024
log = logging.getLogger("ota_server")


# ---------------------------------------------------------------------------------------------------------
# Artifacts


def _artifact_doc(r: Any) -> dict[str, Any]:
    info = r.info
    return {
        "id": r.id,
        "name": r.name,
        "description": r.description,
        "device_types_compatible": list(r.device_types),
        "info": {"format": "mender", "version": 3},
        "signed": bool(r.signed),
        "signed_by": r.signed_by,
        "size": r.size,
        "sha256": r.sha256,
        "modified": rfc3339(r.created),
        "artifact_provides": info.get("artifact_provides", {}),
        "artifact_depends": info.get("artifact_depends", {}),
        "clears_artifact_provides": info.get("clears_artifact_provides", []),
        "updates": info.get("updates", []),
    }


class _Upload:
    """Streams a multipart body: the ``artifact`` part to a temporary file in storage (hashing it on the
    way), small text fields (``description``, ``size``) to memory."""

    def __init__(self, tmp_dir: Path, max_size: int) -> None:
        self.file = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="upload-", suffix=".mender", delete=False)  # noqa: SIM115
        self.path = Path(self.file.name)
        self.max_size = max_size
        self.size = 0
        self.sha = hashlib.sha256()
        self.fields: dict[str, bytes] = {}
        self.artifact_parts = 0
        self._headers: dict[str, bytes] = {}
        self._field = b""
        self._value = b""
        self._part: str | None = None
        self._error: str | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
            "on_header_end": self._hend, "on_headers_finished": self._hdone, "on_part_data": self._data,
        }

    def _begin(self) -> None:
        self._headers, self._part = {}, None

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value
        self._field, self._value = b"", b""

    def _hdone(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        self._part = params.get(b"name", b"").decode("latin-1")
        if self._part == "artifact":
            self.artifact_parts += 1
        else:
            self.fields.setdefault(self._part, b"")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "artifact":
            if self.artifact_parts > 1:
                return
            chunk = data[start:end]
            self.size += len(chunk)
            if self.size > self.max_size:
                raise APIError(413, f"artifact larger than {self.max_size} bytes")
            self.sha.update(chunk)
            self.file.write(chunk)
        elif self._part is not None:
            value = self.fields[self._part] + data[start:end]
            if len(value) > MAX_FIELD:
                raise bad_request(f"form field {self._part!r} is too large")
            self.fields[self._part] = value

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _read_artifact(path: Path, size: int, ctx: ServerContext) -> dict[str, Any]:
    """Verify signature, structure and every payload checksum; the description of what was verified."""
    require = bool(ctx.verifiers) and not ctx.settings.allow_unsigned
    with open(path, "rb") as f:
        r = ArtifactReader(f, verifiers=ctx.verifiers, require_signature=require, source_size=size, what="artifact")
        h = r.read_header()
        files: list[list[dict[str, Any]]] = [[] for _ in h.type_infos]
        for pf in r.files():
            for _ in pf.chunks():
                pass
            files[pf.payload_index].append({"name": pf.name, "checksum": pf.sha256, "size": pf.size})
        if not r.complete:
            raise ArtifactError("artifact did not end cleanly")
    provides: dict[str, Any] = {"artifact_name": h.info.artifact_name}
    if h.info.artifact_group:
        provides["artifact_group"] = h.info.artifact_group
    depends: dict[str, Any] = {"device_type": list(h.info.device_types)}
    if h.info.depends_artifact_names:
        depends["artifact_name"] = list(h.info.depends_artifact_names)
    clears: list[str] = []
    for ti in h.type_infos:
        provides.update(ti.provides)
        depends.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in ti.depends.items()})
        clears.extend(ti.clears_provides)
    return {
        "name": h.info.artifact_name,
        "device_types": list(h.info.device_types),
        "signed": r.signature_status.value != "unsigned",
        "signed_by": r.signed_by,
        "info": {
            "artifact_provides": provides, "artifact_depends": depends, "clears_artifact_provides": clears,
            "updates": [{"type_info": {"type": ti.type}, "files": files[i], "meta_data": h.meta_data[i]}
                        for i, ti in enumerate(h.type_infos)],
            "scripts": sorted(h.scripts),
        },
    }


MAX_KEY = 256


def _check_key_lengths(name: str, device_types: list[str], source: str | None) -> None:
    """The columns of the conflict index hold at most MAX_KEY characters."""
    for what, value in (("name", name), ("depended rootfs-image.checksum", source or ""),
                        *(("device type", t) for t in device_types)):
        if len(value) > MAX_KEY:
            raise bad_request(f"artifact rejected: its {what} is longer than {MAX_KEY} characters")


def _refuse_conflicts(c: sa.Connection, name: str, device_types: list[str], source: str | None) -> None:
    """409 when an artifact with this name has a device type in common and the same source image (a full
    artifact and deltas of it from different images share the name)."""
    for other in c.execute(sa.select(art_t.c.id, art_t.c.device_types, art_t.c.info).where(art_t.c.name == name)):
        common = sorted(set(other.device_types) & set(device_types))
        if common and rollout.source_checksum(other.info) == source:
            what = "" if source is None else f" (a delta from image {source[:16]}…)"
            raise conflict(f"artifact {name}{what} for device type {common[0]} already exists ({other.id})")


@router.post(ARTIFACTS, status_code=201, tags=["artifacts"], response_class=Response,
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["artifact"],
                 "properties": {"artifact": {"type": "string", "format": "binary"},
                                "description": {"type": "string"}}}}}}})
async def upload_artifact(request: Request, ctx: Ctx, who: Operator) -> Response:
    """Upload a release (multipart field ``artifact``, optional ``description``). Streamed to storage, then
    its signature (against the server's release keys), structure and payload checksums are verified; 400 with
    the reason otherwise; 409 if an artifact with this name and an overlapping device type exists. A delta
    artifact (it depends on a ``rootfs-image.checksum``) is stored next to the full artifact of the same name;
    ``next`` offers it to devices running its source image."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise bad_request("expected a multipart/form-data body with an 'artifact' field")
    if not ctx.verifiers and not ctx.settings.allow_unsigned:
        async for _ in request.stream():  # read the body so that the client sees the answer
            pass
        raise bad_request("this server has no release keys: start it with --release-key (or --allow-unsigned)")
    tmp_dir = ctx.settings.storage / "tmp"
    upload = _Upload(tmp_dir, ctx.settings.max_artifact)
    try:
        parser = MultipartParser(params[b"boundary"], upload.callbacks())  # type: ignore[arg-type]
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as e:
            raise bad_request(f"malformed multipart body: {e}") from None
        upload.file.flush()
        os.fsync(upload.file.fileno())
        upload.file.close()
        if upload.artifact_parts != 1:
            raise bad_request("the form must have exactly one 'artifact' file field")
        description = upload.fields.get("description", b"").decode("utf-8", "replace")
        if "size" in upload.fields:
            try:
                declared = int(upload.fields["size"])
            except ValueError:
                raise bad_request("size must be an integer") from None
            if declared != upload.size:
                raise bad_request(f"size says {declared} bytes but the artifact has {upload.size}")
        try:
            meta = await run_in_threadpool(_read_artifact, upload.path, upload.size, ctx)
        except ArtifactError as e:
            raise bad_request(f"artifact rejected: {e}") from None
        artifact_id = str(uuid.uuid4())
        source = rollout.source_checksum(meta["info"])
        _check_key_lengths(meta["name"], meta["device_types"], source)
        with ctx.db.read() as c:  # before the bytes go to the store (checked again in the transaction)
            _refuse_conflicts(c, meta["name"], meta["device_types"], source)
        sha256 = upload.sha.hexdigest()
        try:  # an object store takes time: not inside the write transaction, not on the event loop
            await run_in_threadpool(ctx.store.put, artifact_id, upload.path, sha256, upload.size)
        except Exception as e:
            log.error("cannot store artifact %s in %s: %s", artifact_id, ctx.store.where, e)
            raise APIError(503, f"cannot store the artifact in {ctx.store.where}; try again") from None
        stored = False
        try:
            with ctx.db.write() as c:
                _refuse_conflicts(c, meta["name"], meta["device_types"], source)
                c.execute(art_t.insert().values(
                    id=artifact_id, name=meta["name"], description=description, device_types=meta["device_types"],
                    size=upload.size, sha256=sha256, signed=meta["signed"],
                    signed_by=(meta["signed_by"] or "")[:255] or None, info=meta["info"], created=now()))
                # the unique index: of two uploads racing past the check above, the second waits here for the
                # first to commit and then fails (sorted: two uploads lock the index entries in the same order)
                targets = [{"name": meta["name"], "device_type": t, "source": source or "", "artifact_id": artifact_id}
                           for t in sorted(set(meta["device_types"]))]
                if targets:
                    c.execute(targets_t.insert(), targets)
                who.record(c, f"uploaded artifact {meta['name']} ({artifact_id}) for {names(meta['device_types'])}, "
                              f"{upload.size} bytes, "
                              f"{'signed by ' + str(meta['signed_by']) if meta['signed'] else 'unsigned'}")
            stored = True
        except sa.exc.IntegrityError:
            raise conflict(f"artifact {meta['name']} for device type {', '.join(meta['device_types'])} was "
                           "uploaded at the same moment by another request") from None
        finally:
            if not stored:  # no row refers to it: remove it again
                await run_in_threadpool(_forget, ctx, artifact_id)
        return Response(status_code=201, headers={"Location": f"{ARTIFACTS}/{artifact_id}"})
    finally:
        upload.discard()


def _forget(ctx: ServerContext, artifact_id: str) -> None:
    """Remove an artifact stored for an upload that did not commit (a failure here is logged, not raised: the
    upload's own answer matters more than an orphan object)."""
    try:
        ctx.store.delete(artifact_id)
    except Exception as e:
        log.error("cannot remove the uncommitted artifact %s from %s: %s", artifact_id, ctx.store.where, e)


@router.get(ARTIFACTS, tags=["artifacts"], dependencies=READS)
def list_artifacts(ctx: Ctx, name: str | None = None) -> list[dict[str, Any]]:
    q = where_given(sa.select(art_t).order_by(art_t.c.created), art_t.c.name, name)
    with ctx.db.read() as c:
        return [_artifact_doc(r) for r in c.execute(q)]


@router.get(ARTIFACTS + "/{artifact_id}", tags=["artifacts"], dependencies=READS)
def get_artifact(artifact_id: str, ctx: Ctx) -> dict[str, Any]:
    with ctx.db.read() as c:
        r = found_or_404(c.execute(sa.select(art_t).where(art_t.c.id == artifact_id)).first(), "artifact")
    return _artifact_doc(r)


@router.delete(ARTIFACTS + "/{artifact_id}", status_code=204, tags=["artifacts"])
def delete_artifact(artifact_id: str, ctx: Ctx, who: Operator) -> Response:
    """Delete an artifact no unfinished deployment uses (409 otherwise)."""
    with ctx.db.write() as c:
        # locked: a deployment created at the same moment for this name waits for the answer (see create)
        r = found_or_404(c.execute(sa.select(art_t.c.name).where(art_t.c.id == artifact_id).with_for_update()).first(),
                         "artifact")
        using = c.execute(sa.select(dep.c.id).where(dep.c.artifact_name == r.name,
                                                    dep.c.status.in_(rollout.OPEN)).limit(1)).first()
        if using is None:  # a rollback deployment sends some devices to it
            using = c.execute(sa.select(dd.c.deployment_id.label("id")).where(
                dd.c.target_artifact == r.name, dd.c.active.is_(True)).limit(1)).first()
        if using is not None:
            raise conflict(f"deployment {using.id} still uses artifact {r.name}; abort it or wait until it finishes")
        c.execute(sa.delete(art_t).where(art_t.c.id == artifact_id))
        who.record(c, f"deleted artifact {r.name} ({artifact_id})")
    ctx.store.delete(artifact_id)  # after the commit: a row never points at a missing object
    return Response(status_code=204)


# ---------------------------------------------------------------------------------------------------------
# Deployments


class PhaseGate(BaseModel):
    """The phase starts only when at least ``min_success_pct`` % of the devices of the phases before it reported
    ``success`` (committed after a passing health check), and the success that reached that share is
    ``soak_s`` seconds old (see ota_server/gates.py)."""

    model_config = ConfigDict(extra="forbid")
    min_success_pct: float = Field(ge=1, le=100, description="percent of the previous phases' devices")
    soak_s: float = Field(0, ge=0, le=366 * 86400, description="seconds the last success needed must be old")


class FailureLimit(BaseModel):
    """Past ``max_failed_pct`` % of the devices handed out with a failed attempt (rollbacks included), the
    deployment is paused (``on_failure: pause``, resume it with status ``inprogress``) or aborted."""

    model_config = ConfigDict(extra="forbid")
    max_failed_pct: float = Field(ge=0, le=100, description="percent of the devices handed out")
    on_failure: Literal["pause", "abort"] = "pause"


class PhaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(None, ge=1, le=100, description="percent of the target devices")
    start_ts: AwareDatetime | None = None
    wait_s: float | None = Field(None, ge=0, le=366 * 86400, description="seconds after the previous phase started")
    gate: PhaseGate | None = Field(None, description="start only when the previous phases are healthy enough "
                                   "(not on the first phase)")

    @model_validator(mode="after")
    def _one_start(self) -> PhaseIn:
        if self.start_ts is not None and self.wait_s is not None:
            raise ValueError("give start_ts or wait_s, not both")
        return self


class NewDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    artifact_name: str = Field(min_length=1, max_length=256)
    devices: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, min_length=1, max_length=100_000)
    all_devices: bool = False
    group: str | None = Field(None, pattern="^[A-Za-z0-9_-]{1,64}$")
    phases: list[PhaseIn] | None = Field(None, min_length=1, max_length=100)
    failure_threshold: float | None = Field(None, ge=0, le=100, description="percent of finished devices")
    allow_downgrade: bool = False
    retries: int = Field(0, ge=0, le=100)
    filter: dict[AttributeName, Annotated[str, Field(max_length=1024)]] | None = Field(
        None, min_length=1, max_length=8,
        description="the accepted devices whose inventory attributes all equal these values (strings); alone, or "
                    "with group: within the group")
    dynamic: bool = Field(False, description="keep taking the devices that join the group (or, with all_devices, "
                          "that are accepted; with filter, whose inventory comes to match) until the deployment is "
                          "closed or aborted")
    failure_limit: FailureLimit | None = None

    @model_validator(mode="after")
    def _check(self) -> NewDeployment:
        if self.filter is not None and (self.devices is not None or self.all_devices):
            raise ValueError("filter goes alone or with group, not with devices or all_devices")
        targets = (self.devices is not None) + self.all_devices + (self.group is not None or self.filter is not None)
        if targets != 1:
            raise ValueError("give exactly one target: devices, all_devices, group or filter")
        if self.dynamic and self.devices is not None:
            raise ValueError("a dynamic deployment targets a group, a filter or all_devices, not a device list")
        check_phases(self.phases)
        return self


def check_phases(phases: list[PhaseIn] | None) -> None:
    """The rules of a deployment's phases (a ValueError says which one is broken)."""
    if not phases:
        return
    if phases[0].gate is not None:
        raise ValueError("the first phase cannot have a gate (no phase before it to judge)")
    for i, p in enumerate(phases[:-1]):
        if p.batch_size is None:
            raise ValueError(f"phase {i + 1} needs batch_size (only the last phase takes the rest)")
    used = sum(p.batch_size or 0 for p in phases[:-1])
    if len(phases) > 1 and used >= 100:
        raise ValueError("the batch sizes before the last phase must add up to less than 100")
    last = phases[-1].batch_size
    if last is not None and last != 100 - used:
        raise ValueError(f"the last phase takes the remaining {100 - used}% (omit its batch_size)")


def phase_specs(phases: list[PhaseIn] | None) -> list[dict[str, Any]]:
    """The phases of a request as :func:`.deployments.plan_phases` takes them."""
    return [{"batch_size": p.batch_size, "wait_s": p.wait_s, "start_ts": p.start_ts.timestamp() if p.start_ts else None,
             **({"gate": p.gate.model_dump()} if p.gate is not None else {})} for p in phases or []]


def _deployment_doc(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "artifact_name": r.artifact_name,
        "created": rfc3339(r.created),
        "finished": rfc3339(r.finished),
        "status": r.status,
        "device_count": r.device_count,
        "type": "software",
        "phases": [_phase_doc(p) for p in r.phases],
        "failure_threshold": r.failure_threshold,
        "allow_downgrade": bool(r.allow_downgrade),
        "retries": r.retries,
        "target": r.target,
        # extensions: dynamic deployments, the failure limit, why the server paused or aborted it
        "dynamic": bool(r.dynamic),
        "closed": rfc3339(r.closed),
        "failure_limit": r.failure_limit,
        "status_reason": r.status_reason,
        # extension: "rollback" sends each device back to what it ran before deployment rollback_of
        "kind": r.kind,
        "rollback_of": r.rollback_of,
    }


def _filter_text(wanted: dict[str, str]) -> str:
    return " and ".join(f"{n}={v!r}" for n, v in wanted.items())


def _phase_doc(p: dict[str, Any]) -> dict[str, Any]:
    doc = {**p, "start_ts": rfc3339(p["start_ts"])}
    for key in ("start_at", "gate_passed_ts"):
        if key in doc:
            doc[key] = rfc3339(doc[key])
    return doc


@router.post(DEPLOYMENTS, status_code=201, tags=["deployments"], response_class=Response)
def create_deployment(body: NewDeployment, ctx: Ctx, who: Operator) -> Response:
    """Deploy a release to devices, a group or all accepted devices, optionally in phases (on a timer, or
    gated by the health of the phases before) with a failure threshold or limit. Targets are resolved now;
    a ``dynamic`` deployment also takes the devices that join its group (or are accepted, with
    ``all_devices``, or whose inventory comes to match its ``filter``) later, until it is closed."""
    t = now()
    phases = phase_specs(body.phases)
    deployment_id = str(uuid.uuid4())
    with ctx.db.write() as c:
        # FOR SHARE: an artifact deleted at the same moment is either gone here or sees this deployment
        if not c.execute(sa.select(art_t.c.id).where(art_t.c.name == body.artifact_name)
                         .with_for_update(read=True)).all():
            raise bad_request(f"no artifact named {body.artifact_name!r}: upload it first")
        if body.devices is not None:
            ids = list(dict.fromkeys(body.devices))
            found = {r.id: r.status for r in c.execute(sa.select(devices.c.id, devices.c.status)
                                                         .where(devices.c.id.in_(ids)))}
            missing = [i for i in ids if i not in found]
            if missing:
                raise bad_request(f"unknown device(s): {', '.join(missing[:5])}")
            unaccepted = [i for i in ids if found[i] != "accepted"]
            if unaccepted:
                raise bad_request(f"device(s) not accepted: {', '.join(unaccepted[:5])}")
            target: dict[str, Any] = {"devices": ids}
        else:
            q = sa.select(devices.c.id, devices.c.inventory).where(devices.c.status == "accepted").order_by(devices.c.id)
            target = {}
            if body.group is not None:
                q = q.where(devices.c.group_name == body.group)
                target["group"] = body.group
            if body.filter is not None:  # a full scan of the target's inventories, once, at creation
                target["filter"] = body.filter
                ids = [r.id for r in c.execute(q) if rollout.matches_filter(r.inventory, body.filter)]
            else:
                target = target or {"all_devices": True}
                ids = [r[0] for r in c.execute(q.with_only_columns(devices.c.id))]
        if not ids and not body.dynamic:
            raise bad_request("no accepted devices match the target")
        planned, assignment = rollout.plan_phases(ids, phases, t)
        starts = [p["start_ts"] for p in planned if p["start_ts"] is not None]
        if starts != sorted(starts):
            raise bad_request("phases must start in order")
        join_group = (target.get("group") or rollout.ALL_GROUPS) if body.dynamic else None
        c.execute(dep.insert().values(
            id=deployment_id, name=body.name, artifact_name=body.artifact_name, status="pending", created=t,
            device_count=len(ids), phases=planned, failure_threshold=body.failure_threshold,
            allow_downgrade=body.allow_downgrade, retries=body.retries, target=target, dynamic=body.dynamic,
            join_group=join_group, join_filter=body.filter,
            failure_limit=body.failure_limit.model_dump() if body.failure_limit is not None else None))
        if assignment:
            c.execute(dd.insert(), [
                {"deployment_id": deployment_id, "device_id": d, "status": "pending", "active": True, "phase": ph,
                 "not_before": nb, "attempts": 0, "created": t, "has_log": False}
                for d, ph, nb in assignment])
        aim = ("a device list" if "devices" in target else f"group {target['group']}" if "group" in target
               else "all devices") + (
            f" matching {_filter_text(body.filter)}" if body.filter else "") + (", dynamic" if body.dynamic else "")
        gated = sum(1 for p in planned if p.get("gate"))
        who.record(c, f"created deployment {body.name!r} ({deployment_id}) of {body.artifact_name} to {len(ids)} "
                      f"device(s) ({aim}), {len(planned)} phase(s)" + (f" ({gated} gated)" if gated else "")
                      + f", failure threshold {body.failure_threshold}"
                      + (f", failure limit {body.failure_limit.max_failed_pct:g}% ({body.failure_limit.on_failure})"
                         if body.failure_limit is not None else ""))
    return Response(status_code=201, headers={"Location": f"{DEPLOYMENTS}/{deployment_id}"})


@router.get(DEPLOYMENTS, tags=["deployments"], dependencies=READS)
def list_deployments(ctx: Ctx, status: Annotated[str | None, Query(
        pattern="^(pending|inprogress|paused|finished|aborted)$")] = None,
        page: Page = 1, per_page: PerPage = DEFAULT_PER_PAGE) -> list[dict[str, Any]]:
    q = where_given(sa.select(dep).order_by(dep.c.created.desc()).limit(per_page).offset((page - 1) * per_page),
                    dep.c.status, status)
    with ctx.db.read() as c:
        return [_deployment_doc(r) for r in c.execute(q)]


def _get_deployment(c: sa.Connection, deployment_id: str) -> Any:
    return found_or_404(c.execute(sa.select(dep).where(dep.c.id == deployment_id)).first(), "deployment")


@router.get(DEPLOYMENTS + "/{deployment_id}", tags=["deployments"], dependencies=READS)
def get_deployment(deployment_id: str, ctx: Ctx) -> dict[str, Any]:
    with ctx.db.read() as c:
        return _deployment_doc(_get_deployment(c, deployment_id))


@router.get(DEPLOYMENTS + "/{deployment_id}/statistics", tags=["deployments"], dependencies=READS)
def deployment_statistics(deployment_id: str, ctx: Ctx) -> dict[str, int]:
    with ctx.db.read() as c:
        _get_deployment(c, deployment_id)
        return rollout.statistics(c, deployment_id)


@router.get(DEPLOYMENTS + "/{deployment_id}/devices", tags=["deployments"], dependencies=READS)
def deployment_devices(deployment_id: str, ctx: Ctx, status: str | None = None,
                       page: Page = 1, per_page: PerPage = DEFAULT_PER_PAGE) -> list[dict[str, Any]]:
    q = (sa.select(dd).where(dd.c.deployment_id == deployment_id).order_by(dd.c.phase, dd.c.device_id)
         .limit(per_page).offset((page - 1) * per_page))
    q = where_given(q, dd.c.status, status)
    with ctx.db.read() as c:
        _get_deployment(c, deployment_id)
        return [{"id": r.device_id, "status": r.status, "substate": r.substate, "created": rfc3339(r.created),
                 "started": rfc3339(r.started), "finished": rfc3339(r.finished), "log": bool(r.has_log),
                 "phase": r.phase + 1, "attempts": r.attempts,
                 # extensions: what the device ran when it got the deployment, and its own target (rollbacks)
                 "from_artifact": r.from_artifact, "target_artifact": r.target_artifact} for r in c.execute(q)]


@router.get(DEPLOYMENTS + "/{deployment_id}/devices/{device_id}/log", tags=["deployments"], response_class=Response,
            dependencies=READS,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def get_device_log(deployment_id: str, device_id: str, ctx: Ctx) -> Response:
    """The device's deployment log, one ``<timestamp> <level>: <message>`` line per message."""
    return device_log(ctx, deployment_id, device_id)


class DeploymentStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: str = Field(pattern="^(aborted|inprogress|closed)$")
    failure_threshold: float | None = Field(None, ge=0, le=100)
    failure_limit: FailureLimit | None = None


@router.put(DEPLOYMENTS + "/{deployment_id}/status", status_code=204, tags=["deployments"])
def put_deployment_status(deployment_id: str, body: DeploymentStatus, ctx: Ctx, who: Operator) -> Response:
    """``aborted``: unfinished devices become ``aborted`` (they get 409 on their next report).
    ``inprogress`` (our extension): resume a paused deployment, optionally with a new ``failure_threshold``
    or ``failure_limit`` (otherwise the next failure pauses it again while the failure ratio stays above).
    ``closed`` (our extension): a dynamic deployment takes no more joiners; it finishes when its devices
    have (409 for a deployment that is not dynamic, already closed, or ended)."""
    with ctx.db.write() as c:
        r = _get_deployment(c, deployment_id)
        if body.status == "aborted":
            if r.status not in rollout.OPEN or not rollout.abort(c, deployment_id):
                raise conflict(f"the deployment is already {_get_deployment(c, deployment_id).status}")
        elif body.status == "closed":
            if not rollout.close(c, deployment_id):
                raise conflict("only an open dynamic deployment can be closed; this one is " + (
                    "not dynamic" if not r.dynamic else "closed already" if r.closed is not None
                    else _get_deployment(c, deployment_id).status))
            who.record(c, f"deployment {r.name!r} ({deployment_id}) closed: no more devices join it")
            return Response(status_code=204)
        else:
            values: dict[str, Any] = {}
            if "failure_threshold" in body.model_fields_set:
                values["failure_threshold"] = body.failure_threshold
            if "failure_limit" in body.model_fields_set:
                values["failure_limit"] = body.failure_limit.model_dump() if body.failure_limit else None
            if not rollout.resume(c, deployment_id, values):
                raise conflict("only a paused deployment can be resumed; this one is "
                               f"{_get_deployment(c, deployment_id).status}")
        who.record(c, f"deployment {r.name!r} ({deployment_id}) " + (
            "aborted" if body.status == "aborted" else f"resumed (failure threshold {values.get('failure_threshold', r.failure_threshold)})"))
    return Response(status_code=204)
