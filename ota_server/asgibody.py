"""The request body for the shortcuts in front of the app (:mod:`.fastpoll`, :mod:`.fastreport`): read whole
before deciding, then handed on unchanged to the app when the shortcut does not answer."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope


async def read_body(receive: Receive) -> bytes | None:
    """The whole body, or None when the client went away (or a body limit answered already)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app ``body`` as one message, then whatever the client sends next (its
    disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def json_authorization(scope: Scope) -> bytes | None:
    """The request's ``Authorization`` value when its body is declared JSON, else None: what both shortcuts need
    before they read anything (the first of each header, as Starlette's ``headers.get``)."""
    auth: bytes | None = None
    ctype: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization" and auth is None:
            auth = value
        elif name == b"content-type" and ctype is None:
            ctype = value
    if auth is None or ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
        return None
    return auth
