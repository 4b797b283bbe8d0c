"""``build.py demo``: the whole product in one command, on this machine.

Builds (or reuses, through the build cache) three releases of the default configuration for ``qemu-virt`` —
v1, v2 (with a delta from v1), and a broken v3 whose application fails its health check — starts the update
server, boots a QEMU device from v1, accepts it, deploys v2 (the device downloads the delta: about a megabyte
instead of the full artifact) and follows it to ``success``, then deploys v3 and shows the automatic rollback to
v2 with the failure reported, and its total time. Everything it starts is stopped at the end (or on Ctrl-C).
"""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from cli.common import progress_line
from devkit.config import demo_config, run_ca
from ota_common.errors import ToolError
from ota_common.progress import elapsed
from ota_common.tools import require_tools, run

if TYPE_CHECKING:
    from devkit.qemu import Vm
    from devkit.server import OtaServer

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT = 30.0  # seconds of silence after which a wait says it is still waiting
T = TypeVar("T")
#: version, variables, the release it carries a delta from (v2 reaches v1 devices as a delta; v3: empty DVR_IP, the
#: app answers 503)
SERIES: tuple[tuple[str, dict[str, str], str | None], ...] = (
    ("1.0.0", {}, None), ("2.0.0", {}, "1.0.0"), ("2.1.0", {"DVR_IP": ""}, None))


def _last_console_line(vm: Vm) -> str:
    lines = [line.strip() for line in vm.console().splitlines() if line.strip()]
    return f"console: {lines[-1][-100:]}" if lines else "console still empty"


class Demo:
    def __init__(self, out: Path, cache_dir: Path | None) -> None:
        self.out = out.resolve()
        self.cache_dir = cache_dir
        self.started = time.monotonic()

    def say(self, msg: str) -> None:
        progress_line(f"[{time.monotonic() - self.started:5.0f} s] {msg}")

    def preflight(self) -> None:
        """Everything the demo needs, checked in about a second before the first build (minutes) starts:
        the build tools and arm64 emulation, mender-artifact, and QEMU started with the device's exact options.
        Raises :class:`ToolError` naming the Debian package to install."""
        from devkit.qemu import preflight as qemu_preflight
        from image.release import preflight as build_preflight

        started = time.monotonic()
        build_preflight()
        require_tools(["mender-artifact"], "checking artifacts with the stock tool")
        qemu_preflight(self.out / "vm")
        self.say(f"preflight: build tools, arm64 emulation, mender-artifact and QEMU ready "
                 f"({time.monotonic() - started:.1f} s)")

    def build(self, key: Path, server_url: str, server_ca: Path) -> dict[str, Path]:
        from artifacts import load_signer
        from image.release import DEFAULT_CONFIG, build_release

        signer = load_signer(key)
        releases = {}
        for version, variables, previous in SERIES:
            # a DVR_IP the health verdict accepts (the app layer's placeholder fails it); v3 empties it
            config = demo_config(self.out / "config" / version, DEFAULT_CONFIG, server_url,
                                 {"DVR_IP": "10.0.2.2", **variables})
            self.say(f"building release {version}{' (broken: the app will fail its health check)' if variables else ''}")
            result = build_release(config=config, version=version, boards=["qemu-virt"], signer=signer,
                                   out=self.out / "releases", cache_dir=self.cache_dir, server_url=server_url,
                                   server_ca=server_ca,
                                   progress=lambda m, v=version: self.say(f"  {v}: {m}"),
                                   stages=frozenset({"rootfs", "images", "artifacts"}),
                                   previous=releases[previous] if previous else None)
            releases[version] = result.out_dir
            art = result.out_dir / f"vv-video-ai-{version}-qemu-virt.mender"
            # the stock tool agrees with our writer
            proc = run(["mender-artifact", "validate", "-k", key.with_name("public.pem"), art],
                       stage="checking the artifact with the stock tool", check=False, timeout=600)
            if proc.returncode != 0:
                said = (proc.stderr or proc.stdout).decode(errors="replace").strip()
                raise ToolError(f"mender-artifact refuses {art}: {said}")
            self.say(f"{art.name}: {art.stat().st_size / 1e6:.0f} MB, signature checked by mender-artifact")
            if previous:
                delta = result.out_dir / f"delta-from-{previous}-qemu-virt.mender"
                self.say(f"{delta.name}: {delta.stat().st_size / 1e6:.1f} MB (what a device running {previous} "
                         "downloads)")
        return releases

    def wait(self, what: str, check: Callable[[], T], timeout: float, vm: Vm) -> T:
        """Poll ``check`` every 2 s until it returns something true, and return that; say every 30 s that it
        still waits. Raises :class:`~devkit.qemu.VmError` when the device stops, a
        :class:`~devkit.wait.WaitTimeout` after ``timeout`` (both tool errors: the user did nothing wrong)."""
        started = beat = time.monotonic()

        def check_and_say() -> T:
            nonlocal beat
            value = check()
            if not value and time.monotonic() - beat >= HEARTBEAT:
                beat = time.monotonic()
                self.say(f"still waiting for {what} ({elapsed(beat - started)}; {_last_console_line(vm)})")
            return value

        check_and_say.__doc__ = what
        return vm.wait_for(check_and_say, timeout, poll=2)

    def follow(self, server: OtaServer, dep: str, vm: Vm, until: set[str], timeout: float) -> dict[str, int]:
        """Print each new deployment status and console milestone until a final one. Raises like :meth:`wait`."""
        seen: dict[str, int] = {}
        mark = vm.mark()
        beat = started = time.monotonic()
        milestones = ("ota-boot: slot=", "rolling back", "committed", "trial of slot", "boot state armed")

        def finished() -> dict[str, int] | None:
            nonlocal seen, mark, beat
            stats = server.statistics(dep)
            if stats != seen:
                self.say("deployment: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
                seen, beat = stats, time.monotonic()
            text = vm.console()
            for line in text[mark:].splitlines():
                if any(m in line for m in milestones):
                    self.say("device: " + line.split("] ", 1)[-1].strip())
                    beat = time.monotonic()
            if time.monotonic() - beat >= HEARTBEAT:
                beat = time.monotonic()
                self.say(f"deployment still {', '.join(sorted(stats)) or 'pending'} ({elapsed(beat - started)})")
            mark = len(text)
            return stats if set(stats) & until else None

        finished.__doc__ = f"deployment {dep} to finish"
        return vm.wait_for(finished, timeout, poll=3)

    def run(self) -> None:
        from artifacts import KeyType, generate_keypair
        from devkit.client import PublishError
        from devkit.net import free_port
        from devkit.qemu import Vm
        from devkit.server import OtaServer

        self.preflight()
        keys = self.out / "keys"
        if not (keys / "private.pem").exists():
            generate_keypair(KeyType.ECDSA_P256, keys)
        port = free_port()
        server_url = f"https://10.0.2.2:{port}"  # the host's loopback as QEMU's user network shows it
        ca, tls = run_ca(self.out / "tls")
        self.say(f"TLS: a CA made for this run ({ca}) signs the server's certificate; the images trust it")
        releases = self.build(keys / "private.pem", server_url, ca)
        server = OtaServer(self.out / "server", keys / "public.pem", admin_token=secrets.token_hex(16), port=port,
                           tls=tls, ca_file=ca)
        with ExitStack() as cleanup:  # the device, then the server, stopped on any exit
            self.say(f"starting the update server on 127.0.0.1:{port} (log: {server.log_path})")
            server.start()
            cleanup.callback(server.stop)
            vm = Vm.device(releases["1.0.0"] / "qemu-virt" / "disk.img", self.out / "vm", name="device",
                           grow_bytes=256 << 20, server_log=server.log_path)
            cleanup.callback(vm.kill)
            self.say(f"dashboard: {server.url}/ui/  (admin token: {server.admin_token}; CA: {ca})")
            self.say(f"booting a device from release 1.0.0 (console: {vm.console_log})")
            vm.start()
            device = self.wait("the device to ask for admission",
                               lambda: next((d for d in server.devices() if d["status"] == "pending"), None), 600, vm)
            self.say(f"device {device['id']} {device['identity_data']} is pending: accepting it")
            server.accept(device)
            attrs = self.wait("the device's inventory",
                              lambda: server.attributes(device["id"]).get("artifact_name"), 300, vm)
            self.say(f"device reports {attrs}")
            for version, broken in (("2.0.0", False), ("2.1.0", True)):
                art = releases[version] / f"vv-video-ai-{version}-qemu-virt.mender"
                for upload in (art, *sorted(releases[version].glob("delta-from-*-qemu-virt.mender"))):
                    resp = server.upload_artifact(upload)
                    if resp.status != 201:
                        raise PublishError(f"upload of {upload.name} refused: {resp}")
                dep = server.deploy(f"rollout {version}", f"vv-video-ai-{version}", [device["id"]])
                self.say(f"deployed vv-video-ai-{version} ({art.stat().st_size / 1e6:.0f} MB){' — broken on purpose' if broken else ''}")
                stats = self.follow(server, dep, vm, {"success", "failure"}, 1800)
                # the agent's console line "[<deployment id>] downloading N bytes" (the deployment log is
                # uploaded only when an install fails)
                got = re.search(rf"\[{re.escape(dep[:8])}\] downloading (\d+) bytes", vm.console())
                if got:
                    size, full = int(got.group(1)), art.stat().st_size
                    kind = "the full artifact" if size > full / 2 else f"a delta; the full artifact is {full / 1e6:.0f} MB"
                    self.say(f"the device downloaded {size / 1e6:.1f} MB ({kind})")
                if broken:
                    log = server.device_log(dep, device["id"])
                    reason = next((line for line in log.splitlines() if "rolled back" in line), "")
                    self.say(f"rollback reported: {reason.strip()[:200]}")
                time.sleep(5)
                current = self.wait("the device's version", lambda: server.attributes(device["id"]).get("artifact_name"), 120, vm)
                self.say(f"deployment {stats}; the device now runs {current} "
                         f"from slot {server.attributes(device['id']).get('ota_slot')}")
            self.say("demo complete: v1 → v2 updated and committed; v2 → broken v3 rolled back to v2 "
                     f"(total {elapsed(time.monotonic() - self.started)})")


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True,
              help="Releases, keys, server state and console logs.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Build cache (default: XDG cache).")
def demo(out: Path, cache_dir: Path | None) -> None:
    """Build v1/v2/broken v3, start the server, boot a QEMU device, update it, and show a rollback."""
    # a SIGTERM (a CI timeout, kill) stops the server and the device like Ctrl-C does, instead of orphaning them
    signal.signal(signal.SIGTERM, _interrupt)
    Demo(out, cache_dir).run()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
