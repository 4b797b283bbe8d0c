"""Which configuration variables from the server may reach the application's environment file.

The server is not trusted (DESIGN.md section 6): a variable it sets lands in ``device.env``, the
``EnvironmentFile`` of the application's unit, so a name like ``LD_PRELOAD`` or ``PYTHONWARNINGS`` would run
code as the application. Only names the signed image declares (``config_variables`` of its layers) are
accepted, never a name of :data:`DENIED` or with a :data:`DENIED_PREFIXES` prefix (the image build refuses to
declare them too), and values must be one line of printable text.
"""

from __future__ import annotations

import re

#: a variable name: shell- and systemd-safe
NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
#: names that change how programs load code or run commands, whatever the image declares
DENIED = frozenset({
    "PATH", "IFS", "ENV", "BASH_ENV", "PS4", "SHELLOPTS", "BASHOPTS", "BROWSER", "HOME", "SHELL", "USER",
    "LOGNAME", "TMPDIR", "EDITOR", "VISUAL", "PAGER", "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB",
    "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "CLASSPATH", "GCONV_PATH", "HOSTALIASES",
    "RESOLV_HOST_CONF", "LOCALDOMAIN", "NLSPATH", "TZDIR", "MALLOC_CHECK_", "OPENSSL_CONF", "OPENSSL_ENGINES",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSH", "GIT_SSH_COMMAND",
    "GIT_EXEC_PATH", "SYSTEMD_PAGER", "SYSTEMD_EDITOR", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID",
    "CREDENTIALS_DIRECTORY", "INVOCATION_ID", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
})
#: prefixes of names refused the same way (the dynamic loader, Python, glibc, the C library's locale)
DENIED_PREFIXES = ("LD_", "PYTHON", "GLIBC_", "GCONV_", "DYLD_", "LC_", "LANG", "GETCONF_", "MALLOC_")
#: a value: one line of printable text (no newline, carriage return, NUL or other control characters)
VALUE = re.compile(r"^[^\x00-\x1f\x7f]{0,4096}$")


def denied(name: str) -> bool:
    """True when ``name`` may never be set from outside the image."""
    return name in DENIED or name.startswith(DENIED_PREFIXES)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a configuration variable, or None."""
    if not NAME.match(name):
        return "not a variable name (A-Z, 0-9 and _, starting with a letter, at most 64 characters)"
    if denied(name):
        return "changes how programs load code or run commands"
    return None


__all__ = ["DENIED", "DENIED_PREFIXES", "NAME", "VALUE", "denied", "name_problem"]
