"""Management API: the SBOM and provenance of each artifact, the packages of a release and the package diff
between two releases (issue 17). Reads need scope ``read``, uploads ``operate``; every upload is audited.

An operator (``build.py publish``) uploads, next to each artifact, the release's ``sbom.cdx.json`` and
``provenance.intoto.json``. The server takes them only when it can tie them to the artifact, which it verified
when it was uploaded:

- the SBOM's sha256 must be the ``vv.sbom_sha256`` of the artifact's signed meta-data (a delta artifact names
  its target's), and the document must be a readable CycloneDX SBOM (:mod:`.sbom`);
- the provenance must be a DSSE envelope whose signature verifies with one of the server's release keys
  (``--release-key``; a server without keys stores it marked unverified, as it stores unsigned artifacts), and
  one of its subjects must be the artifact's sha256.

A release is the artifacts of one name (a full artifact per device type and the deltas to it). Its packages are
those of its artifacts' SBOMs; the boards of a release share one root filesystem, so they normally agree, and
``device_type`` picks one when they do not.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from artifacts.format import SBOM_SHA256_KEY
from artifacts.provenance import read_unverified_provenance, subjects_of, verify_provenance
from ota_common.errors import ArtifactError, UnsignedArtifact

from .apitokens import READ, Operator
from .context import ServerContext, get_ctx
from .errors import APIError, bad_request, conflict, found_or_404
from .management import READS
from .models import artifact_provenance as prov_t
from .models import artifact_sboms as sbom_t
from .models import artifacts as art_t
from .releases import ARTIFACTS
from .sbom import MAX_SBOM, Package, PackageDiff, diff_packages, packages_from_rows, packages_to_rows, read_sbom
from .timeutil import now, rfc3339

router = APIRouter(dependencies=[Depends(READ)])
Ctx = Annotated[ServerContext, Depends(get_ctx)]
#: Mender's path of releases (the artifacts of one name); ``/{name}/packages`` and ``/{name}/diff`` are ours
RELEASES = "/api/management/v1/deployments/deployments/releases"
SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
DSSE_MEDIA_TYPE = "application/vnd.dsse.envelope.v1+json"
#: as large as :data:`artifacts.provenance.MAX_ENVELOPE_SIZE`
MAX_PROVENANCE = 16 << 20
DeviceType = Annotated[str | None, Query(min_length=1, max_length=256)]
log = logging.getLogger("ota_server")


def sbom_sha256_of(info: dict[str, Any]) -> str | None:
    """The SBOM hash an artifact's signed meta-data names (as stored at upload), None when it names none."""
    updates = info.get("updates") or [{}]
    meta = updates[0].get("meta_data") if isinstance(updates[0], dict) else None
    value = meta.get(SBOM_SHA256_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


async def _body(request: Request, limit: int, what: str) -> bytes:
    data = await request.body()
    if len(data) > limit:
        raise APIError(413, f"{what} larger than {limit} bytes")
    if not data:
        raise bad_request(f"the body must be the {what}")
    return data


def _artifact(c: sa.Connection, artifact_id: str) -> Any:
    return found_or_404(c.execute(sa.select(art_t.c.id, art_t.c.name, art_t.c.sha256, art_t.c.info)
                                  .where(art_t.c.id == artifact_id)).first(), "artifact")


# ---------------------------------------------------------------------------------------------------------
# SBOM


def _store_sbom(ctx: ServerContext, who: Operator, artifact_id: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    with ctx.db.read() as c:
        art = _artifact(c, artifact_id)
    named = sbom_sha256_of(art.info)
    if named is None:
        raise conflict(f"artifact {art.name} ({artifact_id}) names no SBOM in its signed header (no {SBOM_SHA256_KEY}"
                       "): no SBOM can be proved to belong to it")
    if digest != named:
        raise bad_request(f"this SBOM is not the one of artifact {art.name}: its sha256 is {digest[:16]}…, the "
                          f"artifact's signed header names {named[:16]}…")
    try:
        packages = read_sbom(data)
    except ArtifactError as e:
        raise bad_request(f"SBOM rejected: {e}") from None
    with ctx.db.write() as c:
        _artifact(c, artifact_id)  # not deleted meanwhile
        c.execute(sa.delete(sbom_t).where(sbom_t.c.artifact_id == artifact_id))
        c.execute(sbom_t.insert().values(artifact_id=artifact_id, sha256=digest, size=len(data),
                                         document=data.decode("utf-8"), packages=packages_to_rows(packages),
                                         created=now()))
        who.record(c, f"uploaded the SBOM of artifact {art.name} ({artifact_id}): {len(packages)} packages, "
                      f"sha256 {digest[:16]}…")


@router.put(ARTIFACTS + "/{artifact_id}/sbom", status_code=204, tags=["artifacts"], response_class=Response,
            openapi_extra={"requestBody": {"required": True, "content": {
                SBOM_MEDIA_TYPE: {"schema": {"type": "object"}}, "application/json": {"schema": {"type": "object"}}}}})
async def put_sbom(artifact_id: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    """Store the CycloneDX JSON SBOM of an artifact (the body, byte for byte as the release wrote it). 400 unless
    its sha256 is the ``vv.sbom_sha256`` the artifact's signed meta-data names and it is a readable CycloneDX
    document (every component with a purl has a name and a version); 409 when the artifact names no SBOM; 413
    past 16 MiB. Uploading it again replaces it (it can only be the same document)."""
    data = await _body(request, MAX_SBOM, "SBOM")
    await run_in_threadpool(_store_sbom, ctx, who, artifact_id, data)
    return Response(status_code=204)


@router.get(ARTIFACTS + "/{artifact_id}/sbom", tags=["artifacts"], response_class=Response, dependencies=READS,
            responses={200: {"content": {SBOM_MEDIA_TYPE: {"schema": {"type": "object"}}}}})
def get_sbom(artifact_id: str, ctx: Ctx) -> Response:
    """The artifact's SBOM as uploaded (its sha256 is the artifact's signed ``vv.sbom_sha256``); 404 if none."""
    with ctx.db.read() as c:
        _artifact(c, artifact_id)
        doc = found_or_404(c.execute(sa.select(sbom_t.c.document).where(sbom_t.c.artifact_id == artifact_id))
                           .scalar(), "SBOM of this artifact")
    return Response(doc.encode("utf-8"), media_type=SBOM_MEDIA_TYPE)


@router.get(ARTIFACTS + "/{artifact_id}/packages", tags=["artifacts"], dependencies=READS)
def get_artifact_packages(artifact_id: str, ctx: Ctx) -> dict[str, Any]:
    """The packages (name, version, purl) of the artifact's SBOM; 404 when none was uploaded."""
    with ctx.db.read() as c:
        art = _artifact(c, artifact_id)
        row = found_or_404(c.execute(sa.select(sbom_t.c.sha256, sbom_t.c.packages)
                                     .where(sbom_t.c.artifact_id == artifact_id)).first(), "SBOM of this artifact")
    return {"artifact_id": artifact_id, "artifact_name": art.name, "sbom_sha256": row.sha256,
            "packages": [p.doc() for p in packages_from_rows(row.packages)]}


# ---------------------------------------------------------------------------------------------------------
# Provenance


def _verified_statement(ctx: ServerContext, data: bytes) -> tuple[dict[str, Any], str | None]:
    """The statement and the key that verified it (None: stored unverified). Raises APIError 400."""
    try:
        if ctx.verifiers:
            try:
                doc, verifier = verify_provenance(data, ctx.verifiers)
                return doc, verifier.description[:255]
            except UnsignedArtifact:
                if not ctx.settings.allow_unsigned:
                    raise
        doc, _ = read_unverified_provenance(data)
        return doc, None
    except ArtifactError as e:
        raise bad_request(f"provenance rejected: {e}") from None


def _store_provenance(ctx: ServerContext, who: Operator, artifact_id: str, data: bytes) -> None:
    with ctx.db.read() as c:
        art = _artifact(c, artifact_id)
    doc, signed_by = _verified_statement(ctx, data)
    subjects = [n for n, d in subjects_of(doc).items() if d == art.sha256]
    if not subjects:
        raise bad_request(f"the provenance is not about artifact {art.name}: none of its subjects has the "
                          f"artifact's sha256 {art.sha256[:16]}…")
    with ctx.db.write() as c:
        _artifact(c, artifact_id)
        c.execute(sa.delete(prov_t).where(prov_t.c.artifact_id == artifact_id))
        c.execute(prov_t.insert().values(artifact_id=artifact_id, sha256=hashlib.sha256(data).hexdigest(),
                                         size=len(data), envelope=data.decode("utf-8"), signed_by=signed_by,
                                         subject=subjects[0][:512], created=now()))
        who.record(c, f"uploaded the provenance of artifact {art.name} ({artifact_id}) (subject {subjects[0][:80]}), "
                      + (f"signed by {signed_by}" if signed_by else "unverified: the server has no release key"))


@router.put(ARTIFACTS + "/{artifact_id}/provenance", status_code=204, tags=["artifacts"], response_class=Response,
            openapi_extra={"requestBody": {"required": True, "content": {
                DSSE_MEDIA_TYPE: {"schema": {"type": "object"}}, "application/json": {"schema": {"type": "object"}}}}})
async def put_provenance(artifact_id: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    """Store the release's provenance (``provenance.intoto.json``: an in-toto statement with an SLSA provenance
    predicate in a DSSE envelope) with an artifact. 400 unless the envelope's signature verifies with one of the
    server's release keys (a server without keys stores it unverified; an unsigned envelope only with
    ``--allow-unsigned``) and one of its subjects has the artifact's sha256; 413 past 16 MiB."""
    data = await _body(request, MAX_PROVENANCE, "provenance")
    await run_in_threadpool(_store_provenance, ctx, who, artifact_id, data)
    return Response(status_code=204)


@router.get(ARTIFACTS + "/{artifact_id}/provenance", tags=["artifacts"], response_class=Response, dependencies=READS,
            responses={200: {"content": {DSSE_MEDIA_TYPE: {"schema": {"type": "object"}}}}})
def get_provenance(artifact_id: str, ctx: Ctx) -> Response:
    """The artifact's provenance envelope as uploaded; the header ``X-Provenance-Signed-By`` names the release key
    that verified it (absent: stored unverified). 404 if none."""
    with ctx.db.read() as c:
        _artifact(c, artifact_id)
        row = found_or_404(c.execute(sa.select(prov_t.c.envelope, prov_t.c.signed_by)
                                     .where(prov_t.c.artifact_id == artifact_id)).first(), "provenance of this artifact")
    headers = {"X-Provenance-Signed-By": row.signed_by} if row.signed_by else {}
    return Response(row.envelope.encode("utf-8"), media_type=DSSE_MEDIA_TYPE, headers=headers)


# ---------------------------------------------------------------------------------------------------------
# Releases: packages and diffs


@dataclass(frozen=True)
class ReleasePackages:
    name: str
    device_types: list[str]  # of the artifacts whose SBOM was read
    sbom_sha256: list[str]
    packages: list[Package]
    uploaded: float  # when the first of those SBOMs was

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, "device_types": self.device_types, "sbom_sha256": self.sbom_sha256,
                "uploaded": rfc3339(self.uploaded), "packages": [p.doc() for p in self.packages]}


def release_packages(c: sa.Connection, name: str, device_type: str | None = None) -> ReleasePackages:
    """The packages of release ``name`` (for ``device_type``, when given). Raises APIError: 404 for an unknown
    release (or one without an artifact for ``device_type``) and for one without an uploaded SBOM, 409 when its
    artifacts' SBOMs list different packages and no device type says which."""
    rows = c.execute(sa.select(art_t.c.id, art_t.c.device_types, sbom_t.c.sha256, sbom_t.c.packages, sbom_t.c.created)
                     .select_from(art_t.outerjoin(sbom_t, sbom_t.c.artifact_id == art_t.c.id))
                     .where(art_t.c.name == name).order_by(art_t.c.created)).all()
    if device_type is not None:
        rows = [r for r in rows if device_type in (r.device_types or [])]
    if not rows:
        raise APIError(404, f"no release named {name!r}" + (f" for device type {device_type}" if device_type else ""))
    with_sbom = [r for r in rows if r.sha256 is not None]
    if not with_sbom:
        raise APIError(404, f"release {name} has no SBOM: upload it with its artifacts (build.py publish does)")
    lists = {tuple(map(tuple, r.packages)) for r in with_sbom}
    if len(lists) > 1:
        types = sorted({t for r in with_sbom for t in r.device_types or []})
        raise conflict(f"the artifacts of release {name} list different packages: give device_type (one of "
                       f"{', '.join(types)})")
    return ReleasePackages(name, sorted({t for r in with_sbom for t in r.device_types or []}),
                           sorted({r.sha256 for r in with_sbom}), packages_from_rows(with_sbom[0].packages),
                           min(r.created for r in with_sbom))


def release_diff(c: sa.Connection, base: str, name: str, device_type: str | None = None
                 ) -> tuple[ReleasePackages, ReleasePackages, PackageDiff]:
    """What deploying release ``name`` changes on devices running release ``base``. Raises what
    :func:`release_packages` raises, for either release."""
    old = release_packages(c, base, device_type)
    new = release_packages(c, name, device_type)
    return old, new, diff_packages(old.packages, new.packages)


@router.get(RELEASES + "/{name}/packages", tags=["releases"], dependencies=READS)
def get_release_packages(name: str, ctx: Ctx, device_type: DeviceType = None) -> dict[str, Any]:
    """The packages (name, version, purl) of a release, from its artifacts' SBOMs. 404 for an unknown release or
    one without an SBOM; 409 when its artifacts list different packages (give ``device_type``)."""
    with ctx.db.read() as c:
        return release_packages(c, name, device_type).doc()


@router.get(RELEASES + "/{name}/diff", tags=["releases"], dependencies=READS)
def get_release_diff(name: str, ctx: Ctx, base: Annotated[str, Query(alias="from", min_length=1, max_length=256)],
                     device_type: DeviceType = None) -> dict[str, Any]:
    """What deploying release ``name`` changes on a device that runs release ``from``: the packages ``added``,
    ``removed``, ``upgraded`` and ``downgraded`` (Debian version order; each with ``from_version`` and
    ``to_version``) and the count ``unchanged``. 404 when either release is unknown or has no SBOM."""
    with ctx.db.read() as c:
        old, new, diff = release_diff(c, base, name, device_type)
    return {"from": old.name, "to": new.name, "from_sbom_sha256": old.sbom_sha256, "to_sbom_sha256": new.sbom_sha256,
            **diff.doc()}


__all__ = ["RELEASES", "ReleasePackages", "release_diff", "release_packages", "router", "sbom_sha256_of"]
