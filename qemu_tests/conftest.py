"""End-to-end harness.

- :func:`fleet` (session): the releases, built once per session by ``build_release`` (what ``build.py release``
  runs) for one server port, baked into the images as ``http://10.0.2.2:<port>`` (QEMU's view of the host's
  loopback): v1 ``1.0.0``, v2 ``2.0.0``, a broken ``2.1.0`` whose application fails its health check (empty
  ``DVR_IP``), a broken ``2.2.0`` that cannot boot (no ``/sbin/init``: the initramfs panics), and ``2.3.0``
  built with ``previous`` = 2.0.0, so it comes with ``delta-from-2.0.0-qemu-virt.mender``. Every image also
  carries a test layer that lets root log in over SSH with the session's key.
- :class:`Rig`: one server (fresh database) and one device (:class:`devkit.qemu.Vm`, a copy-on-write overlay of
  v1's ``disk.img`` on a card 512 MiB bigger than the image) with helpers to onboard, deploy, follow, pull
  the plug and power up again.
- Timings (boot to healthy, update downtime, per scenario) are collected and printed at the end of the run.

The scenarios of one module share one rig and run in file order (each a test, each asserting its own
outcome): a fresh boot and onboarding per scenario would cost minutes of the suite's QEMU budget.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from artifacts import KeyType, generate_keypair, load_signer
from devkit.config import demo_config, run_ca
from devkit.net import free_port
from devkit.qemu import Vm, VmError
from devkit.qemu import preflight as qemu_preflight
from devkit.server import OtaServer
from devkit.wait import wait_until
from image.release import DEFAULT_CONFIG, build_release
from image.release import preflight as build_preflight
from tests.conftest import clean_environment, clean_environment_per_test  # noqa: F401 - autouse: no caller's OTA_*, proxies, ...

NAME = "vv-video-ai"
GROW = 512 << 20
TIMINGS: list[tuple[str, float]] = []


def timing(what: str, seconds: float) -> None:
    TIMINGS.append((what, seconds))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("QEMU end-to-end timings")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:8.1f} s  {what}")


@dataclass(frozen=True)
class Fleet:
    port: int
    key: Path
    public: Path
    ca: Path  # the run's CA: the images trust it, it signs the server's certificate
    tls: tuple[Path, Path]
    ssh_key: Path
    releases: dict[str, Path]  # version -> release directory
    workdir: Path

    def disk(self, version: str) -> Path:
        return self.releases[version] / "qemu-virt" / "disk.img"

    def artifact(self, version: str) -> Path:
        return self.releases[version] / f"{NAME}-{version}-qemu-virt.mender"

    def delta(self, version: str, source: str) -> Path:
        return self.releases[version] / f"delta-from-{source}-qemu-virt.mender"


E2E_LAYER = """description: QEMU tests only - root logs in over SSH with the test session's key; the agent
  honours OTA_AGENT_FAULT (power-cut points) from /data/ota/agent.env
files:
  - {src: e2e/authorized_keys, dest: /root/.ssh/authorized_keys, mode: "0600"}
commands:
  - "chmod 0700 /root/.ssh"
  - "touch /etc/ota/fault-injection"
"""
NO_INIT_LAYER = """description: QEMU tests only - broken on purpose, the root filesystem has no init
commands:
  - "rm -f /usr/sbin/init"
"""
#: every release's variables: a DVR_IP (the host, from QEMU's user network) the health verdict accepts; the
#: app layer's placeholder would fail it, as on any device nobody configured
BASE_VARIABLES = {"DVR_IP": "10.0.2.2"}
#: version -> (variables, extra layer files, the release it carries a delta from)
SERIES: dict[str, tuple[dict[str, str], tuple[str, ...], str | None]] = {
    "1.0.0": ({}, (), None),
    "2.0.0": ({}, (), None),
    "2.1.0": ({"DVR_IP": ""}, (), None),  # the application answers 503 on /health
    "2.2.0": ({}, ("noinit.yaml",), None),
    "2.3.0": ({}, (), "2.0.0"),  # build.py release --previous: delta-from-2.0.0-qemu-virt.mender
}


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    base = tmp_path_factory.mktemp("e2e")
    # a missing package fails here in a second, naming it, not after minutes of builds
    build_preflight()
    qemu_preflight(base / "preflight")
    private, public = generate_keypair(KeyType.ECDSA_P256, base / "keys")
    ssh_key = base / "keys" / "ssh"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qemu-tests", "-f", str(ssh_key)], check=True)
    layers = base / "layers"
    (layers / "e2e").mkdir(parents=True)
    (layers / "e2e" / "authorized_keys").write_text(ssh_key.with_suffix(".pub").read_text())
    (layers / "e2e.yaml").write_text(E2E_LAYER)
    (layers / "noinit.yaml").write_text(NO_INIT_LAYER)
    port = free_port()
    url = f"https://10.0.2.2:{port}"
    ca, tls = run_ca(base / "tls")
    releases: dict[str, Path] = {}
    for version, (variables, extra, previous) in SERIES.items():
        started = time.monotonic()
        config = demo_config(base / "config" / version, DEFAULT_CONFIG, url,
                             {"OTA_HEALTH_DEADLINE": "45s", **BASE_VARIABLES, **variables},
                             extra_layers=[layers / "e2e.yaml", *(layers / e for e in extra)])
        result = build_release(config=config, version=version, boards=["qemu-virt"], signer=load_signer(private),
                               out=base / "releases", cache_dir=None, server_url=url, server_ca=ca,
                               progress=lambda m: None,
                               stages=frozenset({"rootfs", "images", "artifacts"}),
                               previous=releases[previous] if previous else None)
        releases[version] = result.out_dir
        timing(f"build release {version} (build cache warm)", time.monotonic() - started)
    return Fleet(port, private, public, ca, tls, ssh_key, releases, base)


@dataclass
class Rig:
    """A server and a device, and what a test does with them."""

    fleet: Fleet
    server: OtaServer
    vm: Vm
    device_id: str = ""
    booted_at: float = field(default_factory=time.monotonic)

    # -- power
    def power_on(self) -> None:
        self.booted_at = time.monotonic()
        self.vm.start()

    def pull_plug(self) -> None:
        self.vm.kill()

    # -- server side
    def onboard(self) -> str:
        """Wait for the device to ask for admission, accept it, wait for its first inventory."""
        self.vm.wait_for(lambda: any(d["status"] == "pending" for d in self.server.devices()), 600)
        dev = next(d for d in self.server.devices() if d["status"] == "pending")
        self.server.accept(dev)
        self.device_id = dev["id"]
        self.wait_attr("artifact_name", f"{NAME}-1.0.0", 300)
        return self.device_id

    def attrs(self) -> dict[str, Any]:
        return self.server.attributes(self.device_id)

    def wait_attr(self, name: str, value: str, timeout: float) -> None:
        def check() -> bool:
            return self.attrs().get(name) == value

        check.__doc__ = f"inventory {name}={value}"
        self.vm.wait_for(check, timeout, poll=2)

    def wait_running(self, version: str, slot: str, timeout: float = 300) -> None:
        """The device's own inventory says it runs ``version`` from ``slot`` (the server sets artifact_name by
        itself when a deployment succeeds, before the device's next inventory arrives: wait for both)."""
        def check() -> bool:
            attrs = self.attrs()
            return attrs.get("artifact_name") == f"{NAME}-{version}" and attrs.get("ota_slot") == slot

        check.__doc__ = f"inventory: {NAME}-{version} on slot {slot}"
        self.vm.wait_for(check, timeout, poll=2)

    def upload(self, artifact: Path) -> str:
        before = set(self.artifact_files())
        resp = self.server.upload_artifact(artifact)
        assert resp.status == 201, resp
        (stored,) = set(self.artifact_files()) - before
        return str(stored)

    def artifact_files(self) -> list[Path]:
        return sorted((self.server.workdir / "storage" / "artifacts").glob("*.mender"))

    def deploy(self, artifact_name: str) -> str:
        return self.server.deploy(f"e2e {artifact_name}", artifact_name, [self.device_id])

    def follow(self, dep: str, until: set[str], timeout: float,
               on_status: Callable[[str, float], object] | None = None) -> dict[str, int]:
        """Poll the deployment's statistics until one of ``until`` shows; ``on_status`` sees each new one.

        Raises :class:`VmError` when QEMU stops first, :class:`~devkit.wait.WaitTimeout` after ``timeout`` (both
        with the console's tail, the free disk space and the server log's tail)."""
        seen: set[str] = set()
        stats: dict[str, int] = {}

        def finished() -> dict[str, int] | None:
            nonlocal stats
            stats = self.server.statistics(dep)
            for status in stats:
                if status not in seen:
                    seen.add(status)
                    if on_status:
                        on_status(status, time.monotonic())
            if set(stats) & until:
                return stats
            if not self.vm.running:
                raise VmError(f"QEMU stopped; deployment {dep} is {stats}\n{self.vm.report()}")
            return None

        return wait_until(finished, timeout, 1, f"deployment {dep} to reach one of {sorted(until)}",
                          lambda: f"deployment {dep} is {stats}\n{self.vm.report()}")

    def log(self, dep: str) -> str:
        return self.server.device_log(dep, self.device_id)

    # -- device side
    def sh(self, command: str, timeout: float = 180) -> str:
        return self.vm.ssh(command, timeout=timeout).stdout

    def slot_digest(self, part: int, mib: int = 64) -> str:
        """sha256 of the first ``mib`` MiB of a slot (the install writes from offset 0)."""
        return self.sh(f"head -c {mib}M /dev/vda{part} | sha256sum").split()[0]

    def boot_env(self) -> dict[str, str]:
        out = self.sh("fw_printenv")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def make_rig(fleet: Fleet, workdir: Path) -> Iterator[Rig]:
    with ExitStack() as cleanup:  # the device, then the server, stopped on any exit
        server = OtaServer(workdir / "server", fleet.public, port=fleet.port, tls=fleet.tls, ca_file=fleet.ca)
        server.start()
        cleanup.callback(server.stop)
        vm = Vm.device(fleet.disk("1.0.0"), workdir / "vm", name="device", grow_bytes=GROW, ssh_key=fleet.ssh_key,
                       ssh_port=free_port(), server_log=server.log_path)
        cleanup.callback(vm.kill)
        rig = Rig(fleet, server, vm)
        rig.power_on()
        vm.wait_for("vv-video-ai: serving /health", 600)
        timing("power on to application healthy (v1, first boot)", time.monotonic() - rig.booted_at)
        rig.onboard()
        timing("power on to onboarded (pending, accepted, inventory)", time.monotonic() - rig.booted_at)
        yield rig
