"""Dashboard pages of releases (issue 17): the list of releases, a release's artifacts and packages (from the SBOMs
uploaded with it), the package diff between two releases, and what a deployment would change on the devices it
targets. Read-only pages (any token); no JavaScript: the "compare with" and "preview" choices are GET forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response

from . import dashboard_queries as q
from .context import ServerContext, get_ctx
from .dashboard import SECURITY_HEADERS, Viewer, render, require_session
from .deployments import source_checksum
from .errors import APIError
from .models import artifact_provenance as prov_t
from .models import artifact_sboms as sbom_t
from .models import artifacts as art_t
from .models import devices
from .release_sbom import release_diff, release_packages, sbom_sha256_of
from .sbom import PackageDiff

Ctx = Annotated[ServerContext, Depends(get_ctx)]
Name = Annotated[str | None, Query(max_length=256)]
#: the newest releases the list shows
MAX_RELEASES = 500
#: the most running releases a deployment preview compares (the rest are counted)
MAX_PREVIEW = 10

pages = APIRouter(dependencies=[Depends(require_session)], include_in_schema=False)


@dataclass
class Release:
    name: str
    created: float
    device_types: set[str] = field(default_factory=set)
    artifacts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sboms(self) -> int:
        return sum(1 for a in self.artifacts if a["sbom"])

    @property
    def provenance(self) -> int:
        return sum(1 for a in self.artifacts if a["provenance"])


def releases(c: sa.Connection, name: str | None = None) -> list[Release]:
    """The releases (artifacts grouped by name, newest first), each artifact with whether its SBOM and provenance
    were uploaded (and who signed the provenance)."""
    query = (sa.select(art_t.c.id, art_t.c.name, art_t.c.device_types, art_t.c.size, art_t.c.signed_by, art_t.c.info,
                       art_t.c.created, sbom_t.c.sha256.label("sbom"), prov_t.c.artifact_id.label("provenance"),
                       prov_t.c.signed_by.label("provenance_by"))
             .select_from(art_t.outerjoin(sbom_t, sbom_t.c.artifact_id == art_t.c.id)
                          .outerjoin(prov_t, prov_t.c.artifact_id == art_t.c.id))
             .order_by(art_t.c.created.desc()))
    if name is not None:
        query = query.where(art_t.c.name == name)
    by_name: dict[str, Release] = {}
    for r in c.execute(query):
        rel = by_name.get(r.name)
        if rel is None:
            if len(by_name) >= MAX_RELEASES:
                continue
            rel = by_name[r.name] = Release(r.name, r.created)
        rel.device_types.update(r.device_types or [])
        source = source_checksum(r.info)
        rel.artifacts.append({"id": r.id, "device_types": r.device_types or [], "size": r.size, "signed_by": r.signed_by,
                              "created": r.created, "kind": "delta" if source else "full", "source": source,
                              "names_sbom": sbom_sha256_of(r.info), "sbom": r.sbom,
                              "provenance": r.provenance is not None, "provenance_by": r.provenance_by})
    return list(by_name.values())


def _diff_or_error(c: sa.Connection, base: str, name: str, device_type: str | None
                   ) -> tuple[PackageDiff | None, str | None]:
    try:
        return release_diff(c, base, name, device_type)[2], None
    except APIError as e:
        return None, e.message


@pages.get("/ui/releases")
def release_list(request: Request, ctx: Ctx, who: Viewer) -> Response:
    with ctx.db.read() as c:
        rels = releases(c)
    # "diff from the release before": the next older release that shares a device type
    previous = {r.name: next((o.name for o in rels[i + 1:] if o.device_types & r.device_types), None)
                for i, r in enumerate(rels)}
    return render("releases.html", request=request, viewer=who, releases=rels, previous=previous,
                  limit=MAX_RELEASES)


@pages.get("/ui/compare")
def compare(base: Annotated[str, Query(alias="from", min_length=1, max_length=256)],
            name: Annotated[str, Query(alias="to", min_length=1, max_length=256)]) -> Response:
    """The "compare two releases" form of the list: to the diff page."""
    resp = RedirectResponse(f"/ui/releases/{quote(name, safe='')}/diff?{urlencode({'from': base})}", status_code=303)
    resp.headers.update(SECURITY_HEADERS)
    return resp


@pages.get("/ui/releases/{name}")
def release_page(request: Request, name: str, ctx: Ctx, who: Viewer, device_type: Name = None) -> Response:
    with ctx.db.read() as c:
        found = releases(c, name)
        if not found:
            return render("not_found.html", status=404, request=request, viewer=who, what="release", ident=name)
        others = [r.name for r in releases(c) if r.name != name]
        try:
            packages, error = release_packages(c, name, device_type), None
        except APIError as e:
            packages, error = None, e.message
    return render("release.html", request=request, viewer=who, release=found[0], packages=packages, error=error,
                  others=others, device_type=device_type)


@pages.get("/ui/releases/{name}/diff")
def release_diff_page(request: Request, name: str, ctx: Ctx, who: Viewer,
                      base: Annotated[str, Query(alias="from", min_length=1, max_length=256)],
                      device_type: Name = None) -> Response:
    """What deploying release ``name`` changes on devices that run release ``from``."""
    with ctx.db.read() as c:
        for n in (name, base):
            if not c.execute(sa.select(art_t.c.id).where(art_t.c.name == n).limit(1)).first():
                return render("not_found.html", status=404, request=request, viewer=who, what="release", ident=n)
        others = [r.name for r in releases(c) if r.name != name]
        diff, error = _diff_or_error(c, base, name, device_type)
    return render("release_diff.html", request=request, viewer=who, name=name, base=base, diff=diff, error=error,
                  others=others, device_type=device_type)


def running_releases(c: sa.Connection, group: str | None) -> list[tuple[str | None, int]]:
    """The releases the accepted devices (of ``group``) run, with how many devices run each, most first."""
    query = (sa.select(q.running_artifact.label("artifact"), sa.func.count().label("n"))
             .where(devices.c.status == "accepted").group_by(q.running_artifact)
             .order_by(sa.desc("n"), q.running_artifact))
    if group is not None:
        query = query.where(devices.c.group_name == group)
    return [(r.artifact, int(r.n)) for r in c.execute(query)]


@pages.get("/ui/deploy/preview")
def deploy_preview(request: Request, ctx: Ctx, who: Viewer, artifact_name: Name = None,
                   group: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """What deploying ``artifact_name`` to the accepted devices (of ``group``) changes: for each release they run,
    how many run it and the package diff to the new release."""
    with ctx.db.read() as c:
        choices, groups = q.artifact_choices(c), q.group_choices(c)
        rows: list[dict[str, Any]] = []
        more = 0
        if artifact_name:
            running = running_releases(c, group or None)
            for i, (running_name, n) in enumerate(running):
                if i >= MAX_PREVIEW:
                    more += n
                    continue
                row: dict[str, Any] = {"name": running_name, "devices": n, "diff": None, "error": None,
                                       "same": running_name == artifact_name}
                if running_name is None:
                    row["error"] = "the devices report no release"
                elif not row["same"]:
                    row["diff"], row["error"] = _diff_or_error(c, running_name, artifact_name, None)
                rows.append(row)
    return render("deploy_preview.html", request=request, viewer=who, artifacts=choices, groups=groups,
                  artifact_name=artifact_name or "", group=group or "", rows=rows, more=more)


router = APIRouter()
router.include_router(pages)

__all__ = ["release_list", "releases", "router", "running_releases"]
