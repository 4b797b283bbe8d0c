"""Scenario 5: the network goes away in the middle of the download (the server stops) and comes back; the
agent resumes with HTTP Range from where it was, the artifact is verified end to end, and the update
completes with ``success``."""

from __future__ import annotations

import time
from typing import Any

import pytest

from image.vm import Vm
from ota_server.process import OtaServer

from .conftest import Fleet

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


def onboard(server: OtaServer, vm: Vm) -> dict[str, Any]:
    vm.wait_for(lambda: any(d["status"] == "pending" for d in server.devices()), 600)
    device = next(d for d in server.devices() if d["status"] == "pending")
    server.accept(device)
    vm.wait_for(lambda: server.attributes(device["id"]).get("artifact_name") == "vv-video-ai-1.0.0", 300)
    return device


def test_download_resumes_after_the_server_was_gone(fleet: Fleet, server: OtaServer, device: Vm) -> None:
    dev = onboard(server, device)
    assert server.upload_artifact(fleet.artifact("2.0.0")).status == 201
    dep = server.deploy("to 2.0.0", "vv-video-ai-2.0.0", [dev["id"]])
    mark = device.mark()
    device.wait_for("] downloading ", 300, since=mark)
    time.sleep(15)  # well into the download (about 2 MB/s here)
    server.stop()
    device.wait_for("download interrupted at byte", 300, since=mark)
    time.sleep(20)
    server.start()
    device.wait_for("ota-boot: slot=B part=3 upgrade_available=1 bootcount=1", 1500, since=mark)
    device.wait_for(lambda: server.statistics(dep) == {"success": 1}, 900)
    assert "with HTTP Range" in device.console()[mark:], "the agent did not say it resumed with Range"
    device.wait_for(lambda: server.attributes(dev["id"]).get("artifact_name") == "vv-video-ai-2.0.0", 180)
