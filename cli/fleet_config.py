"""``build.py fleet config get|set``: the configuration variables of a device or a group (the per-device ``.env``
values such as ``DEVICE_ID`` and ``DVR_IP``).

The API replaces an owner's variables as a whole and shows secrets only as ``********``; writing that mask back
as a secret's value keeps the stored secret. So ``set`` reads the owner's variables, changes the named ones, and
writes everything back with the other secrets still masked: a secret the operator did not name is kept without
ever leaving the server. A value that is the mask itself is refused on the command line (it would be stored
literally for a new secret). Secrets typed at a prompt (``--secret NAME`` without ``NAME=VALUE``) stay out of
the shell's history and the process list.

Read-modify-write is not atomic: a change another operator makes to the same owner between the read and the write
is overwritten (the audit log shows both).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from ota_common.errors import UserError
from ota_common.varnames import MAX_VALUE, SECRETS_KEY, is_group_name, is_var_name

from .fleet import SERVER_OPTION, Management, ServerRefused, fleet, management
from .fleet_view import (
    CONFIG,
    clean,
    console,
    get_or_unknown,
    name_values,
    print_json,
    row,
    section,
    seg,
    short_time,
    table,
)

#: what the server shows instead of a secret's value (ota_server.configvars.SECRET_MASK)
SECRET_MASK = "********"


def owner_path(device: str | None, group: str | None) -> tuple[str, str]:
    """(API path, description) of the one owner given. Raises UserError unless exactly one."""
    if (device is None) == (group is None):
        raise UserError("give the owner one way: --device ID or --group G")
    if group is not None:
        if not is_group_name(group):
            raise UserError(f"invalid group name {clean(group)!r}: use 1-64 characters A-Z a-z 0-9 _ -")
        return f"{CONFIG}/group/{seg(group)}", f"group {group}"
    assert device is not None
    return f"{CONFIG}/device/{seg(device)}", f"device {clean(device)}"


def owner_options(f: Any) -> Any:
    f = click.option("--group", metavar="G", help="The variables of this group (its devices receive them).")(f)
    return click.option("--device", metavar="ID", help="The variables of this device.")(f)


@fleet.group("config")
def config() -> None:
    """Configuration variables of a device or a group (what devices receive as their .env; a device gets its
    group's variables overridden by its own). Secrets are shown as ********."""


@config.command("get")
@owner_options
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@SERVER_OPTION
def config_get(device: str | None, group: str | None, as_json: bool, server: str | None) -> None:
    """Show the variables of --device ID (its own, and what it receives with its group's) or --group G."""
    path, who = owner_path(device, group)
    doc = get_or_unknown(management(server), path, who)
    if as_json:
        print_json(doc)
        return
    own = doc.get("configured") or {}
    if device is not None:
        values = doc.get("effective") or {}
        secret = set(doc.get("effective_secrets") or [])
        title = f"{who} (group {clean(doc.get('group') or '-')}), what it receives"
    else:
        values, secret, title = own, set(doc.get("secrets") or []), who
    t = table("NAME", "VALUE", "FROM", "SECRET")
    for name, value in sorted(values.items()):
        row(t, name, value, "device" if device is not None and name in own else "group", "yes" if name in secret else "")
    out = console()
    section(out, title, t)
    out.print(f"{len(values)} variable(s); {who}'s own last changed {short_time(doc.get('updated_ts')) or 'never'} UTC")


def plan(current: dict[str, str], secrets: set[str], assignments: Sequence[tuple[str, str]],
         secret_names: Sequence[str], unset: Sequence[str], ask: Callable[[str], str | None] | None = None
         ) -> tuple[dict[str, Any], list[str]]:
    """The body to PUT and a summary of the change (names only). ``current`` is the masked answer of a GET.
    ``ask(name)`` returns a secret's value typed at a prompt (None: no prompt possible). Raises UserError
    before anything is written."""
    for name in [*(n for n, _ in assignments), *secret_names, *unset]:
        if not is_var_name(name):
            raise UserError(f"invalid variable name {clean(name)!r}: letters, digits, _ . - (not starting with a digit)")
    assigned = dict(assignments)
    both = sorted(set(assigned) & set(unset)) or sorted(set(secret_names) & set(unset))
    if both:
        raise UserError(f"{', '.join(both)}: both set and unset")
    for name, value in assigned.items():
        if value == SECRET_MASK:
            raise UserError(f"{name}: {SECRET_MASK} is how the server masks secrets, not a value")
        if len(value) > MAX_VALUE:
            raise UserError(f"{name}: the value is longer than {MAX_VALUE} characters")
    missing = sorted(n for n in unset if n not in current)
    if missing:
        raise UserError(f"cannot unset {', '.join(missing)}: not set here")
    body: dict[str, Any] = {k: v for k, v in current.items() if k not in unset}
    keep_secret = (secrets - set(unset)) | set(secret_names)
    body.update(assigned)
    for name in secret_names:
        if name not in body:
            typed = ask(name) if ask else None
            if typed is None:
                raise UserError(f"--secret {name}: give {name}=VALUE too (or run in a terminal to type it)")
            if not typed or typed == SECRET_MASK:
                raise UserError(f"{name}: an empty value or {SECRET_MASK} is not a secret")
            body[name] = typed
            assigned[name] = typed
    body[SECRETS_KEY] = sorted(keep_secret)
    summary = []
    if assigned:
        summary.append("set " + ", ".join(sorted(assigned)))
    if unset:
        summary.append("unset " + ", ".join(sorted(set(unset))))
    newly = sorted(set(secret_names) - secrets)
    if newly:
        summary.append("secret now: " + ", ".join(newly))
    if not summary:
        raise UserError("nothing to change: give NAME=VALUE, --secret NAME or --unset NAME")
    return body, summary


def prompt_secret(name: str) -> str | None:
    if not sys.stdin.isatty():
        return None
    value: str = click.prompt(f"value of the secret {name}", hide_input=True, confirmation_prompt=True)
    return value


@config.command("set")
@owner_options
@click.argument("assignments", metavar="NAME=VALUE...", nargs=-1)
@click.option("--secret", "secret_names", multiple=True, metavar="NAME",
              help="NAME is a secret (stored encrypted, shown as ********). Without NAME=VALUE the value is asked "
                   "for at a hidden prompt (or an existing plain variable becomes secret).")
@click.option("--unset", multiple=True, metavar="NAME", help="Remove the variable NAME.")
@SERVER_OPTION
def config_set(device: str | None, group: str | None, assignments: Sequence[str], secret_names: Sequence[str],
               unset: Sequence[str], server: str | None) -> None:
    """Change some variables of --device ID or --group G and keep the others, stored secrets included (a secret
    given a new value stays secret). Nothing is written when an argument is wrong."""
    path, who = owner_path(device, group)
    pairs = name_values(assignments, "config set")
    api = management(server)
    doc = get_or_unknown(api, path, who)
    body, summary = plan(doc.get("configured") or {}, set(doc.get("secrets") or []), pairs, secret_names, unset,
                         prompt_secret)
    put(api, path, body)
    click.echo(f"{who}: {'; '.join(summary)}")


def put(api: Management, path: str, body: dict[str, Any]) -> None:
    try:
        api.call("PUT", path, body)
    except ServerRefused as e:
        if e.status in (400, 404):
            raise UserError(f"the server refused the variables: {e.reason}") from None
        raise
