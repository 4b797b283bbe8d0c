"""Deployment logs: uploaded by devices within a quota, read back by the management API and the dashboard
without loading every row.

Quota (per device and deployment, ``--log-max-bytes`` and ``--log-max-uploads``): an upload that fits is
stored as sent. The first upload that does not fit is stored truncated: its first and last messages that fit
in what is left, and between them one marker message saying how many messages and bytes were dropped; that
uses up the quota. Any upload after that (or past the upload count) is refused with 413 and nothing is stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Connection

from .context import ServerContext
from .devauth import Ctx, Device
from .device_deployments import NO_CONTENT, own_deployment
from .errors import APIError, error_doc, not_found
from .models import deployment_devices as dd
from .models import deployment_logs as logs_t
from .timeutil import now, rfc3339

router = APIRouter(tags=["device API"])

#: bytes kept free for the marker message of a truncated upload
MARKER_RESERVE = 512
#: a message cut to fit gets at least this much room, else it is dropped whole
MIN_CUT = 128
#: rows per query when a log is read
BATCH = 50


class LogMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    timestamp: str = Field(max_length=64)
    level: str = Field(max_length=32)
    message: str


class LogBody(BaseModel):
    messages: list[LogMessage] = Field(max_length=100_000)


def message_size(message: dict[str, Any]) -> int:
    """Bytes a message takes against the quota: its compact UTF-8 JSON."""
    return len(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode())


def _cut(message: dict[str, Any], room: int, keep: str) -> dict[str, Any]:
    """The message with its text shortened to its ``start``, its ``end`` or ``both`` so that it takes at most
    ``room`` bytes; fields other than timestamp, level and message are dropped."""
    base = {"timestamp": str(message.get("timestamp", "")), "level": str(message.get("level", "")), "message": ""}
    text = str(message.get("message", ""))
    keep_bytes = max(0, room - message_size(base) - 16)  # 16: the " [...] " note

    def shortened(n: int) -> str:
        raw = text.encode()
        if keep == "start":
            return raw[:n].decode(errors="ignore") + " [...]"
        if keep == "end":
            return "[...] " + raw[len(raw) - n:].decode(errors="ignore")
        return raw[:n // 2].decode(errors="ignore") + " [...] " + raw[len(raw) - n // 2:].decode(errors="ignore")

    base["message"] = shortened(keep_bytes)
    while message_size(base) > room and keep_bytes > 0:  # JSON escapes made it longer than its bytes
        keep_bytes = keep_bytes * 3 // 4
        base["message"] = shortened(keep_bytes)
    return base


def fit_messages(messages: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], int, int]:
    """Messages that fit in ``budget`` bytes: all of them, or else the first ones (in half the room) and the
    last ones (in the rest) around a marker message; what room is left goes to the messages at the edges of
    the gap, cut (their start, their end, or both ends of a lone one) when at least :data:`MIN_CUT` bytes are
    left for each. Returns (messages to store, messages not stored whole, bytes left out)."""
    sizes = [message_size(m) for m in messages]
    total, n = sum(sizes), len(messages)
    if total <= budget:
        return messages, 0, 0
    room = max(0, budget - MARKER_RESERVE)
    left = room // 2
    i = 0
    while i < n and sizes[i] <= left:
        left -= sizes[i]
        i += 1
    left += room - room // 2
    j = n
    while j > i and sizes[j - 1] <= left:
        left -= sizes[j - 1]
        j -= 1
    head, tail = messages[:i], messages[j:]
    if j - i == 1 and left >= MIN_CUT:
        head.append(_cut(messages[i], left, "both"))
    elif j - i >= 2 and left // 2 >= MIN_CUT:
        head.append(_cut(messages[i], left // 2, "start"))
        tail.insert(0, _cut(messages[j - 1], left - left // 2, "end"))
    left_out = total - sum(message_size(m) for m in head + tail)
    marker: dict[str, Any] = {"timestamp": rfc3339(now()), "level": "warning",
                              "message": f"[ota-server] log quota reached: {j - i} message(s) left out or shortened "
                                         f"here ({left_out} bytes)"}
    return head + [marker] + tail, j - i, left_out


@router.put("/api/devices/v1/deployments/device/deployments/{deployment_id}/log", status_code=204,
            responses={204: {"description": "stored (truncated, with a marker message, when over the quota)"},
                       404: error_doc("not a deployment of this device"),
                       413: error_doc("this device's log of this deployment is full: nothing stored")})
async def put_log(deployment_id: str, body: LogBody, device: Device, ctx: Ctx) -> Response:
    """Store the deployment log (appended to what the device sent before for this deployment), within the
    quota: the first upload past it is truncated, later ones are refused with 413.

    Raises:
        APIError: 404 when the deployment is not this device's; 413 when its log is full.
    """
    ctx.last_seen.seen(device.id)
    messages = [m.model_dump() for m in body.messages]
    await ctx.committer.run(deployment_id, device.id, lambda c: store_log(c, ctx, deployment_id, device.id, messages))
    return Response(status_code=NO_CONTENT)


def store_log(c: Connection, ctx: ServerContext, deployment_id: str, device_id: str,
              messages: list[dict[str, Any]]) -> None:
    """Append an upload to the device's log of the deployment, within the quota (in a shared transaction of
    :mod:`.groupcommit`).

    Raises:
        APIError: 404 when the deployment is not this device's; 413 when its log is full.
    """
    max_bytes, max_uploads = ctx.settings.log_max_bytes, ctx.settings.log_max_uploads
    mine = (logs_t.c.deployment_id == deployment_id, logs_t.c.device_id == device_id)
    own_deployment(c, deployment_id, device_id)
    # uploads of one device are serialized (PostgreSQL; SQLite writers are anyway), so the quota holds
    c.execute(sa.select(dd.c.device_id).where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id)
              .with_for_update())
    row = c.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(logs_t.c.size), 0))
                    .where(*mine)).one()
    uploads, used = int(row[0]), int(row[1])  # PostgreSQL's sum() of a bigint is a numeric (Decimal)
    if (max_uploads and uploads >= max_uploads) or (max_bytes and used >= max_bytes):
        raise APIError(413, f"the log of this deployment is full ({max_bytes} bytes or {max_uploads} uploads "
                            "per device); nothing was stored")
    size = sum(message_size(m) for m in messages)
    if max_bytes and used + size > max_bytes:
        messages, _, _ = fit_messages(messages, max_bytes - used)
        size = max_bytes - used  # truncated: the quota is used up
    c.execute(logs_t.insert().values(deployment_id=deployment_id, device_id=device_id, created=now(),
                                     messages=messages, message_count=len(messages), size=size))
    c.execute(dd.update().where(dd.c.deployment_id == deployment_id, dd.c.device_id == device_id)
              .values(has_log=True))


def format_log(chunks: list[Any]) -> str:
    """``<timestamp> <level>: <message>`` lines (each ending with a newline) of stored message lists."""
    lines = []
    for messages in chunks:
        for m in messages if isinstance(messages, list) else ():
            if isinstance(m, dict):
                lines.append(f"{m.get('timestamp', '')} {m.get('level', '')}: {m.get('message', '')}\n")
    return "".join(lines)


def _rows_after(ctx: ServerContext, deployment_id: str, device_id: str, after: int) -> list[Any]:
    with ctx.db.read() as c:
        return list(c.execute(sa.select(logs_t.c.id, logs_t.c.messages).where(
            logs_t.c.deployment_id == deployment_id, logs_t.c.device_id == device_id, logs_t.c.id > after)
            .order_by(logs_t.c.id).limit(BATCH)))


def device_log(ctx: ServerContext, deployment_id: str, device_id: str) -> Response:
    """The log as text, streamed :data:`BATCH` rows at a time.

    Raises:
        APIError: 404 when the device sent no log for this deployment.
    """
    first = _rows_after(ctx, deployment_id, device_id, 0)
    if not first:
        raise not_found("log")

    def text() -> Iterator[str]:
        rows = first
        while rows:
            yield format_log([r.messages for r in rows])
            if len(rows) < BATCH:
                return
            rows = _rows_after(ctx, deployment_id, device_id, rows[-1].id)

    return StreamingResponse(text(), media_type="text/plain")


def newest_messages(conn: Connection, deployment_id: str, device_id: str, limit: int
                    ) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` messages of a device's deployment log (oldest first) and how many older ones were
    left out, reading rows from the newest until ``limit`` messages are there (never the whole log)."""
    mine = (logs_t.c.deployment_id == deployment_id, logs_t.c.device_id == device_id)
    total = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(logs_t.c.message_count), 0)).where(*mine))
                .scalar() or 0)
    chunks: list[list[dict[str, Any]]] = []  # newest first
    count = 0
    before: int | None = None
    while count < limit:
        q = sa.select(logs_t.c.id, logs_t.c.messages).where(*mine).order_by(logs_t.c.id.desc()).limit(BATCH)
        if before is not None:
            q = q.where(logs_t.c.id < before)
        rows = conn.execute(q).all()
        for row in rows:
            chunk = [m for m in row.messages if isinstance(m, dict)] if isinstance(row.messages, list) else []
            chunk = chunk[max(0, len(chunk) - (limit - count)):]
            chunks.append(chunk)
            count += len(chunk)
            if count >= limit:
                break
        if len(rows) < BATCH:
            break
        before = rows[-1].id
    messages = [m for chunk in reversed(chunks) for m in chunk]
    return messages, max(0, total - len(messages))
