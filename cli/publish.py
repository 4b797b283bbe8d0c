"""``build.py publish``: upload artifacts to the update server's management API, authenticated with
``$OTA_ADMIN_TOKEN`` (the client, which streams each file, is :class:`devkit.client.ManagementClient`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from devkit.client import TOKEN_ENV, ManagementClient, check_url
from ota_common.errors import UserError

#: seconds a publish waits on one socket operation
TIMEOUT = 600.0


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
    """Upload artifacts (files, or the *.mender in a release directory) to the update server at URL.
    The admin token comes from $OTA_ADMIN_TOKEN."""
    client = publisher(url)
    for loc in client.publish(collect(paths)):
        click.echo(loc)
