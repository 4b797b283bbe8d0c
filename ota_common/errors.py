"""The project's error tree, in one place.

Library code raises these; only the CLI (``build.py``) turns them into exit codes and one-line messages.

- :class:`UserError` — bad options, bad configuration, a file that does not exist: the user can fix it.
- :class:`ToolError` — an external program failed (names the tool, its exit code and the tail of stderr).
- :class:`ArtifactError` — untrusted data (an artifact) is malformed, unsigned, wrongly signed or does not
  match its manifest. Nothing may be installed from an artifact that raised one of these.
- :class:`DownloadError` — transport problems, kept apart from verification.
"""

from __future__ import annotations


class OTAError(Exception):
    """Base of every error this project raises on purpose."""

    #: process exit code the CLI uses for this kind of error
    exit_code = 1


class UserError(OTAError):
    """Invalid input from the user: options, configuration, paths, keys."""

    exit_code = 2


class ToolError(OTAError):
    """An external program is missing or failed."""

    exit_code = 3


class DownloadError(OTAError):
    """Fetching data failed (network, HTTP status, interrupted transfer)."""

    exit_code = 4


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


class BootEnvError(OTAError):
    """The boot-state environment cannot be read or written (both copies invalid, bad names, too large)."""
