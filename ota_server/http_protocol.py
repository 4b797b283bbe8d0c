"""uvicorn's HTTP/1.1 protocol (httptools) with read deadlines, a bound on request heads, and a prompt stop
over TLS.

**Deadlines** (:class:`ConnectionLimits`, from ``build.py server`` options). uvicorn itself only times out idle
keep-alive connections; a client sending its headers or its body a byte at a time kept a connection (and a
task) forever. Here:

- a request's line and headers must arrive within ``header_timeout`` seconds: counted from the connection's
  start for the first request, from the first byte of the next one on a kept-alive connection (the idle time
  between requests is uvicorn's ``timeout_keep_alive``). Past it the connection is closed, with a 408 when part
  of a request had come;
- a request's line and headers together may have ``max_header_size`` bytes (httptools would buffer any
  amount): past it, 431 and the connection is closed;
- a body must arrive within ``body_timeout`` seconds plus one second per ``body_min_rate`` bytes received (as
  Apache's mod_reqtimeout ``body=20,MinRate=500``), so a large upload at a decent rate is never cut and a body
  trickling in is. Time during which the server itself is not reading (the application has not asked for more
  of the body yet, or has not let a ``100-continue`` client send) does not count. Past it: 408 (or, when the
  answer has started, just the close), and the application sees a disconnected client;
- a response sent before its request's body ended (an early 401 or 413) closes the connection: the rest of
  that body is never read.

**Stop over TLS.** At shutdown uvicorn closes idle keep-alive connections with ``transport.close()``. Over TLS
that sends ``close_notify`` and then waits for the peer's (up to asyncio's 30 s TLS shutdown timeout); a client
that keeps an idle connection in its pool (httpx, Go's net/http in mender-client) does not read it, so every
stop with a device connected took uvicorn's whole graceful timeout (10 s, then "Cancel 0 running task(s)").
Here an idle TLS connection still gets its ``close_notify``, and is aborted if the peer has not closed within
:data:`CLOSE_GRACE`. A connection closed for a deadline or a limit is aborted after :data:`CLOSE_GRACE` too.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import is_ssl

#: seconds an idle TLS peer has to answer our close_notify at shutdown, and a refused peer to read our answer
CLOSE_GRACE = 0.5

#: what ``uvicorn.run(http=...)`` is given (an import string: every worker process imports it)
PROTOCOL = "ota_server.http_protocol:GuardedHttpProtocol"


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-connection limits (seconds, bytes); see the module's docstring and docs/server.md, "Limits"."""

    header_timeout: float = 10.0
    max_header_size: int = 64 * 1024
    body_timeout: float = 20.0
    body_min_rate: int = 500

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        return cls(header_timeout=settings.header_timeout, max_header_size=settings.max_header_size,
                   body_timeout=settings.body_timeout, body_min_rate=settings.body_min_rate)


_limits = ConnectionLimits()


def configure(limits: ConnectionLimits) -> None:
    """Set the limits of the connections this process accepts from now on (the app factory calls it in each
    worker process, before uvicorn accepts connections)."""
    global _limits
    _limits = limits


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head is too large."""


class GuardedHttpProtocol(HttpToolsProtocol):
    _abort_later: asyncio.TimerHandle | None = None
    _deadline: asyncio.TimerHandle | None = None
    #: waiting for (the rest of) a request's line and headers
    _in_head = True
    _head_bytes = 0
    _body_start = 0.0
    _body_bytes = 0
    #: bytes of the request line and headers parsed (the limit is checked as they are)
    _head_size = 0
    _head_too_large = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = _limits

    # --- deadlines -------------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm(self.limits.header_timeout, self._head_late)  # a pipelined head waits for its turn
            return
        if self._head_bytes == 0:
            self._close()  # nothing of a request came: no answer (a pooled client could take it for its next)
        else:
            self._refuse(408, f"the request's headers did not arrive within {self.limits.header_timeout:g} s")

    def _body_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._in_head:
            return
        now = self.loop.time()
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            # we are not reading: the client is not late; start counting again
            self._body_start, self._body_bytes = now, 0
            self._arm(self.limits.body_timeout, self._body_late)
            return
        allowed = self.limits.body_timeout + self._body_bytes / max(1, self.limits.body_min_rate)
        elapsed = now - self._body_start
        if elapsed < allowed:
            self._arm(allowed - elapsed, self._body_late)
            return
        self._refuse(408, f"the request body did not arrive in time ({self._body_bytes} bytes in {elapsed:.0f} s; "
                          f"{self.limits.body_timeout:g} s plus 1 s per {self.limits.body_min_rate} bytes)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless a response has started) and close; the running application, if any, sees
        a disconnected client."""
        cycle = self.cycle
        started = False
        if cycle is not None and not cycle.response_complete:
            started = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
        if not started and not self.transport.is_closing():
            body = json.dumps({"error": message}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        self._close()

    def _close(self, grace: float = CLOSE_GRACE) -> None:
        """Close; abort (drop what is not sent yet) if the peer has not let us close within ``grace`` s."""
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()
        if self._abort_later is None:
            self._abort_later = self.loop.call_later(grace, self.transport.abort)

    # --- uvicorn's protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._deadline is None:  # the first bytes of the next request on a kept-alive connection
                self._arm(self.limits.header_timeout, self._head_late)
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_size and not self.transport.is_closing():
            self._refuse(431, f"the request line and headers are larger than {self.limits.max_header_size} bytes")

    def on_message_begin(self) -> None:
        self._head_size = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, n: int) -> None:
        self._head_size += n
        if self._head_size > self.limits.max_header_size:
            self._head_too_large = True
            raise _HeadTooLarge  # httptools stops parsing; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(431, f"the request line and headers are larger than {self.limits.max_header_size} bytes")
        elif not self.transport.is_closing():
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._body_start, self._body_bytes = self.loop.time(), 0
        self._arm(self.limits.body_timeout, self._body_late)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if not self._in_head and not self.transport.is_closing():
            # answered before the request's body ended: do not read the rest of it (the answer has the time a
            # body would have to be sent)
            self._close(self.limits.body_timeout)
            return
        super().on_response_complete()

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle and is_ssl(self.transport) and self._abort_later is None:
            self._abort_later = self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._abort_later is not None:
            self._abort_later.cancel()
        super().connection_lost(exc)


#: the name this class had before it got its deadlines
PromptTLSShutdownProtocol = GuardedHttpProtocol
