"""What the device retries and what it does not: transience is a property of the error, set where the transport's
exception is translated (:mod:`device_hooks.transport`), not guessed afterwards.

Stories: the network drops a download halfway (resumed with Range), the server is briefly overloaded (503,
retried), someone in the path presents a certificate the device's CA did not sign (refused at once: retrying
would not change what the attacker presents), and /data cannot hold the spool (the download streams on).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from device_hooks.api import DeviceAPI, ServerError, StrictSession
from device_hooks.download import ResumableDownload
from device_hooks.identity import load_or_create_key
from ota_common.errors import DownloadError
from ota_common.tls import make_ca, make_server_cert

from .hostile_server import serving

BODY = os.urandom(600_000)


@dataclass
class Origin:
    """An artifact server whose next answers are scripted: ``"drop"`` (headers and half the body, then the
    connection closes), an HTTP status, or ``"ok"`` (the default once the script is used up)."""

    url: str = ""
    script: list[Any] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # each request's Range header ("" for none)


def _handler(o: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            rng = self.headers.get("Range", "")
            o.seen.append(rng)
            what = o.script.pop(0) if o.script else "ok"
            if isinstance(what, int):
                self.send_response(what)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(rng[6:].split("-")[0]) if rng.startswith("bytes=") else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            self.send_header("Content-Length", str(len(BODY) - start))
            self.end_headers()
            end = start + (len(BODY) - start) // 2 if what == "drop" else len(BODY)
            self.wfile.write(BODY[start:end])  # HTTP/1.0: the connection closes when the handler returns

        do_POST = do_GET  # noqa: N815 - the device API's calls, answered the same way

    return Handler


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    with serving(_handler(o)) as port:
        o.url = f"http://127.0.0.1:{port}"
        yield o


@dataclass
class TLSOrigin:
    origin: Origin
    server_ca: Path  # the CA that signed the server's certificate
    device_ca: Path  # the CA baked into the device's image


@pytest.fixture
def tls_origin(tmp_path: Path) -> Iterator[TLSOrigin]:
    """An HTTPS origin whose certificate another CA signed than the one the device trusts."""
    other_ca, other_key = make_ca(tmp_path / "other-ca", common_name="someone in the path")
    cert, key = make_server_cert(other_ca, other_key, tmp_path / "server", ["127.0.0.1"])
    device_ca, _ = make_ca(tmp_path / "device-ca", common_name="vv-ota fleet CA")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    o = Origin()
    with serving(_handler(o), ctx) as port:
        o.url = f"https://127.0.0.1:{port}"
        yield TLSOrigin(o, other_ca, device_ca)


class Sleeps(list[float]):
    """The download's sleep: records each back-off, and stops a test that would wait for an hour."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if len(self) > 5:
            raise AssertionError("retried more than 5 times")


def _download(url: str, sleeps: Sleeps, **kw: Any) -> tuple[bytes, ResumableDownload]:
    kw.setdefault("session", StrictSession(allow_http=True))
    with ResumableDownload(url + "/a.mender", retry_timeout=3600, min_backoff=0.01, sleep=sleeps, **kw) as dl:
        size = dl.start()
        data = b"".join(iter(lambda: dl.read(65536), b""))
        assert size == len(data)
    return data, dl


def test_a_connection_dropped_halfway_is_resumed_with_range(origin: Origin) -> None:
    origin.script = ["drop", "drop"]
    sleeps = Sleeps()
    data, dl = _download(origin.url, sleeps)
    assert data == BODY
    assert origin.seen == ["", f"bytes={len(BODY) // 2}-", f"bytes={len(BODY) * 3 // 4}-"]
    assert dl.resumes == 2 and len(sleeps) == 2


def test_a_busy_server_is_asked_again(origin: Origin) -> None:
    origin.script = [503, 429]
    sleeps = Sleeps()
    data, _ = _download(origin.url, sleeps)
    assert data == BODY and len(sleeps) == 2


def test_a_refused_download_is_not_retried(origin: Origin) -> None:
    origin.script = [400]
    sleeps = Sleeps()
    with pytest.raises(DownloadError, match="unexpected HTTP 400") as exc:
        _download(origin.url, sleeps)
    assert not exc.value.transient and sleeps == []


def test_a_certificate_the_device_ca_did_not_sign_is_refused_at_once(tls_origin: TLSOrigin) -> None:
    """Someone in the path presents their own certificate for the update server. The download stops at the
    first attempt, as a failure that is not transient (before, it was retried for an hour)."""
    sleeps = Sleeps()
    with pytest.raises(DownloadError) as exc:
        _download(tls_origin.origin.url, sleeps, session=StrictSession(verify=str(tls_origin.device_ca)))
    assert not exc.value.transient
    assert "certificate verify failed" in str(exc.value)
    assert sleeps == [] and tls_origin.origin.seen == []  # no retry, and no request got through
    # the same origin, trusted: the refusal above was the certificate's, not a broken test server
    data, _ = _download(tls_origin.origin.url, sleeps, session=StrictSession(verify=str(tls_origin.server_ca)))
    assert data == BODY


def test_the_device_api_says_what_is_worth_retrying(tmp_path: Path, origin: Origin,
                                                    tls_origin: TLSOrigin) -> None:
    """The poll loop backs off on any ServerError; ``transient`` tells a dead link or a busy server from an
    answer that will not change and from a server that cannot prove who it is."""
    key = load_or_create_key(tmp_path / "state")
    api = DeviceAPI(origin.url, key, '{"mac": "02:00:00:00:00:01"}', allow_http=True)
    origin.script = [503]
    with pytest.raises(ServerError, match="authentication: 503") as exc:
        api.authenticate()
    assert exc.value.transient
    origin.script = [400]
    with pytest.raises(ServerError, match="authentication: 400") as exc:
        api.authenticate()
    assert not exc.value.transient

    closed = DeviceAPI("http://127.0.0.1:9", key, "{}", allow_http=True, timeout=5)
    with pytest.raises(ServerError, match="POST /api/devices/v1/authentication/auth_requests: ConnectionError") as exc:
        closed.authenticate()
    assert exc.value.transient and isinstance(exc.value, DownloadError)

    mitm = DeviceAPI(tls_origin.origin.url, key, "{}", ca_file=str(tls_origin.device_ca))
    with pytest.raises(ServerError, match="SSLError") as exc:
        mitm.authenticate()
    assert not exc.value.transient


def test_a_spool_that_cannot_be_created_leaves_the_download_streaming(origin: Origin, tmp_path: Path) -> None:
    """/data is not usable for the spool (here: its directory is a file). Keeping the download is an
    optimisation: the bytes still stream, nothing is retried."""
    (tmp_path / "not-a-dir").write_text("")
    sleeps = Sleeps()
    data, dl = _download(origin.url, sleeps, spool=tmp_path / "not-a-dir" / "a.mender")
    assert data == BODY and sleeps == [] and dl.kept == 0
