"""``build.py release`` (what users run) and the stages it is made of, for debugging."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from artifacts.keys import load_signer
from cli.common import progress_line

console = Console(stderr=True)


_STAGES = {
    "release": frozenset({"rootfs", "images", "artifacts"}),
    "image": frozenset({"rootfs", "images"}),
    "rootfs": frozenset({"rootfs"}),
}


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
                 help="Private key to sign artifacts."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Build cache (default: $XDG_CACHE_HOME/vv-ota)."),
    click.option("--server-url", help="Update server URL baked into the image's agent configuration."),
    click.option("--previous", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="The previous release's output directory (OUT/<old version>): a delta artifact from it is "
                      "written next to each board's full artifact (delta-from-<old>-<board>.mender)."),
]
_PUBLISH = click.option("--publish", "publish_url", metavar="URL",
                        help="Upload the release's artifacts to the update server at URL (token: $OTA_ADMIN_TOKEN).")


@click.command()
@_options
@_PUBLISH
def release(config: Path | None, version: str | None, boards: Sequence[str], key: Path | None, out: Path,
            cache_dir: Path | None, server_url: str | None, previous: Path | None, publish_url: str | None) -> None:
    """Build disk images, the rootfs and signed artifacts for every board into OUT/<version>/."""
    from cli.publish import admin_token, check_server, check_url, publish

    token = None
    if publish_url is not None:  # fail before a long build, not after it
        check_url(publish_url)
        token = admin_token()
        check_server(publish_url, token)
    outputs = _run("release", config, version, boards, key, out, cache_dir, server_url, previous)
    if publish_url is not None:
        publish(publish_url, sorted(p for p in outputs if p.suffix == ".mender"), token,
                progress=progress_line)


@click.command()
@_options
def rootfs(config: Path | None, version: str | None, boards: Sequence[str], key: Path | None, out: Path,
           cache_dir: Path | None, server_url: str | None, previous: Path | None) -> None:
    """Stage only: the root filesystem (OUT/<version>/rootfs.ext4), for debugging."""
    _run("rootfs", config, version, boards, key, out, cache_dir, server_url, previous)


@click.command()
@_options
def image(config: Path | None, version: str | None, boards: Sequence[str], key: Path | None, out: Path,
          cache_dir: Path | None, server_url: str | None, previous: Path | None) -> None:
    """Stages up to the disk images (no artifacts), for debugging."""
    _run("image", config, version, boards, key, out, cache_dir, server_url, previous)


def _run(kind: str, config: Path | None, version: str | None, boards: Sequence[str], key: Path | None, out: Path,
         cache_dir: Path | None, server_url: str | None, previous: Path | None) -> list[Path]:
    from image.release import DEFAULT_CONFIG, build_release

    signer = load_signer(key) if key else None
    result = build_release(config=config or DEFAULT_CONFIG, version=version, boards=boards, signer=signer, out=out,
                           cache_dir=cache_dir, server_url=server_url, progress=progress_line,
                           stages=_STAGES[kind], previous=previous)
    table = Table(title=f"release {result.version} → {result.out_dir}")
    table.add_column("output")
    table.add_column("size", justify="right")
    for name, path in sorted(result.outputs.items()):
        table.add_row(name, f"{path.stat().st_size / 1e6:,.1f} MB")
    console.print(table)
    console.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return list(result.outputs.values())
