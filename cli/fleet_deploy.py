"""``build.py fleet deploy|status|watch|abort|close|rollback|resume|logs``: deployments through the management API.

Phases are written as the operator thinks of a rollout — how much of the fleet has it by when, counted from the
deployment's creation: ``10%@0,50%@1h,100%@4h``. The API counts each phase's share and its wait after the
previous phase (:func:`phases_body` converts), and the last phase takes the rest.

``watch`` polls the deployment, its statistics and its devices every few seconds: a live table on a terminal,
else one line per change (a CI log). It ends when the deployment does: exit 0 when it finished with no failed
device, 1 when devices failed or it was aborted, so a script can ``deploy`` and ``watch`` and trust the status.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.text import Text

from ota_common.errors import OTAError, UserError
from ota_common.varnames import is_group_name

from .fleet import SERVER_OPTION, Management, ServerRefused, fleet, management
from .fleet_view import (
    DEPLOYMENTS,
    clean,
    console,
    get_or_unknown,
    list_devices,
    name_values,
    paged,
    print_json,
    row,
    seg,
    short_time,
    table,
)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WAIT = 366 * 86400
#: attributes of a filter the server keeps (a dynamic deployment's)
MAX_FILTERS = 8
#: deployment statuses after which nothing moves any more
ENDED = ("finished", "aborted")
FAILED = ("failure", "aborted", "noartifact", "decommissioned")
DEPLOYMENT_STATUSES = ("pending", "inprogress", "paused", "finished", "aborted")


class DeploymentUnsuccessful(OTAError):
    """``watch`` saw the deployment end with failed devices, or aborted (exit status 1)."""


def duration(text: str, what: str) -> float:
    """Seconds: ``0``, ``90``, ``90s``, ``30m``, ``1h``, ``2d``. Raises UserError naming ``what``."""
    m = re.fullmatch(r"(\d{1,9})([smhd]?)", text.strip().lower())
    if not m:
        raise UserError(f"{what}: {clean(text)!r} is not a duration (seconds, or 90s, 30m, 1h, 2d)")
    seconds = int(m.group(1)) * UNITS.get(m.group(2), 1)
    if seconds > MAX_WAIT:
        raise UserError(f"{what}: {clean(text)!r} is longer than 366 days")
    return float(seconds)


def parse_phases(spec: str) -> list[tuple[int, float]]:
    """``10%@0,50%@1h,100%@4h`` → ``[(10, 0), (50, 3600), (100, 14400)]``: the share of the devices (percent,
    cumulative) that has the deployment by each time after creation. ``P%`` without ``@`` starts with the phase
    before (the first: at once). Raises UserError for anything else."""
    out: list[tuple[int, float]] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d{1,3})\s*%\s*(?:@\s*(\S+))?\s*", item)
        if not m:
            raise UserError(f"--phases: {clean(item)!r} is not PERCENT%[@WAIT] (e.g. 10%@0,50%@1h,100%@4h)")
        pct = int(m.group(1))
        at = duration(m.group(2), "--phases") if m.group(2) else (out[-1][1] if out else 0.0)
        if not 1 <= pct <= 100 or (out and pct <= out[-1][0]):
            raise UserError(f"--phases: the shares must grow from 1% to 100% ({clean(spec)!r})")
        if out and at < out[-1][1]:
            raise UserError(f"--phases: the times must not go back ({clean(spec)!r})")
        out.append((pct, at))
    if out[-1][0] != 100:
        raise UserError(f"--phases: the last phase must reach 100% ({clean(spec)!r})")
    return out


def phases_body(phases: Sequence[tuple[int, float]]) -> list[dict[str, Any]]:
    """The API's phases: each phase's own share (the last one omitted: it takes the rest) and its wait after
    the previous phase's start."""
    body: list[dict[str, Any]] = []
    prev_pct, prev_at = 0, 0.0
    for i, (pct, at) in enumerate(phases):
        p: dict[str, Any] = {"wait_s": at - prev_at}
        if i < len(phases) - 1:
            p["batch_size"] = pct - prev_pct
        body.append(p)
        prev_pct, prev_at = pct, at
    return body


def percent(text: str, what: str = "--failure-threshold") -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100:
        raise UserError(f"{what}: {clean(text)!r} is not a percentage from 0 to 100")
    return value


def parse_gate(text: str) -> dict[str, float]:
    """``90%+1h`` → ``{"min_success_pct": 90, "soak_s": 3600}`` (the soak defaults to 0)."""
    pct, _, soak = text.partition("+")
    value = percent(pct, "--gate")
    if value <= 0:
        raise UserError(f"--gate: {clean(text)!r}: the share must be above 0 %")
    return {"min_success_pct": value, "soak_s": duration(soak, "--gate") if soak else 0.0}


def split_ids(values: Sequence[str]) -> list[str]:
    return [i for v in values for i in re.split(r"[,\s]+", v) if i]


@fleet.command("deploy")
@click.argument("artifact_name")
@click.option("--devices", "--device", "devices", multiple=True, metavar="ID[,ID...]",
              help="These devices (repeat, or separate with commas); they get it in this order (canaries first).")
@click.option("--group", metavar="G",
              help="The accepted devices of this group (resolved now unless --dynamic).")
@click.option("--all", "all_devices", is_flag=True, help="Every accepted device.")
@click.option("--filter", "filters", multiple=True, metavar="NAME=VALUE",
              help="Accepted devices whose identity or inventory attribute NAME is VALUE (repeat: all must match; "
                   "with --group: within the group); resolved now into a device list. With --dynamic the server "
                   "keeps it (inventory attributes only, string values, up to 8) and adds devices that match later.")
@click.option("--name", help="A name for the deployment (default: ARTIFACT_NAME and the target).")
@click.option("--phases", metavar="P%@WAIT,...",
              help="Phased rollout: the share of the devices reached by each time after creation, e.g. "
                   "10%@0,50%@1h,100%@4h (WAIT: seconds, or 90s, 30m, 1h, 2d; the last must be 100%). Default: all "
                   "at once.")
@click.option("--failure-threshold", metavar="PERCENT",
              help="Pause the rollout when more than PERCENT % of the finished devices failed (resume with "
                   "fleet resume).")
@click.option("--gate", metavar="PCT%[+SOAK]",
              help="Health-gated phases: each phase after the first starts only when PCT % of the devices of the "
                   "phases before reported success (committed after a passing health check) and the last success "
                   "is SOAK old (e.g. 90%+1h), and not before its --phases time.")
@click.option("--failure-limit", metavar="PERCENT",
              help="When more than PERCENT % of the devices handed out failed or rolled back: --on-failure.")
@click.option("--on-failure", type=click.Choice(["pause", "abort"]), default="pause", show_default=True,
              help="What --failure-limit does (resume a paused rollout with fleet resume).")
@click.option("--dynamic", is_flag=True,
              help="With --group, --all or --filter: devices that join later (accepted, moved into the group, or "
                   "whose inventory comes to match) get it too, until fleet close DEPLOYMENT.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Times a device that reports failure may try again.")
@click.option("--allow-downgrade", is_flag=True,
              help="Devices install it even when it is older than what they run (a fleet rollback; never below a "
                   "device's security floor).")
@click.option("--json", "as_json", is_flag=True, help="Print {\"id\": ...} as JSON.")
@SERVER_OPTION
def deploy(artifact_name: str, devices: Sequence[str], group: str | None, all_devices: bool,
           filters: Sequence[str], name: str | None, phases: str | None, failure_threshold: str | None,
           gate: str | None, failure_limit: str | None, on_failure: str, dynamic: bool,
           retries: int, allow_downgrade: bool, as_json: bool, server: str | None) -> None:
    """Deploy the release ARTIFACT_NAME (uploaded with build.py publish) to --devices, a --group, --all or the
    devices a --filter selects; prints the deployment's id (watch it with fleet watch ID)."""
    ids = split_ids(devices)
    wanted = name_values(filters, "--filter")
    if sum([bool(ids), bool(group) and not wanted, all_devices, bool(wanted)]) != 1:
        raise UserError("choose the devices one way: --devices ID,..., --group G, --all, or --filter NAME=VALUE "
                        "(with --group to narrow it)")
    if group is not None and not is_group_name(group):
        raise UserError(f"invalid group name {clean(group)!r}: use 1-64 characters A-Z a-z 0-9 _ -")
    body: dict[str, Any] = {"artifact_name": artifact_name, "allow_downgrade": allow_downgrade, "retries": retries}
    if phases is not None:
        body["phases"] = phases_body(parse_phases(phases))
    if failure_threshold is not None:
        body["failure_threshold"] = percent(failure_threshold)
    if gate is not None:
        if phases is None or len(body["phases"]) < 2:
            raise UserError("--gate needs --phases with at least two phases (it gates every phase after the first)")
        for phase in body["phases"][1:]:
            phase["gate"] = parse_gate(gate)
    if failure_limit is not None:
        body["failure_limit"] = {"max_failed_pct": percent(failure_limit, "--failure-limit"), "on_failure": on_failure}
    if dynamic:
        if not (group or all_devices or wanted) or ids:
            raise UserError("--dynamic goes with --group G, --all or --filter NAME=VALUE (a device list is fixed now)")
        body["dynamic"] = True
    api = management(server)
    if wanted and dynamic:  # the server keeps the filter and adds the devices whose inventory comes to match
        if len(wanted) > MAX_FILTERS or len(dict(wanted)) != len(wanted):
            raise UserError(f"--filter with --dynamic: 1-{MAX_FILTERS} attributes, each named once")
        body["filter"] = dict(wanted)
        if group:
            body["group"] = group
        aim = ",".join(f"{n}={v}" for n, v in wanted) + (f" in {group}" if group else "") + " (dynamic)"
    elif wanted:
        chosen = [d["id"] for d in list_devices(api, "accepted", group, wanted)]
        if not chosen:
            raise UserError("no accepted device matches " + " and ".join(f"{n}={v}" for n, v in wanted)
                            + (f" in group {group}" if group else ""))
        body["devices"] = chosen
        aim = ",".join(f"{n}={v}" for n, v in wanted)
    elif ids:
        body["devices"] = ids
        aim = ids[0] if len(ids) == 1 else f"{len(ids)} devices"
    elif group:
        body["group"] = group
        aim = f"group {group}"
    else:
        body["all_devices"] = True
        aim = "all devices"
    body["name"] = name or f"{artifact_name} → {aim}"[:256]
    try:
        created = api.response("POST", DEPLOYMENTS, body).headers.get("location", "").rstrip("/").rsplit("/", 1)[-1]
    except ServerRefused as e:
        if e.status == 400:  # the server's reason is about the input: an artifact or a device it does not know
            raise UserError(f"the server refused the deployment: {e.reason}") from None
        raise
    if as_json:
        print_json({"id": created})
    else:
        click.echo(created)


# ---------------------------------------------------------------------------------------------------------
# Status


def snapshot(api: Management, deployment_id: str) -> dict[str, Any]:
    path = f"{DEPLOYMENTS}/{seg(deployment_id)}"
    dep = get_or_unknown(api, path, f"deployment {clean(deployment_id)!r}")
    return {"deployment": dep, "statistics": api.call("GET", f"{path}/statistics"),
            "devices": list(paged(api, f"{path}/devices"))}


def stats_line(stats: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if v) or "no devices"


def target_text(target: dict[str, Any]) -> str:
    if isinstance(target.get("filter"), dict):
        return (f"group {target['group']}, " if "group" in target else "") + "inventory " + " and ".join(
            f"{n}={v}" for n, v in target["filter"].items())
    if "group" in target:
        return f"group {target['group']}"
    if isinstance(target.get("devices"), list):
        return f"{len(target['devices'])} listed device(s)"
    return "all accepted devices" if target.get("all_devices") else clean(target)


def deployment_view(snap: dict[str, Any], max_rows: int | None = None) -> Group:
    d = snap["deployment"]
    head = table("", "", header=False)
    row(head, "name", d["name"])
    row(head, "artifact", d["artifact_name"])
    row(head, "status", d["status"])
    row(head, "target", target_text(d["target"]))
    row(head, "created (UTC)", short_time(d["created"]))
    row(head, "finished (UTC)", short_time(d["finished"]))
    row(head, "phases", "; ".join(f"{p.get('batch_size')}% from {short_time(p.get('start_ts'))}" for p in d["phases"]))
    row(head, "failure threshold", None if d["failure_threshold"] is None else f"{d['failure_threshold']}%")
    row(head, "devices", f"{d['device_count']}: {stats_line(snap['statistics'])}")
    devs = snap["devices"]
    if max_rows is not None and len(devs) > max_rows:  # the live view: unfinished devices first
        devs = sorted(devs, key=lambda x: x["finished"] is not None)[:max_rows]
    t = table("DEVICE", "STATUS", "SUBSTATE", "PHASE", "ATTEMPTS", "FINISHED (UTC)")
    for x in devs:
        row(t, x["id"], x["status"], x["substate"], str(x["phase"]), str(x["attempts"]), short_time(x["finished"]))
    return Group(Text(f"deployment {clean(d['id'])}", style="bold"), head, Text(""), t)


@fleet.command("status")
@click.argument("deployment_id", metavar="[DEPLOYMENT]", required=False)
@click.option("--status", type=click.Choice(DEPLOYMENT_STATUSES), help="List only deployments with this status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="List at most this many (newest first).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of tables.")
@SERVER_OPTION
def status(deployment_id: str | None, status: str | None, limit: int, as_json: bool, server: str | None) -> None:
    """One deployment (its statistics and devices), or the list of deployments with their progress."""
    api = management(server)
    if deployment_id:
        snap = snapshot(api, deployment_id)
        if as_json:
            print_json(snap)
        else:
            console().print(deployment_view(snap))
        return
    params = {"per_page": str(limit), **({"status": status} if status else {})}
    deps = api.call("GET", DEPLOYMENTS, params=params)
    for d in deps:
        d["statistics"] = api.call("GET", f"{DEPLOYMENTS}/{seg(d['id'])}/statistics")
    if as_json:
        print_json(deps)
        return
    if not deps:
        click.echo("no deployments" + (f" {status}" if status else ""))
        return
    t = table("ID", "NAME", "ARTIFACT", "STATUS", "DEVICES", "PROGRESS", "CREATED (UTC)")
    for d in deps:
        row(t, d["id"], d["name"], d["artifact_name"], d["status"], str(d["device_count"]),
            stats_line(d["statistics"]), short_time(d["created"]))
    console().print(t)


# ---------------------------------------------------------------------------------------------------------
# Watch


def changes(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What moved between two snapshots, one line each (device text cleaned); the first snapshot shows the
    deployment and the devices that have left ``pending`` (not one line per waiting device of a large fleet)."""
    lines = []
    d = now["deployment"]
    if before is None or before["deployment"]["status"] != d["status"]:
        lines.append(f"deployment {d['id']} {d['status']}: {stats_line(now['statistics'])}")
    old = {x["id"]: x for x in before["devices"]} if before else {}
    for x in now["devices"]:
        o = old.get(x["id"])
        if before is None and x["status"] == "pending":
            continue
        if o is None or (o["status"], o["substate"], o["attempts"]) != (x["status"], x["substate"], x["attempts"]):
            was = f"{o['status']} → " if o else ""
            sub = f" ({clean(x['substate'])})" if x["substate"] else ""
            lines.append(f"device {x['id']} {was}{x['status']}{sub}")
    return lines


def outcome(snap: dict[str, Any]) -> None:
    """Raise DeploymentUnsuccessful unless the deployment finished without a failed device."""
    d, stats = snap["deployment"], snap["statistics"]
    failed = sum(stats.get(k, 0) for k in FAILED)
    if d["status"] == "aborted":
        raise DeploymentUnsuccessful(f"deployment {d['id']} was aborted: {stats_line(stats)}")
    if failed:
        raise DeploymentUnsuccessful(f"deployment {d['id']} finished with {failed} of {d['device_count']} device(s) "
                                     f"not updated: {stats_line(stats)}")


def watch_loop(fetch: Callable[[], dict[str, Any]], show: Callable[[dict[str, Any] | None, dict[str, Any]], None],
               interval: float, timeout: float | None, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Fetch and show until the deployment ends (or ``timeout`` seconds pass: UserError)."""
    start = time.monotonic()
    before = None
    while True:
        snap = fetch()
        show(before, snap)
        if snap["deployment"]["status"] in ENDED:
            return snap
        if timeout is not None and time.monotonic() - start > timeout:
            raise UserError(f"deployment {snap['deployment']['id']} is still {snap['deployment']['status']} after "
                            f"--timeout: {stats_line(snap['statistics'])}")
        before = snap
        sleep(interval)


@fleet.command("watch")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=3.0, show_default=True,
              help="Seconds between two looks.")
@click.option("--timeout", metavar="DURATION", help="Give up (exit 2) after this long (seconds, or 30m, 2h).")
@SERVER_OPTION
def watch(deployment_id: str, interval: float, timeout: str | None, server: str | None) -> None:
    """Follow DEPLOYMENT until it ends (or Ctrl-C): a live table on a terminal, else one line per change.
    Exit status 0 when it finished with no failed device, 1 when devices failed (or had no artifact, or were
    decommissioned) or it was aborted. A paused deployment (failure threshold) is watched on: resume it with
    fleet resume."""
    api = management(server)
    limit = duration(timeout, "--timeout") if timeout else None
    snapshot(api, deployment_id)  # an unknown id is refused before anything is drawn

    def fetch() -> dict[str, Any]:
        return snapshot(api, deployment_id)

    if sys.stdout.isatty():
        out = console()
        with Live(console=out, auto_refresh=False) as live:
            def draw(_: dict[str, Any] | None, snap: dict[str, Any]) -> None:
                foot = Text(f"\nas of {time.strftime('%H:%M:%S')}; Ctrl-C stops watching (the deployment goes on)",
                            style="dim")
                live.update(Group(deployment_view(snap, max_rows=max(5, out.height - 18)), foot), refresh=True)
            final = watch_loop(fetch, draw, interval, limit)
    else:
        def lines(before: dict[str, Any] | None, snap: dict[str, Any]) -> None:
            for line in changes(before, snap):
                click.echo(f"{time.strftime('%H:%M:%S')} {line}")
            sys.stdout.flush()
        final = watch_loop(fetch, lines, interval, limit)
    outcome(final)


def set_status(server: str | None, deployment_id: str, body: dict[str, Any], done: str,
               conflict: Callable[[dict[str, Any], ServerRefused], str]) -> None:
    """``PUT .../deployments/{id}/status`` with ``body`` on the deployment ``deployment_id`` (an unknown one is a
    one-line error); a 409 becomes the one-line error ``conflict(deployment, refusal)`` says."""
    api = management(server)
    d = get_or_unknown(api, f"{DEPLOYMENTS}/{seg(deployment_id)}", f"deployment {clean(deployment_id)!r}")
    try:
        api.call("PUT", f"{DEPLOYMENTS}/{seg(d['id'])}/status", body)
    except ServerRefused as e:
        if e.status == 409:
            raise UserError(conflict(d, e)) from None
        raise
    click.echo(f"{d['id']}: {done}")


@fleet.command("abort")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@SERVER_OPTION
def abort(deployment_id: str, server: str | None) -> None:
    """Abort DEPLOYMENT: devices that have not finished become aborted (a device in the middle of an install gets
    409 at its next report and rolls back)."""
    set_status(server, deployment_id, {"status": "aborted"}, "aborted",
               lambda d, e: f"deployment {d['id']} has already ended ({d['status']})")


@fleet.command("close")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@SERVER_OPTION
def close(deployment_id: str, server: str | None) -> None:
    """Close a dynamic DEPLOYMENT: devices joining its group from now on do not get it; the devices it has
    finish as usual."""
    set_status(server, deployment_id, {"status": "closed"}, "closed",
               lambda d, e: f"deployment {d['id']} takes no joiners ({e.reason})")


@fleet.command("rollback")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@click.option("--name", help="A name for the rollback (default: rollback of DEPLOYMENT's name).")
@click.option("--phases", metavar="P%@WAIT,...", help="Phased, as for fleet deploy (default: all at once).")
@click.option("--failure-threshold", metavar="PERCENT",
              help="Pause the rollback when more than PERCENT % of the finished devices failed.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer (id, targets, skipped) as JSON.")
@SERVER_OPTION
def rollback(deployment_id: str, name: str | None, phases: str | None, failure_threshold: str | None,
             as_json: bool, server: str | None) -> None:
    """Send every device DEPLOYMENT updated (status success) back to the release it ran before, each to its own.
    Our agent re-arms the inactive slot that still holds it (no download); prints the new deployment's id and
    the devices skipped (what they ran before is unknown, or no longer uploaded)."""
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if phases is not None:
        body["phases"] = phases_body(parse_phases(phases))
    if failure_threshold is not None:
        body["failure_threshold"] = percent(failure_threshold)
    api = management(server)
    try:
        answer = api.call("POST", f"{DEPLOYMENTS}/{seg(deployment_id)}/rollback", body or None)
    except ServerRefused as e:
        if e.status == 404:
            raise UserError(f"no deployment {clean(deployment_id)!r} on the server") from None
        if e.status == 400:
            raise UserError(f"the server refused the rollback: {e.reason}") from None
        raise
    if as_json:
        print_json(answer)
        return
    click.echo(answer["id"])
    targets = ", ".join(f"{n} × {clean(str(k))}" for k, n in answer.get("targets", {}).items())
    click.echo(f"{answer.get('device_count', 0)} device(s) go back: {targets}", err=True)
    for skipped in answer.get("skipped", []):
        click.echo(f"skipped {clean(str(skipped.get('id')))}: {clean(str(skipped.get('reason')))}", err=True)


@fleet.command("resume")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@click.option("--failure-threshold", metavar="PERCENT|none",
              help="A new threshold (else the next failure pauses it again while the ratio stays above the old one).")
@SERVER_OPTION
def resume(deployment_id: str, failure_threshold: str | None, server: str | None) -> None:
    """Resume DEPLOYMENT, paused by its failure threshold."""
    body: dict[str, Any] = {"status": "inprogress"}
    if failure_threshold is not None:
        body["failure_threshold"] = None if failure_threshold == "none" else percent(failure_threshold)
    set_status(server, deployment_id, body, "resumed",
               lambda d, e: f"deployment {d['id']} is {d['status']}: only a paused deployment can be resumed")


@fleet.command("logs")
@click.argument("deployment_id", metavar="DEPLOYMENT")
@click.argument("device_id", metavar="DEVICE")
@SERVER_OPTION
def logs(deployment_id: str, device_id: str, server: str | None) -> None:
    """The deployment log DEVICE uploaded for DEPLOYMENT, one "<time> <level>: <message>" line per message
    (control characters the device sent are shown as \\xNN)."""
    api = management(server)
    get_or_unknown(api, f"{DEPLOYMENTS}/{seg(deployment_id)}", f"deployment {clean(deployment_id)!r}")
    text = log_text(api, deployment_id, device_id)
    click.echo(clean(text, multiline=True), nl=not text.endswith("\n"))


def log_text(api: Management, deployment_id: str, device_id: str) -> str:
    path = f"{DEPLOYMENTS}/{seg(deployment_id)}/devices/{seg(device_id)}/log"
    try:
        return api.response("GET", path).body.decode("utf-8", "replace")
    except ServerRefused as e:
        if e.status == 404:
            raise UserError(f"no log of device {clean(device_id)!r} in deployment {clean(deployment_id)!r}: "
                            f"{e.reason}") from None
        raise
