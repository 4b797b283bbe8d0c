from __future__ import annotations

from pathlib import Path

import click

from artifacts.keys import KeyType, generate_keypair


@click.group()
def keys() -> None:
    """Signing keys for artifacts; TLS certificates for the update server; the fleet enrolment CA."""


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


@keys.command("tls-ca")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for ca.pem (certificate) and ca.key (private key, 0600).")
@click.option("--name", "common_name", default="vv-ota test CA", show_default=True, help="The CA's common name.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="Validity.")
def tls_ca(out_dir: Path, common_name: str, days: int) -> None:
    """Make a CA for the update server's TLS certificates (a lab or test CA); never overwrites."""
    from ota_common.tls import make_ca

    cert, key = make_ca(out_dir, common_name, days)
    click.echo(f"wrote {cert} (give it to devices as their server CA) and {key} (keep it secret)")


@keys.command("fleet-ca")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for fleet-ca.pem (certificate) and fleet-ca.key (private key, 0600).")
@click.option("--name", "common_name", default="vv-ota fleet enrolment CA", show_default=True,
              help="The CA's common name.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True, help="Validity.")
def fleet_ca(out_dir: Path, common_name: str, days: int) -> None:
    """Make the fleet enrolment CA: `build.py provision` issues each card a device certificate with it, and the
    update server started with `--fleet-ca DIR/fleet-ca.pem` accepts those devices at once. Never overwrites."""
    from ota_common.fleetca import make_fleet_ca

    cert, key = make_fleet_ca(out_dir, common_name, days)
    click.echo(f"wrote {cert} (give it to the update server: --fleet-ca) and {key} (keep it secret, offline)")


@keys.command("tls-server")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory holding ca.pem and ca.key (from `keys tls-ca`).")
@click.option("--name", "names", multiple=True, required=True,
              help="DNS name or IP address devices use to reach the server; repeatable (all go into the "
              "SubjectAltName).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for server.pem and server.key (0600).")
@click.option("--days", type=click.IntRange(min=1), default=825, show_default=True, help="Validity.")
def tls_server(ca_dir: Path, names: tuple[str, ...], out_dir: Path, days: int) -> None:
    """Make the update server's TLS certificate and key, signed by the CA; never overwrites.

    Serve them with `build.py server --tls-cert OUT/server.pem --tls-key OUT/server.key`."""
    from ota_common.tls import make_server_cert

    cert, key = make_server_cert(ca_dir / "ca.pem", ca_dir / "ca.key", out_dir, names, days)
    click.echo(f"wrote {cert} and {key} for {', '.join(names)}")
