"""uvicorn's HTTP/1.1 protocol (httptools), stopping promptly over TLS.

At shutdown uvicorn closes idle keep-alive connections with ``transport.close()``. Over TLS that sends
``close_notify`` and then waits for the peer's (up to asyncio's 30 s TLS shutdown timeout); a client that keeps an
idle connection in its pool (httpx, Go's net/http in mender-client) does not read it, so every stop with a device
connected took uvicorn's whole graceful timeout (10 s, then "Cancel 0 running task(s)"). Here an idle TLS
connection still gets its ``close_notify``, and is aborted if the peer has not closed within :data:`CLOSE_GRACE`.
Plain HTTP and requests in flight are unchanged (a request in flight finishes, then its connection closes).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import is_ssl

#: seconds an idle TLS peer has to answer our close_notify at shutdown
CLOSE_GRACE = 0.5

#: what ``uvicorn.run(http=...)`` is given (an import string: every worker process imports it)
PROTOCOL = "ota_server.http_protocol:PromptTLSShutdownProtocol"


class PromptTLSShutdownProtocol(HttpToolsProtocol):
    _abort_later: asyncio.TimerHandle | None = None

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle and is_ssl(self.transport):
            self._abort_later = self.loop.call_later(CLOSE_GRACE, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_later is not None:
            self._abort_later.cancel()
        super().connection_lost(exc)
