"""The project's error tree and the policy that goes with it.

Library code raises; it never exits, prints or calls ``sys.exit``. Only the entry points — ``build.py``
(:class:`cli.common.ErrorHandlingGroup`) and ``ota-agent`` (:func:`device_hooks.cli.main`) — turn an error into
an exit code and one line on stderr (``error: <message>``); anything that is not an :class:`OTAError` is a bug
and is printed with its traceback (exit 70 from ``build.py``).

The kinds, chosen by what the receiver should do (exit code in brackets; each kind declares it as
``exit_code``, which only the entry points read and subclasses never re-declare):

- :class:`UserError` [2] — fix the input: an option, a configuration file or key, a path.
- :class:`ToolError` [3] — install or repair an external program. It carries ``argv``, ``returncode`` and the
  ``stderr`` tail; :func:`ota_common.tools.run` fills them and tells "not installed" apart from "failed".
- :class:`DownloadError` [4] — a transfer failed: the network, an HTTP status, an interrupted body. Its
  ``transient`` says whether the same request may succeed later (a dropped connection, a time-out, a 5xx).
  It is set where the transport's own exception (requests, urllib3, http.client, a socket) is translated,
  never guessed later from the exception's type or module; a server certificate that fails verification is
  not transient. ``device_hooks.api.ServerError`` is the device API's kind of it (the poll loop goes
  offline and backs off), ``device_hooks.download.LinkGone`` the artifact link's.
- :class:`ArtifactError` [1] — untrusted data must not be trusted or installed: malformed, unsigned, wrongly
  signed, not matching its manifest, or not for this device. Kept apart from :class:`DownloadError`:
  verification is a pure function of bytes and keys, whatever transport brought them.
- :class:`OTAError` itself [1] — a condition of the device's own state (boot environment, slots, identity,
  state scripts, the agent's lock) that is neither the user's input nor a transfer.

Where a class lives: the kinds, and classes more than one package raises or catches, live here. A narrower
class that only its own package raises and catches lives next to the code that raises it and derives from
a kind here (``device_hooks.api.Unauthorized``, ``image.layers.LayerError``, ``devkit.qemu.VmError``). A
narrower class exists only when some caller handles it differently; its docstring says how.

Errors carry fields when a caller needs more than the text (:class:`ToolError`, :class:`DownloadError`,
:class:`ChecksumMismatch`); ``str(e)`` stays the readable message. No code decides by an error's message or
module. Messages speak the library's terms (a provide, a key file, a slot), never a command-line flag: the
CLI adds the flag where it knows it.

Outside this tree: private control-flow exceptions that never leave their module (``_Retry``-style names,
``device_hooks.agent.Rebooting``), and the update server's HTTP errors (:class:`ota_server.errors.APIError`),
which become HTTP answers rather than exit codes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class OTAError(Exception):
    """Base of every error this project raises on purpose."""

    #: process exit code the entry points use for this kind of error
    exit_code = 1


class UserError(OTAError):
    """Invalid input from the user: options, configuration, paths, keys."""

    exit_code = 2


class ToolError(OTAError):
    """An external program is missing or failed.

    ``argv`` is the command (empty when no single command was run, e.g. a whole stage's tools are missing),
    ``tool`` its program name, ``returncode`` its exit status (``None`` when it did not run to an exit: not
    installed, or timed out) and ``stderr`` the tail of what it said."""

    exit_code = 3

    def __init__(self, message: str, *, argv: Sequence[str | os.PathLike[str]] = (), tool: str = "",
                 returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.argv = tuple(os.fspath(a) for a in argv)
        self.tool = tool or (os.path.basename(self.argv[0]) if self.argv else "")
        self.returncode = returncode
        self.stderr = stderr


class DownloadError(OTAError):
    """Fetching data failed (network, HTTP status, interrupted transfer). ``transient``: the same request may
    succeed if tried again later."""

    exit_code = 4

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# ---------------------------------------------------------------------------------------------------------
# Keys and signatures used by the release engineer (a key file that cannot be used is a user error).


class KeyFormatError(UserError):
    """A key file cannot be read, or holds a key type mender-artifact 3.9 cannot use."""


# ---------------------------------------------------------------------------------------------------------
# Untrusted artifacts.


class ArtifactError(OTAError):
    """The artifact must not be trusted or installed."""

    exit_code = 1


class MalformedArtifact(ArtifactError):
    """The artifact's structure is invalid: member order, names, JSON, tar or compression framing."""


class TruncatedArtifact(MalformedArtifact):
    """The artifact ends before its structure says it should."""


class UnsupportedArtifact(ArtifactError):
    """A well-formed artifact using something this implementation does not support (format version,
    compression, payload type, augmented headers)."""


class SignatureError(ArtifactError):
    """The manifest signature is missing or does not verify."""


class UnsignedArtifact(SignatureError):
    """A signature was required but the artifact has none."""


class BadSignature(SignatureError):
    """The signature does not verify with any trusted key (or is encoded the wrong way)."""


class ChecksumMismatch(ArtifactError):
    """Content does not match the checksum the signed manifest lists for it."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"checksum mismatch for {path}: manifest says {expected[:16]}…, content is {actual[:16]}…")
        self.path = path
        self.expected = expected
        self.actual = actual


class IncompatibleArtifact(ArtifactError):
    """A valid artifact that does not fit this device (device type, depends, version)."""


# ---------------------------------------------------------------------------------------------------------
# The device's own state.


class BootEnvError(OTAError):
    """The boot-state environment cannot be read or written (both copies invalid, bad names, too large)."""
