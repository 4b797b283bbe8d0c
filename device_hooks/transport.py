"""The transport's own exceptions, translated once into :class:`DownloadError` with ``transient`` set.

requests, urllib3, http.client and sockets each raise their own exception types; the device API client
(:mod:`.api`) and the artifact download (:mod:`.download`) translate them with :func:`transport_errors` at the
call that touches the network, so that callers decide with ``isinstance`` and ``e.transient`` and never by
an exception's type name or module.

Transient: a refused or dropped connection, a time-out, a truncated body, a TLS session cut short — the same
request may work later. Not transient: the server's certificate failed verification against the device's CA
(or names another host). Retrying does not change what a network attacker in the path presents, so the
failure is reported at once instead of after the retry window.
"""

from __future__ import annotations

import contextlib
import http.client
import ssl
from collections.abc import Iterator

import urllib3.exceptions

from ota_common.errors import DownloadError

#: what the transport raises (requests' exceptions are OSErrors)
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, urllib3.exceptions.HTTPError,
                                                     http.client.HTTPException)


def certificate_refused(e: BaseException) -> bool:
    """Whether ``e`` comes from a server certificate that failed verification. requests and urllib3 wrap the
    :class:`ssl.SSLCertVerificationError` in one or two layers (``args``, ``reason``, ``__cause__``)."""
    seen: set[int] = set()
    todo: list[object] = [e]
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ssl.SSLCertVerificationError):
            return True
        todo += [*x.args, getattr(x, "reason", None), x.__cause__, x.__context__]
    return False


@contextlib.contextmanager
def transport_errors(what: str = "", error: type[DownloadError] = DownloadError) -> Iterator[None]:
    """Raise the transport's exceptions from the block as ``error`` (message ``"<what>: <Type>: <e>"``, or
    just the exception's text without ``what``), transient unless :func:`certificate_refused`."""
    try:
        yield
    except TRANSPORT_ERRORS as e:
        message = f"{what}: {type(e).__name__}: {e}" if what else str(e)
        raise error(message, transient=not certificate_refused(e)) from e
