"""The demo's release configuration and its TLS authority (``build.py demo`` and the QEMU end-to-end suite)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def demo_config(workdir: Path, base: Path, server_url: str, variables: dict[str, str],
                extra_layers: Sequence[Path] = ()) -> Path:
    """A release configuration like ``base`` pointed at ``server_url`` with demo-friendly timings.

    ``extra_layers`` (layer files; their ``src`` paths resolve next to them) are appended to the layer list."""
    cfg = yaml.safe_load(base.read_text())
    cfg.update(server_url=server_url, boards=["qemu-virt"])
    cfg["variables"] = {**(cfg.get("variables") or {}), "OTA_POLL_INTERVAL": "5s", "OTA_INVENTORY_INTERVAL": "30s",
                        "OTA_HEALTH_DEADLINE": "3m", **variables}
    workdir.mkdir(parents=True, exist_ok=True)
    layers = workdir / "layers"
    if not layers.exists():
        layers.mkdir()
        for entry in (base.resolve().parent / "layers").iterdir():
            (layers / entry.name).symlink_to(entry)
    for extra in extra_layers:
        link = layers / extra.name
        link.unlink(missing_ok=True)
        link.symlink_to(extra.resolve())
        cfg["layers"] = [*cfg["layers"], extra.stem]
    path = workdir / "release.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_ca(directory: Path) -> tuple[Path, tuple[Path, Path]]:
    """A CA for one run and the server's certificate for the names devices and the host use: QEMU's view of the
    host (10.0.2.2) and the loopback. Reused when already there. Returns (ca.pem, (server.pem, server.key))."""
    from ota_common.tls import make_ca, make_server_cert

    ca, ca_key = directory / "ca" / "ca.pem", directory / "ca" / "ca.key"
    if not ca.exists():
        make_ca(ca.parent, "vv-ota demo CA")
    cert, key = directory / "server" / "server.pem", directory / "server" / "server.key"
    if not cert.exists():
        make_server_cert(ca, ca_key, cert.parent, ["10.0.2.2", "127.0.0.1", "localhost"])
    return ca, (cert, key)
