"""A compromised update server for attack stories against the real agent (python-tuf's way of testing: each
test is one attack, told as a story).

It speaks just enough of the Mender device API to be believed (authentication, ``next``, status and log
reports, inventory, configuration, downloads) and answers whatever the test scripts: any deployment JSON,
any bytes at any download path, redirects anywhere, any configuration. Everything the agent sends is
recorded, so a test can check what the device reported and why.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Hostile:
    port: int = 0
    #: the answer to ``next``: a JSON-able value, raw bytes, or None (204)
    next: Any = None
    configuration: Any = field(default_factory=dict)
    #: path → bytes served (200, with Range support), or ("redirect", location)
    files: dict[str, Any] = field(default_factory=dict)
    statuses: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    logs: list[tuple[str, Any]] = field(default_factory=list)
    inventory: list[Any] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    #: the bodies of the auth requests, parsed
    auth_requests: list[Any] = field(default_factory=list)
    #: extra headers per download path (they replace the computed ones)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    #: ``next`` answered verbatim: (status, body, headers)
    raw_next: tuple[int, bytes, dict[str, str]] | None = None
    #: the answer to status reports (204: taken)
    status_code: int = 204
    #: sent as ``X-VV-Config-Hash`` with every ``next`` answer and the configuration (None: not sent)
    config_hash: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def deployment(self, dep_id: str, name: str, path: str = "/dl/artifact.mender", **extra: Any) -> dict[str, Any]:
        """A ``next`` answer in Mender's shape."""
        return {"id": dep_id, "artifact": {"artifact_name": name, "source": {"uri": self.url + path},
                                           "device_types_compatible": ["test-board"]}, **extra}

    def status_of(self, dep_id: str) -> list[dict[str, Any]]:
        return [body for d, body in self.statuses if d == dep_id]

    def last_inventory(self) -> dict[str, Any]:
        return {a["name"]: a["value"] for a in self.inventory[-1]} if self.inventory else {}


def _handler(h: Hostile) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, body: bytes = b"", ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if code != 204:
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if code != 204 and self.command != "HEAD":
                self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            h.requests.append(f"POST {self.path}")
            body = self._body()
            if self.path.endswith("/authentication/auth_requests"):
                h.auth_requests.append(json.loads(body))
                self._send(200, b"hostile-token", "application/jwt")
            elif self.path.endswith("/deployments/next") and h.raw_next is not None:
                code, raw, extra = h.raw_next
                self._send(code, raw, headers=extra)
            elif self.path.endswith("/deployments/next"):
                extra = {"X-VV-Config-Hash": h.config_hash} if h.config_hash is not None else {}
                if h.next is None:
                    self._send(204, headers=extra)
                elif isinstance(h.next, bytes):
                    self._send(200, h.next, headers=extra)
                else:
                    self._send(200, json.dumps(h.next).encode(), headers=extra)
            else:
                self._send(404, b'{"error": "no"}')

        def do_PUT(self) -> None:  # noqa: N802
            h.requests.append(f"PUT {self.path}")
            body = json.loads(self._body() or b"null")
            parts = self.path.split("/")
            if self.path.endswith("/status"):
                h.statuses.append((parts[-2], body))
                self._send(h.status_code, b'{"error": "no"}' if h.status_code != 204 else b"")
            elif self.path.endswith("/log"):
                h.logs.append((parts[-2], body))
                self._send(204)
            elif "inventory" in self.path:
                h.inventory.append(body)
                self._send(200, b"")
            else:
                self._send(404, b'{"error": "no"}')

        def do_PATCH(self) -> None:  # noqa: N802
            self.do_PUT()

        def do_GET(self) -> None:  # noqa: N802
            h.requests.append(f"GET {self.path}")
            if self.path.endswith("/deviceconfig/configuration"):
                extra = {"X-VV-Config-Hash": h.config_hash} if h.config_hash is not None else {}
                self._send(200, json.dumps(h.configuration).encode(), headers=extra)
                return
            path = self.path.split("?", 1)[0]
            served = h.files.get(path)
            if served is None:
                self._send(404, b'{"error": "not found"}')
            elif isinstance(served, tuple) and served[0] == "redirect":
                self._send(302, b"", headers={"Location": served[1]})
            else:
                data = served() if callable(served) else served
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                extra = h.headers.get(path, {})
                self.send_header("Content-Length", extra.get("Content-Length", str(len(data) - start)))
                self.end_headers()
                self.wfile.write(data[start:])

    return Handler


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """Serve ``handler`` on a free port of 127.0.0.1 (over TLS with ``tls``) in a thread; yields the port."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@contextmanager
def hostile_server() -> Iterator[Hostile]:
    h = Hostile()
    with serving(_handler(h)) as h.port:
        yield h


__all__ = ["Hostile", "hostile_server", "serving"]
