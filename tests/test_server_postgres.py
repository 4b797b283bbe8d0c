"""The update server on a real PostgreSQL (a throwaway cluster started here with initdb/pg_ctl): the same
device, deployment and configuration tests as on SQLite."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota_common.tools import find_program, install_hint

from .server_helpers import Server, free_port
from .test_server_config import test_ansible_import, test_device_and_group_variables_with_secrets  # noqa: F401
from .test_server_deployments import (  # noqa: F401
    release,
    test_abort_gives_409,
    test_failure_threshold_pauses_and_resume,
    test_full_deployment_and_next_variants,
    test_next_in_the_three_forms_mender_client_3_4_sends,
    test_phases_release_devices_in_batches,
    test_retries_and_logs,
)
from .test_server_devices import (  # noqa: F401
    test_preauthorized_device_is_accepted_at_first_request,
    test_tokens_refused_when_missing_bad_expired_rejected_or_decommissioned,
)


def _pg_tool(name: str) -> str:
    path = find_program(name)
    if path is None:
        pytest.fail(f"{name} not found: {install_hint(name)}")
    return str(path)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 (run as the ``postgres`` user when the tests run as root; its
    directory is outside pytest's private temporary tree so that user can reach it)."""
    base = Path(tempfile.mkdtemp(prefix="ota-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    subprocess.run([*as_user, _pg_tool("initdb"), "-D", str(data), "-A", "trust", "-U", "ota"], check=True,
                   capture_output=True, cwd=base)
    pg_ctl = _pg_tool("pg_ctl")
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, cwd=base)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([_pg_tool("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "ota", "-d", "postgres",
                              "-c", "CREATE DATABASE ota"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, (base / "log").read_text()
            time.sleep(0.3)
        yield f"postgresql://ota@127.0.0.1:{port}/ota"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", name="server")
def pg_server(postgres: str, tmp_path_factory: pytest.TempPathFactory,
              keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("server"), "--release-key", str(keys["ec"][1]),
               "--release-key", str(keys["rsa"][1]), db_url=postgres).start()
    yield s
    s.stop()


def test_restart_on_postgres(server: Server) -> None:
    """Migrations at start are idempotent: a restart on the same database keeps the devices."""
    from .server_helpers import Device

    dev = Device(server)
    device_id = dev.accept()
    server.stop()
    server.start()
    assert dev.next().status_code == 204
    with server.admin() as a:
        assert a.get(f"/api/management/v2/devauth/devices/{device_id}").json()["status"] == "accepted"


def test_log_quota_and_non_finite_numbers_on_postgres(server: Server, release: str) -> None:  # noqa: F811
    """The log quota (the counting query, the row lock) and the refusal of NaN/Infinity, which PostgreSQL's
    JSON type does not store."""
    from .server_helpers import Device, deploy

    dev = Device(server)
    device_id = dev.accept()
    dep = deploy(server, name="pg-log", artifact_name=release, devices=[device_id])
    url = f"/api/devices/v1/deployments/device/deployments/{dep}/log"
    big = {"messages": [{"timestamp": f"t{i}", "level": "info", "message": f"line {i} " + "x" * 1000}
                        for i in range(1500)]}  # 1.5 MB: over the default 1 MiB
    assert dev.http.put(url, headers=dev.headers, json=big).status_code == 204
    assert dev.http.put(url, headers=dev.headers, json={"messages": [
        {"timestamp": "t", "level": "info", "message": "more"}]}).status_code == 413
    with server.admin() as a:
        text = a.get(f"/api/management/v1/deployments/deployments/{dep}/devices/{device_id}/log").text
        assert text.startswith("t0 info: line 0 ") and "line 1499 " in text.splitlines()[-1] and "log quota" in text
        assert a.get(f"/ui/deployments/{dep}/devices/{device_id}/log").status_code == 200
    r = dev.http.put("/api/devices/v1/inventory/device/attributes", headers={**dev.headers,
                     "Content-Type": "application/json"}, content=b'[{"name": "x", "value": Infinity}]')
    assert r.status_code == 400 and "finite" in r.json()["error"], r.text
