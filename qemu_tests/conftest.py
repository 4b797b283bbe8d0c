"""End-to-end harness: releases built once per session for one server port (baked into the images as
``http://10.0.2.2:<port>``, QEMU's view of the host's loopback); every test starts its own fresh server on
that port and boots its own device from a copy-on-write overlay (:class:`image.vm.Vm`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from artifacts import KeyType, generate_keypair, load_signer
from cli.demo import demo_config
from image.release import DEFAULT_CONFIG, build_release
from image.vm import Vm
from ota_server.process import OtaServer, free_port


@dataclass(frozen=True)
class Fleet:
    port: int
    key: Path
    public: Path
    releases: dict[str, Path]  # version -> release directory

    def disk(self, version: str) -> Path:
        return self.releases[version] / "qemu-virt" / "disk.img"

    def artifact(self, version: str) -> Path:
        return self.releases[version] / f"vv-video-ai-{version}-qemu-virt.mender"


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    base = tmp_path_factory.mktemp("e2e")
    private, public = generate_keypair(KeyType.ECDSA_P256, base / "keys")
    port = free_port()
    releases = {}
    for version in ("1.0.0", "2.0.0"):
        config = demo_config(base / "config" / version, DEFAULT_CONFIG, f"http://10.0.2.2:{port}", {})
        result = build_release(config=config, version=version, boards=["qemu-virt"], signer=load_signer(private),
                               out=base / "releases", cache_dir=None, server_url=f"http://10.0.2.2:{port}",
                               progress=lambda m: None, stages=frozenset({"rootfs", "images", "artifacts"}))
        releases[version] = result.out_dir
    return Fleet(port, private, public, releases)


@pytest.fixture
def server(fleet: Fleet, tmp_path: Path) -> Iterator[OtaServer]:
    srv = OtaServer(tmp_path / "server", fleet.public, port=fleet.port)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def device(fleet: Fleet, tmp_path: Path) -> Iterator[Vm]:
    vm = Vm(fleet.disk("1.0.0"), tmp_path / "vm", name="device")
    try:
        yield vm.start()
    finally:
        vm.kill()
