"""``build.py publish``: upload artifacts to the update server's management API, authenticated with
``$OTA_ADMIN_TOKEN`` (the client, which streams each file, is :class:`devkit.client.ManagementClient`).

With each artifact go the documents of its release found next to it (issue 17): the ``sbom.cdx.json`` whose
sha256 the artifact's header names (in the release directory or a board directory below it) and the release's
``provenance.intoto.json`` when it names the artifact and is signed. The server verifies both again."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from devkit.client import TOKEN_ENV, ManagementClient, check_url
from ota_common.errors import UserError

#: seconds a publish waits on one socket operation
TIMEOUT = 600.0
#: a release's documents (image/sbom.py, image/provenance.py name them the same)
SBOM_FILE = "sbom.cdx.json"
PROVENANCE_FILE = "provenance.intoto.json"


def admin_token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(f"publishing needs the server's admin token in ${TOKEN_ENV}")
    return token


def publisher(url: str) -> ManagementClient:
    """The client of ``publish`` and ``release --publish``: the URL checked, the token from ``$OTA_ADMIN_TOKEN``.
    Raises :class:`UserError` for a bad URL or a missing token."""
    check_url(url)
    return ManagementClient(url, admin_token(), timeout=TIMEOUT)


def release_documents(artifact: Path, note: Callable[[str], None] = lambda msg: None) -> list[tuple[str, Path]]:
    """The release documents to upload with ``artifact`` (``[(kind, file)]``, see
    :meth:`devkit.client.ManagementClient.put_document`): the SBOM its header names, found by its sha256 in the
    artifact's directory or a directory below it, and the signed provenance of that directory that has the
    artifact among its subjects. What is missing is told to ``note`` (an artifact outside a release directory
    has neither). Raises ArtifactError for an artifact whose header cannot be read."""
    from artifacts.provenance import read_unverified_provenance, subjects_of
    from artifacts.reader import ArtifactReader
    from ota_common.errors import ArtifactError
    from ota_common.files import sha256_file

    found: list[tuple[str, Path]] = []
    with ArtifactReader.open(artifact) as r:
        named = r.read_header().sbom_sha256()
    here = artifact.parent
    if named is not None:
        candidates = [here / SBOM_FILE, *sorted(here.glob(f"*/{SBOM_FILE}"))]
        match = next((p for p in candidates if p.is_file() and sha256_file(p) == named), None)
        if match is None:
            note(f"{artifact.name}: its SBOM (sha256 {named[:16]}…) is not next to it: not uploaded")
        else:
            found.append(("sbom", match))
    envelope = here / PROVENANCE_FILE
    if envelope.is_file():
        try:
            statement, signatures = read_unverified_provenance(envelope.read_bytes())
        except ArtifactError as e:
            note(f"{envelope}: {e}: not uploaded")
            return found
        if not signatures:
            note(f"{envelope.name} is not signed (an unsigned release): not uploaded")
        elif sha256_file(artifact) in subjects_of(statement).values():
            found.append(("provenance", envelope))
    return found


def publish_release(client: ManagementClient, artifacts: Sequence[Path], progress: Callable[[str], None] | None = None,
                    note: Callable[[str], None] | None = None) -> list[str]:
    """Upload the artifacts, each with its release documents (:func:`release_documents`; what is missing is told
    to ``note``, by default to ``progress``)."""
    tell = note or progress or (lambda msg: None)
    documents = {a: release_documents(a, tell) for a in artifacts}
    return client.publish(artifacts, progress=progress, documents=documents)


def collect(paths: Sequence[Path]) -> list[Path]:
    """Artifact files named directly, plus every ``*.mender`` in named directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.mender"))
            if not found:
                raise UserError(f"no .mender artifacts in {p}")
            out += found
        else:
            out.append(p)
    return out


@click.command("publish")
@click.argument("url")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def publish_command(url: str, paths: Sequence[Path]) -> None:
    """Upload artifacts (files, or the *.mender in a release directory) to the update server at URL, each with
    its release's SBOM and provenance when they are next to it. The admin token comes from $OTA_ADMIN_TOKEN."""
    client = publisher(url)
    for loc in publish_release(client, collect(paths), note=lambda msg: click.echo(f"note: {msg}", err=True)):
        click.echo(loc)
