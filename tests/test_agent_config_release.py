"""A configuration change that behaves like a release, on the real agent: a file-backed device
(:mod:`tests.agent_device`), the scriptable server of :mod:`tests.hostile_server` and a fake application whose
``/health`` fails when ``device.env`` says ``DVR_IP=bad...``.

Announced by ``X-VV-Config-Hash`` on the poll's answer, fetched at that poll, applied, checked, reported; a
configuration that breaks the application reverted, reported and not retried; a power cut at each step leaves a
whole ``device.env``; and the attack stories: a malformed hash header is ignored (logged once), a variable the
image does not declare never reaches ``device.env`` through this path either.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from device_hooks.agent import Agent
from device_hooks.config import load_config
from device_hooks.devconfig import parse_env
from device_hooks.faults import EXIT_CODE

from .agent_device import FileDevice
from .hostile_server import Hostile, hostile_server, serving

GOOD = {"DEVICE_ID": "cam-1", "DVR_IP": "10.0.0.1"}
GOOD_ENV = "DEVICE_ID=cam-1\nDVR_IP=10.0.0.1\n"


def h(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


@dataclass
class App:
    """The application's health endpoint: 500 while device.env holds a DVR_IP starting with ``bad``."""

    env: Path
    checks: int = 0
    port: int = 0
    down: bool = False  # failing whatever the configuration

    def handler(self) -> type[BaseHTTPRequestHandler]:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                app.checks += 1
                values = parse_env(app.env.read_text())[0] if app.env.exists() else {}
                self.send_response(500 if app.down or values.get("DVR_IP", "").startswith("bad") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


@dataclass
class Scene:
    device: FileDevice
    server: Hostile
    app: App

    @property
    def env(self) -> Path:
        return self.device.data / "device.env"

    def poll(self, fault: str | None = None) -> Any:
        return self.device.agent("check-update", fault=fault)

    def fetches(self) -> int:
        return sum(r.endswith("/deviceconfig/configuration") for r in self.server.requests)

    def inventory(self) -> dict[str, Any]:
        return self.server.last_inventory()


@pytest.fixture
def scene(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> Iterator[Scene]:
    with hostile_server() as server:
        device = FileDevice(tmp_path / "dev", server.url, [keys["ec"][1]], check_server=False)
        app = App(device.data / "device.env")
        with serving(app.handler()) as app.port:
            text = device.config_path.read_text()
            text = text.replace("\nurl =\n", f"\nurl = http://127.0.0.1:{app.port}/health\n")
            text = text.replace("[health]\n", "[health]\nconfig_wait = 2\n")
            device.config_path.write_text(text)
            s = Scene(device, server, app)
            server.configuration, server.config_hash = dict(GOOD), h("good")
            assert s.poll().stdout.strip() == "idle"
            assert s.env.read_text() == GOOD_ENV
            yield s


def in_process(s: Scene) -> Agent:
    """The agent as the daemon runs it (one object, many polls): the inventory is due once an hour only, so a
    fetch between two polls is the hash's doing."""
    text = s.device.config_path.read_text().replace("inventory_interval = 0\n", "inventory_interval = 3600\n")
    s.device.config_path.write_text(text)
    return Agent(load_config(s.device.config_path))


def test_a_change_announced_by_the_hash_arrives_at_the_next_poll_and_is_reported(scene: Scene) -> None:
    s = scene
    agent = in_process(s)
    assert agent.run(once=True) == "idle"  # a start reports and fetches at once
    fetched = s.fetches()
    assert s.inventory()["config_hash"] == h("good") and s.inventory()["config_status"] == "applied"
    assert agent.run(once=True) == "idle"
    assert s.fetches() == fetched, "the same hash: nothing fetched"
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "10.0.0.2"}, h("second")
    reports = len(s.server.inventory)
    assert agent.run(once=True) == "idle"
    assert s.fetches() == fetched + 1
    assert s.env.read_text() == "DEVICE_ID=cam-1\nDVR_IP=10.0.0.2\n"
    assert (s.device.data / "device.env.prev").read_text() == GOOD_ENV
    assert len(s.server.inventory) == reports + 1, "reported in the same poll"
    assert s.inventory()["config_hash"] == h("second") and s.inventory()["config_status"] == "applied"
    assert s.app.checks >= 1, "the application was checked after the change"


def test_a_change_that_breaks_the_application_is_reverted_reported_and_not_retried(scene: Scene) -> None:
    s = scene
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "bad-10.0.0.9"}, h("bad")
    out = s.poll()
    assert out.stdout.strip() == "idle", out.stderr
    assert s.env.read_text() == GOOD_ENV, "the previous device.env is back"
    inv = s.inventory()
    assert inv["config_status"] == "reverted" and inv["config_refused_hash"] == h("bad")
    assert inv["config_hash"] == h("good") and "application health" in inv["config_refused"], inv
    checks = s.app.checks
    for _ in range(2):  # fetched again (the inventory is due at every start here), never applied again
        s.poll()
        assert s.env.read_text() == GOOD_ENV and s.app.checks == checks
        assert s.inventory()["config_status"] == "reverted"
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "10.0.0.3"}, h("fixed")
    s.poll()
    assert s.env.read_text() == "DEVICE_ID=cam-1\nDVR_IP=10.0.0.3\n"
    inv = s.inventory()
    assert inv["config_status"] == "applied" and inv["config_hash"] == h("fixed") and "config_refused" not in inv


def test_a_refused_hash_is_not_even_fetched_again_while_the_server_announces_it(scene: Scene) -> None:
    s = scene
    agent = in_process(s)
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "bad-1"}, h("bad")
    agent.run(once=True)
    assert s.inventory()["config_status"] == "reverted"
    fetched, checks = s.fetches(), s.app.checks
    for _ in range(3):
        agent.run(once=True)
    assert s.fetches() == fetched and s.app.checks == checks and s.env.read_text() == GOOD_ENV
    # the server goes back to the applied configuration: the refusal is over, nothing to fetch
    s.server.configuration, s.server.config_hash = dict(GOOD), h("good")
    agent.run(once=True)
    assert s.fetches() == fetched and s.inventory()["config_status"] == "applied"


@pytest.mark.parametrize("point, config, env_after, status", [
    ("config-applying", {**GOOD, "DVR_IP": "10.0.0.2"}, "DEVICE_ID=cam-1\nDVR_IP=10.0.0.2\n", "applied"),
    ("config-written", {**GOOD, "DVR_IP": "10.0.0.2"}, "DEVICE_ID=cam-1\nDVR_IP=10.0.0.2\n", "applied"),
    ("config-committed", {**GOOD, "DVR_IP": "10.0.0.2"}, "DEVICE_ID=cam-1\nDVR_IP=10.0.0.2\n", "applied"),
    ("config-written", {**GOOD, "DVR_IP": "bad-2"}, GOOD_ENV, "reverted"),
    ("config-reverting", {**GOOD, "DVR_IP": "bad-2"}, GOOD_ENV, "reverted"),
])
def test_power_cut_at_each_step_leaves_a_whole_env(scene: Scene, point: str, config: dict[str, str],
                                                    env_after: str, status: str) -> None:
    """The power goes at ``point``: device.env is the old file or the new one, whole; the next start resolves
    the change (an interrupted one is tried again, a failed one stays reverted) and says so."""
    s = scene
    s.server.configuration, s.server.config_hash = config, h("new")
    new_env = "".join(f"{k}={v}\n" for k, v in sorted(config.items()))
    assert s.poll(fault=point).returncode == EXIT_CODE
    assert s.env.read_text() in (GOOD_ENV, new_env)
    out = s.poll()
    assert out.stdout.strip() == "idle", out.stderr
    assert s.env.read_text() == env_after
    inv = s.inventory()
    assert inv["config_status"] == status, inv
    assert inv["config_hash"] == (h("new") if status == "applied" else h("good"))


def test_a_change_interrupted_twice_is_given_up(scene: Scene) -> None:
    """A configuration whose checks never end because the device goes down each time (a power cut, or the
    configuration makes it reboot): the second interruption reverts it for good."""
    s = scene
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "10.0.0.7"}, h("loop")
    assert s.poll(fault="config-written").returncode == EXIT_CODE
    assert s.poll(fault="config-written").returncode == EXIT_CODE  # recovered, tried again, down again
    out = s.poll()
    assert out.stdout.strip() == "idle", out.stderr
    assert s.env.read_text() == GOOD_ENV
    inv = s.inventory()
    assert inv["config_status"] == "reverted" and "interrupted 2 times" in inv["config_refused"], inv


def test_an_application_that_failed_before_the_change_keeps_the_new_configuration(scene: Scene) -> None:
    """The change is not what broke it (and may be what fixes it): applied, with a note, not reverted."""
    s = scene
    s.app.down = True
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "10.0.0.8"}, h("while-down")
    s.poll()
    assert s.env.read_text() == "DEVICE_ID=cam-1\nDVR_IP=10.0.0.8\n"
    inv = s.inventory()
    assert inv["config_status"] == "applied" and inv["config_hash"] == h("while-down")
    assert "as it did before the change" in inv["config_refused"]


# ------------------------------------------------------------------ attack stories

@pytest.mark.parametrize("header", ["abc", "A" * 64, "g" * 64, "0" * 65, "../" * 21 + "a", ""])
def test_a_hash_header_that_is_not_64_hex_digits_is_ignored_and_logged_once(
        scene: Scene, header: str, caplog: pytest.LogCaptureFixture) -> None:
    s = scene
    agent = in_process(s)
    s.server.configuration, s.server.config_hash = {**GOOD, "DVR_IP": "10.0.0.4"}, header
    with caplog.at_level(logging.WARNING):
        agent.run(once=True)  # the start's fetch: applied, under the values' own hash
        fetched = s.fetches()
        for _ in range(3):
            agent.run(once=True)
    assert s.fetches() == fetched, "a malformed hash is no reason to fetch"
    assert s.env.read_text() == "DEVICE_ID=cam-1\nDVR_IP=10.0.0.4\n"
    assert s.inventory()["config_hash"] != header and len(s.inventory()["config_hash"]) == 64
    warnings = [r for r in caplog.records if "X-VV-Config-Hash ignored" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("variables", [{"LD_PRELOAD": "/data/evil.so"}, {"UNDECLARED": "1"},
                                       {"DVR_IP": "10.0.0.1\nLD_PRELOAD=/data/evil.so"}])
def test_an_announced_configuration_cannot_set_a_variable_the_image_does_not_declare(
        scene: Scene, variables: dict[str, str]) -> None:
    s = scene
    agent = in_process(s)
    agent.run(once=True)
    checks = s.app.checks
    s.server.configuration, s.server.config_hash = {**GOOD, **variables}, h("evil")
    agent.run(once=True)
    assert s.env.read_text() == GOOD_ENV and s.app.checks == checks, "never written, never checked"
    inv = s.inventory()
    assert inv["config_status"] == "refused" and inv["config_refused_hash"] == h("evil")
    assert inv["config_hash"] == h("good")
    fetched = s.fetches()
    agent.run(once=True)
    assert s.fetches() == fetched, "a refused hash is not fetched again"
