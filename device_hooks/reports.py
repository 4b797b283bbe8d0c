"""Status reports and deployment logs that must reach the server, whatever happens in between.

A report is queued in the agent's state (on ``/data``) before it is sent, one queue per deployment, and
leaves the queue only when the server took it (204), said the deployment was aborted (409: that deployment's
queue is dropped) or refused it for good (another 4xx: the report is dropped and logged, so a restored
database or a re-accepted device cannot jam every later deployment behind it). A network error or a 5xx
keeps everything for the next cycle. When ``/data`` is full the report is still sent; it just is not kept.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ota_common.errors import OTAError

from . import validate
from .agentstate import Report, StateStore
from .api import Aborted, DeviceAPI, Rejected, ServerError, Unauthorized

log = logging.getLogger("ota-agent")


class DeploymentLog:
    """``<state_dir>/logs/<deployment>.jsonl``: the lines uploaded with a failure report. Writing it never fails
    the deployment: on a full ``/data`` the line still goes to the agent's own log."""

    def __init__(self, state_dir: Path, now: Callable[[], float]) -> None:
        self.dir = state_dir / "logs"
        self.now = now

    def path(self, dep_id: str) -> Path:
        return validate.under(self.dir, f"{validate.deployment_id(dep_id, local_ok=True)}.jsonl")

    def write(self, dep_id: str, level: str, message: str) -> None:
        getattr(log, level if level in ("info", "warning", "error") else "info")("[%s] %s", dep_id[:8], message)
        line = json.dumps({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now())),
                           "level": level, "message": message})
        try:
            path = self.path(dep_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.error("deployment log of %s not kept on disk: %s", dep_id[:8], e.strerror)

    def messages(self, dep_id: str) -> list[dict[str, str]]:
        try:
            lines = self.path(dep_id).read_text().splitlines()
        except (FileNotFoundError, validate.UntrustedInput):
            return []
        out = []
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append({str(k): str(v) for k, v in value.items()})
        return out


class Outbox:
    def __init__(self, store: StateStore, api: Callable[[], DeviceAPI], logs: DeploymentLog) -> None:
        self.store = store
        self.api = api
        self.logs = logs

    def _save(self) -> None:
        try:
            self.store.save()
        except OSError as e:
            log.error("agent state not saved (%s); reports are sent but not kept", e.strerror)

    def add(self, dep_id: str, status: str, substate: str = "", *, upload_log: bool = False) -> None:
        """Queue a report and try to send everything queued. Raises :class:`Aborted` when the server says
        ``dep_id`` was aborted."""
        self.queue(dep_id, status, substate, upload_log=upload_log)
        self._save()
        if dep_id in self.flush():
            raise Aborted(f"deployment {dep_id} was aborted")

    def pending(self, dep_id: str) -> list[Report]:
        return list(self.store.state.outbox.get(dep_id, []))

    def flush(self) -> set[str]:
        """Send queued reports in order, deployment by deployment. Returns the deployments the server
        reported aborted. A network or server error stops the flush (the rest stays queued); so does a 401
        that a new authentication does not cure (authenticated once per flush)."""
        outbox = self.store.state.outbox
        aborted: set[str] = set()
        if not outbox:
            return aborted
        reauthenticated = False
        try:
            for dep_id in list(outbox):
                queue = outbox[dep_id]
                while queue:
                    try:
                        self._send(dep_id, queue[0])
                    except Aborted:
                        aborted.add(dep_id)
                        queue.clear()
                        break
                    except Rejected as e:
                        log.warning("report %s for %s dropped: the server refuses it for good (%s)",
                                    queue[0].status, dep_id[:8], e)
                    except Unauthorized as e:
                        if reauthenticated:
                            log.warning("reports queued: still unauthorised after authenticating again (%s)", e)
                            return aborted
                        reauthenticated = True
                        try:
                            self.api().authenticate()
                        except (ServerError, OTAError) as auth_error:
                            log.warning("reports queued: cannot authenticate (%s)", auth_error)
                            return aborted
                        continue
                    except (ServerError, OTAError) as e:
                        log.warning("report %s for %s queued: %s", queue[0].status, dep_id[:8], e)
                        return aborted
                    queue.pop(0)
                if not queue:
                    outbox.pop(dep_id, None)
        finally:
            self._save()  # only reached with something queued: a poll with nothing to send writes nothing
        return aborted

    def queue(self, dep_id: str, status: str, substate: str = "", *, upload_log: bool = False) -> None:
        """Queue a report without saving or sending (the caller saves it with the change it belongs to)."""
        self.store.state.outbox.setdefault(dep_id, []).append(Report(status, substate[:900], upload_log))

    def _send(self, dep_id: str, report: Report) -> None:
        api = self.api()
        if report.log:
            messages = self.logs.messages(dep_id) or [
                {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": "error",
                 "message": report.substate or "failure"}]
            try:
                api.upload_log(dep_id, messages)
            except Rejected as e:  # the status matters more than its log
                log.warning("log of %s not taken by the server (%s); sending the status without it", dep_id[:8], e)
        api.report_status(dep_id, report.status, report.substate)


__all__ = ["DeploymentLog", "Outbox"]
