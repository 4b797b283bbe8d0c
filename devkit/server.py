"""The update server as a child process (``python build.py server`` on 127.0.0.1 and a free port), for the
demo, the tests, the QEMU harness and the benchmark.

A :class:`ServerProcess` is also the :class:`~devkit.client.ManagementClient` of the server it started, so a
test talks to ``server.get(...)`` directly. It runs in its own session (stopping it stops uvicorn's workers
too), writes its output to ``workdir/server.log``, and is ready when its readiness path answers; a server that
exits or does not answer raises :class:`ServerStartError` with the log's tail, never an ``AssertionError``."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from devkit.client import ManagementClient
from devkit.net import free_port
from devkit.wait import WaitTimeout, disk_free, log_tail, wait_until
from ota_common.errors import DownloadError, ToolError

REPO = Path(__file__).resolve().parent.parent


class ServerStartError(ToolError):
    """A server process exited, or did not answer in time (the message has the tail of its log)."""


class ServerProcess(ManagementClient):
    """An HTTP server started as a child process on ``127.0.0.1:port`` (a free one unless given); subclasses say
    what to run (:meth:`command`). With ``tls`` the URL is https and requests verify the server against
    ``ca_file`` (else the system's CAs). ``env`` is added to this process's environment."""

    #: method and path that answer 200 or 204 once the server is up
    ready: tuple[str, str] = ("GET", "/health")

    def __init__(self, workdir: Path, *, port: int | None = None, tls: tuple[Path, Path] | None = None,
                 ca_file: Path | None = None, admin_token: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if tls else None
        super().__init__(f"{'https' if tls else 'http'}://127.0.0.1:{self.port}", admin_token or uuid.uuid4().hex,
                         context=context)

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def start(self, timeout: float = 30.0) -> Self:
        """Start the process and wait until it answers; stopped again when it does not.

        Raises :class:`ServerStartError` (with the log's tail) when it exits or does not answer in time."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(), cwd=self.workdir,
                                         start_new_session=True)
        proc = self.proc
        method, path = self.ready

        def answers() -> bool:
            if proc.poll() is not None:
                raise ServerStartError(f"the server exited with {proc.returncode} before answering on {self.url}:"
                                       f"\n{self.log_tail()}")
            try:
                return self.request(method, path, timeout=5).status in (200, 204)
            except DownloadError:  # not listening yet (or a TLS handshake that fails: the log says why)
                return False

        try:
            wait_until(answers, timeout, 0.1, f"the server on {self.url}")
        except WaitTimeout as e:
            self.stop()
            raise ServerStartError(f"{e}; {disk_free(self.workdir)}; server log tail:\n{self.log_tail()}") from None
        except ServerStartError:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """SIGTERM to the process group, SIGKILL after 20 s; returns the exit code (None: never started)."""
        proc = self.proc
        if proc is None:
            return None
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode

    def log_tail(self, lines: int = 80) -> str:
        return log_tail(self.log_path, lines)


class OtaServer(ServerProcess):
    """``python build.py server`` with its own database (SQLite in ``workdir`` unless ``db_url``) and storage
    directory, trusting ``release_key`` (if given), with ``args`` added to its command line. The admin token
    (generated unless given) goes to the server in ``$OTA_ADMIN_TOKEN``; ``$OTA_RELEASE_KEYS`` is not passed
    on, so the server trusts only the keys given here."""

    def __init__(self, workdir: Path, release_key: Path | None = None, *args: str, db_url: str | None = None,
                 workers: int | None = None, port: int | None = None, tls: tuple[Path, Path] | None = None,
                 ca_file: Path | None = None, admin_token: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(workdir, port=port, tls=tls, ca_file=ca_file, admin_token=admin_token, env=env)
        self.release_key = release_key
        self.args = list(args)
        self.workers = workers
        self.storage = workdir / "storage"
        self.db_path = workdir / "ota.sqlite"
        self.db_url = db_url or f"sqlite:///{self.db_path}"

    def command(self) -> list[str]:
        cmd = [sys.executable, str(REPO / "build.py"), "server", "--db", self.db_url, "--storage", str(self.storage),
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        if self.release_key is not None:
            cmd += ["--release-key", str(self.release_key)]
        if self.tls is not None:
            cmd += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return [*cmd, *self.args]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "OTA_ADMIN_TOKEN": self.admin_token, "PYTHONPATH": str(REPO)}
        env.pop("OTA_RELEASE_KEYS", None)
        return {**env, **self.env}
