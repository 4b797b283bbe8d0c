"""``build.py release`` (what users run) and the stages it is made of, for debugging."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from artifacts.keys import load_signer
from cli.common import progress_line
from ota_common.errors import UserError

console = Console(stderr=True)


def _options(f):  # type: ignore[no-untyped-def]
    for opt in reversed(_OPTIONS):
        f = opt(f)
    return f


_OPTIONS = [
    click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Release configuration (default: the repository's release.yaml)."),
    click.option("--version", help="Override the version in the configuration."),
    click.option("--board", "boards", multiple=True, help="Build only these boards (qemu-virt, rpi4); repeatable."),
    click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Private key to sign artifacts with; the image trusts its public half. Required unless "
                      "--unsigned."),
    click.option("--unsigned", is_flag=True,
                 help="Build without a release key: the image trusts no key and refuses every update (says so at "
                      "every boot)."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Build cache (default: $XDG_CACHE_HOME/vv-ota)."),
    click.option("--server-url", help="Update server URL baked into the image's agent configuration."),
    click.option("--server-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="PEM certificates the server's TLS certificate must chain to, installed as "
                      "/etc/ota/server-ca.pem (overrides server_ca in the configuration)."),
    click.option("--insecure-http", is_flag=True, default=None,
                 help="Allow a plain http:// server URL (a lab only; like insecure_http: true in the configuration)."),
    click.option("--security-version", type=click.IntRange(0, 999_999_999), default=None,
                 help="Security version of the release (overrides security_version in the configuration): devices "
                      "refuse releases below their own."),
    click.option("--previous", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="The previous release's output directory (OUT/<old version>): a delta artifact from it is "
                      "written next to each board's full artifact (delta-from-<old>-<board>.mender)."),
    click.option("--refresh-base", is_flag=True,
                 help="Bootstrap the base rootfs again even if the cached one is current."),
    click.option("--offline", is_flag=True,
                 help="Build from the cached base rootfs as it is, without asking the archive for newer packages "
                      "(never touches the network; the build says so)."),
    click.option("--base-max-age", type=click.FloatRange(min=0), default=7.0, show_default=True, metavar="DAYS",
                 help="Bootstrap the base rootfs again when the cached one is older than this, even if the archive "
                      "has nothing newer for it."),
    click.option("--image-url-base", metavar="URL",
                 help="Where the compressed images will be served from (the release directory's URL): the "
                      "Raspberry Pi Imager file written next to each Pi image points there (default: the local "
                      "file, as a file:// URL)."),
]
_PUBLISH = click.option("--publish", "publish_url", metavar="URL",
                        help="Upload the release's artifacts to the update server at URL (token: $OTA_ADMIN_TOKEN).")


@click.command()
@_options
@_PUBLISH
def release(publish_url: str | None, **opts: Any) -> None:
    """Build disk images, the rootfs and signed artifacts for every board into OUT/<version>/."""
    from cli.publish import publish_release, publisher

    _check_signing(opts["key"], opts["unsigned"])
    client = None
    if publish_url is not None:  # fail before a long build, not after it
        client = publisher(publish_url)
        client.check()
    outputs = _run("release", **opts)
    if client is not None:
        publish_release(client, sorted(p for p in outputs if p.suffix == ".mender"), progress=progress_line)


@click.command()
@_options
def rootfs(**opts: Any) -> None:
    """Stage only: the root filesystem (OUT/<version>/rootfs.ext4), for debugging."""
    _check_signing(opts["key"], opts["unsigned"])
    _run("rootfs", **opts)


@click.command()
@_options
def image(**opts: Any) -> None:
    """Stages up to the disk images (no artifacts), for debugging."""
    _check_signing(opts["key"], opts["unsigned"])
    _run("image", **opts)


def _check_signing(key: Path | None, unsigned: bool) -> None:
    """An image without a release key must be asked for. Raises :class:`UserError` (exit 2)."""
    if key is None and not unsigned:
        raise UserError("no --key: give the release's private key with --key PRIVATE.pem (the image trusts its "
                        "public half), or pass --unsigned for an image that trusts no key and refuses every update")
    if key is not None and unsigned:
        raise UserError("--key and --unsigned exclude each other")


def _run(kind: str, *, config: Path | None, version: str | None, boards: Sequence[str], key: Path | None,
         unsigned: bool, out: Path, cache_dir: Path | None, server_url: str | None, server_ca: Path | None,
         insecure_http: bool | None, security_version: int | None, previous: Path | None, refresh_base: bool,
         offline: bool, base_max_age: float, image_url_base: str | None) -> list[Path]:
    from image.archive import ArchiveUnreachable
    from image.basecache import BasePolicy
    from image.release import ALL_STAGES, DEFAULT_CONFIG, Stage, build_release
    from image.trust import InsecureServerError

    stages = {"release": ALL_STAGES, "image": frozenset({Stage.ROOTFS, Stage.IMAGES}),
              "rootfs": frozenset({Stage.ROOTFS})}[kind]
    signer = load_signer(key) if key else None
    if refresh_base and offline:
        raise UserError("--refresh-base and --offline exclude each other: a bootstrap needs the archive")
    policy = BasePolicy(refresh=refresh_base, offline=offline, max_age_days=base_max_age)
    try:
        result = build_release(config=config or DEFAULT_CONFIG, version=version, boards=boards, signer=signer,
                               unsigned=unsigned, out=out, cache_dir=cache_dir, server_url=server_url,
                               security_version=security_version, server_ca=server_ca, insecure_http=insecure_http,
                               progress=progress_line, stages=stages, previous=previous, base_policy=policy,
                               image_url_base=image_url_base)
    except InsecureServerError as e:
        raise InsecureServerError(f"{e}, or with --insecure-http") from None
    except ArchiveUnreachable as e:
        raise ArchiveUnreachable(f"{e}; to build from the cached base rootfs as it is, pass --offline",
                                 transient=e.transient) from None
    table = Table(title=f"release {result.version} → {result.out_dir}")
    table.add_column("output")
    table.add_column("size", justify="right")
    for name, path in sorted(result.outputs.items()):
        table.add_row(name, f"{path.stat().st_size / 1e6:,.1f} MB")
    console.print(table)
    console.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return list(result.outputs.values())
