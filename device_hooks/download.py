"""A file-like artifact download that survives connection drops and reboots.

:class:`ResumableDownload` is what the streaming install reads from. Bytes come from the network with
``Range: bytes=<offset>-`` after any drop (the server answers 206 with a matching ``Content-Range``); a link
that expired (403/404/410) is replaced through ``refresh_url``. When ``/data`` has room, every byte is also
appended to a spool file there, so that after a reboot or crash the install starts again from the spool and
only the missing tail is fetched; the artifact's checksums are verified again on every pass, so a damaged
spool costs a re-download, never a bad install.

What is retried is decided by the error, not here: every failure is a :class:`DownloadError` whose
``transient`` was set where it was raised (:func:`.transport.transport_errors` for the transport's exceptions;
5xx, 429, a fresh link and a truncated body are transient; a certificate that fails verification, a refused
range or a changed artifact are not).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests

from ota_common.errors import DownloadError

from . import validate
from .state import atomic_write
from .transport import transport_errors

log = logging.getLogger(__name__)

_T = TypeVar("_T")

CHUNK = 256 * 1024
SPOOL_RESERVE = 64 * 1024 * 1024  # keep this much of /data free
SYNC_EVERY = 4 * 1024 * 1024
MAX_REDIRECTS = 5  # the spool is fsynced and its durable length recorded this often


class LinkGone(DownloadError):
    """The download link is no longer valid and no fresh one was given (the deployment went away)."""


class ResumableDownload:
    """``read(n)`` over an HTTP resource, resuming with Range requests.

    :param refresh_url: called when the link expired; returns a new URL or ``None`` (then :class:`LinkGone`).
    :param spool: a file on persistent storage to keep the bytes in (used only when it fits).
    :param retry_timeout: how long to keep retrying without making progress before giving up.
    """

    def __init__(
        self,
        url: str,
        *,
        session: requests.Session | None = None,
        refresh_url: Callable[[], str | None] | None = None,
        spool: Path | None = None,
        retry_timeout: float = 3600.0,
        timeout: float = 30.0,
        min_backoff: float = 0.5,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.session = session or requests.Session()
        self.refresh_url = refresh_url
        self.retry_timeout = retry_timeout
        self.timeout = timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.sleep = sleep
        self.pos = 0
        self.size: int | None = None
        self.etag: str | None = None
        self.resumes = 0  # Range requests made after a drop (for logs and tests)
        self.bytes_from_network = 0
        self._resp: requests.Response | None = None
        self._net_pos = 0  # offset the open response is at
        self._spool_path = spool
        self._spool_fd: int | None = None
        self._spooled = 0
        self._since_sync = 0
        if spool is not None and spool.exists():
            self._spool_fd = os.open(spool, os.O_RDWR | os.O_CLOEXEC)
            # only what was fsynced and then recorded is trusted: after a power cut the file can be longer,
            # with pages of its tail never written (holes) or stale
            self._spooled = min(os.fstat(self._spool_fd).st_size, _durable_length(spool))
            os.ftruncate(self._spool_fd, self._spooled)
            log.info("resuming from %d bytes already downloaded to %s", self._spooled, spool)

    # -- file-like
    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        if self.size is not None and self.pos >= self.size:
            return b""
        if self._spool_fd is not None and self.pos < self._spooled:
            data = os.pread(self._spool_fd, min(n, self._spooled - self.pos), self.pos)
            self.pos += len(data)
            return data
        data = self._read_network(n)
        if data and self._spool_fd is not None:
            self._append_spool(data)
        self.pos += len(data)
        return data

    def close(self) -> None:
        self._close_response()
        if self._spool_fd is not None:
            self._sync_spool()
            os.close(self._spool_fd)
            self._spool_fd = None

    def discard_spool(self) -> None:
        self.close()
        if self._spool_path is not None:
            remove_spool(self._spool_path)
        self._spooled = 0

    def __enter__(self) -> ResumableDownload:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- network
    @property
    def kept(self) -> int:
        """Bytes found on the spool from an earlier attempt (not downloaded again)."""
        return self._spooled

    def start(self) -> int:
        """Connect (at the end of what is spooled) and learn the artifact's size; returns it."""
        try:
            self._retrying(lambda: self._open(self._spooled))
        except DownloadError:
            if not self._spooled:
                raise
            log.warning("the kept download does not match the artifact on the server; starting over")
            self._drop_spool()
            self._retrying(lambda: self._open(0))
        if self.size is None:
            raise DownloadError("the server did not say how large the artifact is (no Content-Length)")
        return self.size

    def _read_network(self, n: int) -> bytes:
        return self._retrying(lambda: self._read_once(n))

    def _read_once(self, n: int) -> bytes:
        if self._resp is None or self._net_pos != self.pos:
            self._open(self.pos)
        if self.size is not None and self.pos >= self.size:
            return b""
        assert self._resp is not None
        with transport_errors():
            data: bytes = self._resp.raw.read(min(n, CHUNK), decode_content=False)
        if not data:
            if self.size is None or self.pos >= self.size:
                return b""
            raise DownloadError(f"connection closed at byte {self.pos} of {self.size}", transient=True)
        self._net_pos += len(data)
        self.bytes_from_network += len(data)
        return data

    def _retrying(self, fn: Callable[[], _T]) -> _T:
        deadline = time.monotonic() + self.retry_timeout
        backoff = self.min_backoff
        while True:
            try:
                return fn()
            except DownloadError as e:
                self._close_response()
                if not e.transient:
                    raise
                if time.monotonic() > deadline:
                    raise DownloadError(f"download failed at byte {self.pos}: {e}") from None
                wait = backoff * random.uniform(0.8, 1.2)
                log.warning("download interrupted at byte %d (%s); resuming in %.1fs", self.pos, e, wait)
                self.sleep(wait)
                backoff = min(backoff * 2, self.max_backoff)
                self.resumes += 1
            except Exception:
                self._close_response()
                raise

    def _open(self, offset: int) -> None:
        self._close_response()
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.etag:
                headers["If-Range"] = self.etag
        resp = self._get(headers)
        if resp.status_code in (403, 404, 410):
            resp.close()
            fresh = self.refresh_url() if self.refresh_url else None
            if not fresh:
                raise LinkGone(f"download link refused ({resp.status_code}) and no fresh link available")
            log.info("download link expired (%d); using a fresh one", resp.status_code)
            self.url = fresh
            raise DownloadError("fresh link", transient=True)
        if resp.status_code == 416:
            m416 = re.fullmatch(r"bytes \*/(\d+)", resp.headers.get("Content-Range", ""))
            resp.close()
            total416 = int(m416.group(1)) if m416 else self.size
            if total416 is not None and offset >= total416:  # everything is already here
                self.size = total416
                self._net_pos = offset
                return
            raise DownloadError(f"the server refused the range starting at {offset} (416)")
        if resp.status_code >= 500 or resp.status_code == 429:
            resp.close()
            raise DownloadError(f"server answered {resp.status_code}", transient=True)
        if resp.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                resp.close()
                raise DownloadError(f"bad Content-Range {resp.headers.get('Content-Range')!r} for offset {offset}")
            total = int(m.group(3))
            log.info("resumed at byte %d of %d with HTTP Range", offset, total)
        elif resp.status_code == 200:
            length = resp.headers.get("Content-Length", "")
            total = int(length) if re.fullmatch(r"[0-9]{1,15}", length) else -1
            if offset:
                # the server ignored the range (or the resource changed: If-Range): skip what we already have
                # only if it is the same resource; otherwise start over
                if self.size is not None and total != self.size:
                    resp.close()
                    raise DownloadError("the artifact changed on the server during the download")
                log.warning("server ignored the Range request; skipping %d bytes", offset)
                skip = offset
                while skip:
                    with transport_errors():
                        got = resp.raw.read(min(skip, CHUNK), decode_content=False)
                    if not got:
                        resp.close()
                        raise DownloadError("connection closed while skipping", transient=True)
                    skip -= len(got)
        else:
            resp.close()
            raise DownloadError(f"download: unexpected HTTP {resp.status_code}")
        if total >= 0:
            if self.size is not None and total != self.size:
                resp.close()
                raise DownloadError(f"the artifact size changed on the server ({self.size} -> {total})")
            if self.size is None:
                self.size = total
                self._check_spool_room(total)
        self.etag = resp.headers.get("ETag") or self.etag
        self._resp = resp
        self._net_pos = offset

    def _get(self, headers: dict[str, str]) -> requests.Response:
        """GET the link, following at most 5 redirects by hand: each target checked against the link's scheme
        and host class (:func:`device_hooks.validate.redirect`), no redirect body ever read."""
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            with transport_errors():
                resp = self.session.get(url, headers=headers, stream=True, timeout=self.timeout,
                                        allow_redirects=False)
            if resp.status_code not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.close()
            url = validate.redirect(url, urllib.parse.urljoin(url, location),
                                    allow_http=bool(getattr(self.session, "allow_http", False)))
        raise DownloadError(f"more than {MAX_REDIRECTS} redirects")

    def _close_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    # -- spool
    def _check_spool_room(self, total: int) -> None:
        if self._spool_path is None:
            return
        if self._spooled > total:
            log.warning("spool %s is larger than the artifact; discarding it", self._spool_path)
            self._drop_spool()
            return
        if self._spool_fd is None:
            try:
                st = os.statvfs(self._spool_path.parent)
                if st.f_bavail * st.f_frsize < total - self._spooled + SPOOL_RESERVE:
                    log.info("not enough room on %s to keep the download; streaming only", self._spool_path.parent)
                    self._spool_path = None
                    return
                self._spool_fd = os.open(self._spool_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:  # like a failed append: the spool is an optimisation, the download goes on
                log.warning("cannot keep the download on disk (%s); streaming only", e.strerror)
                self._spool_path = None

    def _drop_spool(self) -> None:
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None
        if self._spool_path is not None:
            remove_spool(self._spool_path)
        self._spooled = 0

    def _append_spool(self, data: bytes) -> None:
        assert self._spool_fd is not None
        if self.pos != self._spooled:  # only ever append contiguously
            return
        try:
            os.pwrite(self._spool_fd, data, self._spooled)
        except OSError as e:
            log.warning("cannot keep the download on disk (%s); streaming only", e.strerror)
            self._drop_spool()
            self._spool_path = None
            return
        self._spooled += len(data)
        self._since_sync += len(data)
        if self._since_sync >= SYNC_EVERY:
            self._sync_spool()

    def _sync_spool(self) -> None:
        """Make the spooled bytes durable, then record how many there are (the record is what a restart
        trusts)."""
        if self._spool_fd is None or self._spool_path is None:
            return
        os.fdatasync(self._spool_fd)
        atomic_write(_length_file(self._spool_path), str(self._spooled).encode())
        self._since_sync = 0


def _length_file(spool: Path) -> Path:
    return spool.with_name(spool.name + ".length")


def _durable_length(spool: Path) -> int:
    try:
        return int(_length_file(spool).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def remove_spool(spool: Path) -> None:
    """Delete a spool and its length record."""
    spool.unlink(missing_ok=True)
    _length_file(spool).unlink(missing_ok=True)
