"""Instant fleet rollback: a deployment that sends every device an earlier deployment updated back to what it
ran before, usually without a download.

``next`` records what a device ran when a deployment was handed to it (``deployment_devices.from_artifact``).
``POST .../deployments/{id}/rollback`` makes a deployment of kind ``rollback`` of the devices of that deployment
that reported ``success``, each with its own ``target_artifact`` (its ``from_artifact``), ``allow_downgrade``
implied, phases and thresholds as any deployment. A device whose earlier artifact is unknown (handed out before
the server recorded it) or no longer uploaded for its device type is listed as skipped.

For such a device ``next`` answers as Mender's does (the artifact's name and a download link of the full
artifact or the best delta), plus ``vv_rollback: {"header_uri": ...}``, a signed link to the artifact's signed
header part (:func:`.downloads.rollback_hint`). Our agent, when its inactive slot still holds that artifact,
verifies the header as an install would, checks the slot against the checksum it signs, and arms the slot
without downloading anything (device_hooks/slot_rollback.py); a Mender client ignores the field and downloads.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import deployments as rollout
from .apitokens import READ, Operator
from .context import ServerContext, get_ctx
from .downloads import ROLLBACK
from .errors import bad_request, found_or_404
from .models import artifact_targets as targets_t
from .models import artifacts as art_t
from .models import deployment_devices as dd
from .models import deployments as dep
from .models import devices
from .releases import DEPLOYMENTS, FailureLimit, PhaseIn, check_phases, phase_specs
from .timeutil import now

router = APIRouter(dependencies=[Depends(READ)])
Ctx = Annotated[ServerContext, Depends(get_ctx)]
ROLLBACK_PATH = DEPLOYMENTS + "/{deployment_id}/rollback"
NAME_MAX = 256


class RollbackRequest(BaseModel):
    """Everything optional: the name (default ``rollback of <name>``), and phases and thresholds as for any
    deployment."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=NAME_MAX)
    phases: list[PhaseIn] | None = Field(None, min_length=1, max_length=100)
    failure_threshold: float | None = Field(None, ge=0, le=100, description="percent of finished devices")
    failure_limit: FailureLimit | None = None
    retries: int = Field(0, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> RollbackRequest:
        check_phases(self.phases)
        return self


def plan(c: sa.Connection, deployment_id: str, *, lock: bool = True) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The devices of the deployment that reported ``success``: ``({device id: artifact to go back to}, [{"id",
    "reason"} of each device skipped])``, in device id order. ``lock=False``: a preview (the dashboard's), in a
    read transaction."""
    went = sa.func.coalesce(dd.c.target_artifact, dep.c.artifact_name)
    rows = c.execute(
        sa.select(dd.c.device_id, dd.c.from_artifact, went.label("went"), devices.c.status, devices.c.device_type)
        .select_from(dd.join(dep, dep.c.id == dd.c.deployment_id).outerjoin(devices, devices.c.id == dd.c.device_id))
        .where(dd.c.deployment_id == deployment_id, dd.c.status == "success").order_by(dd.c.device_id)).all()
    names = {r.from_artifact for r in rows if r.from_artifact}
    uploaded: dict[str, set[str]] = {}  # artifact name -> device types with a full artifact of it
    if names and lock:
        # FOR SHARE: an artifact deleted at the same moment is either gone here or sees this deployment
        c.execute(sa.select(art_t.c.id).where(art_t.c.name.in_(sorted(names))).with_for_update(read=True))
    if names:
        for name, device_type in c.execute(sa.select(targets_t.c.name, targets_t.c.device_type).where(
                targets_t.c.name.in_(sorted(names)), targets_t.c.source == "")):
            uploaded.setdefault(name, set()).add(device_type)
    targets: dict[str, str] = {}
    skipped: list[dict[str, str]] = []
    for r in rows:
        reason = None
        if r.status != "accepted":
            reason = "the device is no longer accepted"
        elif not r.from_artifact:
            reason = "what it ran before is unknown (handed out before the server recorded it)"
        elif r.from_artifact == r.went:
            reason = f"it already ran {r.from_artifact} before this deployment"
        elif r.device_type not in uploaded.get(r.from_artifact, set()):
            reason = f"artifact {r.from_artifact} is no longer on the server for device type {r.device_type}"
        if reason is None:
            targets[r.device_id] = r.from_artifact
        else:
            skipped.append({"id": r.device_id, "reason": reason})
    return targets, skipped


def _display_name(targets: dict[str, str]) -> str:
    """``deployments.artifact_name`` of a rollback (shown in lists; each device gets its own target)."""
    names = sorted(set(targets.values()))
    joined = ", ".join(names)
    return joined if len(joined) <= NAME_MAX else f"{len(names)} artifacts"


@router.post(ROLLBACK_PATH, status_code=201, tags=["deployments"],
             responses={201: {"description": "the rollback deployment: its id, devices, targets, skipped devices"},
                        400: {"description": "no device of the deployment can be rolled back"},
                        404: {"description": "no such deployment"}})
def create_rollback(deployment_id: str, ctx: Ctx, who: Operator,
                    body: Annotated[RollbackRequest | None, Body()] = None) -> JSONResponse:
    """Roll a deployment back (our extension): a new deployment (``kind: rollback``) of its devices that
    reported ``success``, each sent back to the artifact it ran when it got the deployment (``from_artifact``),
    downgrades allowed. Our agent re-arms its inactive slot when that slot still holds the artifact (no
    download); other clients download it. The answer lists the devices ``skipped``, with the reason (what
    they ran before is unknown, or that artifact is no longer uploaded for their device type)."""
    req = body or RollbackRequest()
    t = now()
    new_id = str(uuid.uuid4())
    with ctx.db.write() as c:
        old = found_or_404(c.execute(sa.select(dep.c.name).where(dep.c.id == deployment_id)).first(), "deployment")
        targets, skipped = plan(c, deployment_id)
        if not targets:
            why = f": {skipped[0]['reason']}" if skipped else ""
            raise bad_request(f"no device of deployment {deployment_id} can be rolled back ({len(skipped)} device(s) "
                              f"with status success{why})")
        ids = list(targets)
        planned, assignment = rollout.plan_phases(ids, phase_specs(req.phases), t)
        starts = [p["start_ts"] for p in planned if p["start_ts"] is not None]
        if starts != sorted(starts):
            raise bad_request("phases must start in order")
        name = req.name or f"rollback of {old.name}"[:NAME_MAX]
        c.execute(dep.insert().values(
            id=new_id, name=name, artifact_name=_display_name(targets), status="pending", created=t,
            device_count=len(ids), phases=planned, failure_threshold=req.failure_threshold, allow_downgrade=True,
            retries=req.retries, target={"devices": ids}, dynamic=False, join_group=None, kind=ROLLBACK,
            rollback_of=deployment_id,
            failure_limit=req.failure_limit.model_dump() if req.failure_limit is not None else None))
        c.execute(dd.insert(), [
            {"deployment_id": new_id, "device_id": d, "status": "pending", "active": True, "phase": ph,
             "not_before": nb, "attempts": 0, "created": t, "has_log": False, "target_artifact": targets[d]}
            for d, ph, nb in assignment])
        counts = Counter(targets.values())
        who.record(c, f"created rollback deployment {name!r} ({new_id}) of deployment {deployment_id} to "
                      f"{len(ids)} device(s) ({', '.join(f'{n}: {k}' for k, n in sorted(counts.items()))}), "
                      f"{len(planned)} phase(s); {len(skipped)} skipped")
    answer: dict[str, Any] = {"id": new_id, "rollback_of": deployment_id, "device_count": len(ids),
                              "targets": dict(sorted(counts.items())), "skipped": skipped}
    return JSONResponse(answer, status_code=201, headers={"Location": f"{DEPLOYMENTS}/{new_id}"})
