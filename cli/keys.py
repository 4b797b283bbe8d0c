from __future__ import annotations

from pathlib import Path

import click

from artifacts.keys import KeyType, generate_keypair


@click.group()
def keys() -> None:
    """Signing keys for artifacts."""


@keys.command("generate")
@click.option(
    "--type", "key_type", type=click.Choice([t.value for t in KeyType]), default=KeyType.ECDSA_P256.value,
    show_default=True, help="Key algorithm (both are accepted by mender-artifact 3.9).",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for private.pem and public.pem.")
def generate(key_type: str, out_dir: Path) -> None:
    """Generate DIR/private.pem (SEC1 or PKCS#1) and DIR/public.pem; never overwrites a key."""
    private, public = generate_keypair(KeyType(key_type), out_dir)
    click.echo(f"wrote {private} (keep it secret) and {public}")
