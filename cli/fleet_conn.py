"""Where ``build.py fleet`` finds its server, token and CA: options, the environment, then a configuration file.

The file is ``$XDG_CONFIG_HOME/vv-ota/cli.toml`` (``~/.config/vv-ota/cli.toml`` without ``XDG_CONFIG_HOME``)::

    server = "https://ota.lab:8443"
    token_file = "token"        # relative to this file's directory, mode 0600; or the token itself:
    # token = "vvota_..."       # then cli.toml itself must be mode 0600
    ca_file = "ca.pem"          # a private CA that signed the server's certificate

Precedence (first found wins): server — the command's ``--server``, ``fleet --server``, ``$OTA_SERVER_URL``, the
file's ``server``; token — ``$OTA_ADMIN_TOKEN``, the file's ``token`` or ``token_file``; CA — ``$OTA_CA_FILE``,
the file's ``ca_file``.

Why the rules are strict: the file holds a credential. A token file (or a cli.toml holding a token) that other
users may read is refused, as ssh refuses such a key; and the file's token is only ever sent to the file's own
server, so ``--server http://elsewhere`` cannot make the CLI hand it to another host.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from devkit.client import TOKEN_ENV, check_url
from ota_common.errors import UserError

SERVER_ENV = "OTA_SERVER_URL"
CA_ENV = "OTA_CA_FILE"
CONFIG_DIR_ENV = "XDG_CONFIG_HOME"
KEYS = frozenset({"server", "token", "token_file", "ca_file"})
#: what a bearer token may hold: printable ASCII without spaces (no header injection through a token file)
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")


@dataclass(frozen=True)
class Connection:
    url: str
    token: str
    ca_file: str | None
    #: where the token came from, for the message when the server refuses it
    token_from: str


def config_path() -> Path:
    base = os.environ.get(CONFIG_DIR_ENV) or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "vv-ota" / "cli.toml"


def _private(path: Path, what: str) -> None:
    """Refuse a credential file other users can read or write (what ssh does with a private key)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"{what} {path} is accessible by other users (mode {mode:04o}): chmod 600 {path}")


def _token(text: str, where: str) -> str:
    token = text.strip()
    if not TOKEN_RE.fullmatch(token):
        raise UserError(f"the token in {where} is not one line of printable characters")
    return token


@dataclass(frozen=True)
class FileConfig:
    path: Path
    server: str | None = None
    token: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None

    def read_token(self) -> str | None:
        if self.token is not None:
            _private(self.path, "the configuration file holding a token,")
            return _token(self.token, str(self.path))
        if self.token_file is None:
            return None
        try:
            _private(self.token_file, "the token file")
            return _token(self.token_file.read_text(), str(self.token_file))
        except OSError as e:
            raise UserError(f"cannot read the token file {self.token_file} (named in {self.path}): "
                            f"{e.strerror or e}") from None


def load_file(path: Path | None = None) -> FileConfig | None:
    """The configuration file, or None when there is none. Raises UserError for anything malformed."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})")
    bad = sorted(k for k, v in doc.items() if not isinstance(v, str) or not v.strip())
    if bad:
        raise UserError(f"{path}: {', '.join(bad)} must be non-empty text")
    if "token" in doc and "token_file" in doc:
        raise UserError(f"{path}: give token or token_file, not both")
    if ("token" in doc or "token_file" in doc) and "server" not in doc:
        raise UserError(f"{path}: a token needs its server (the file's token is sent to that server only)")

    def rel(name: str) -> Path | None:
        return path.parent / Path(doc[name]).expanduser() if name in doc else None

    if "server" in doc:
        try:
            check_url(doc["server"])
        except UserError:
            raise UserError(f"{path}: server must be http(s)://HOST[:PORT][/PREFIX], not {doc['server']!r}") from None
    return FileConfig(path, doc.get("server"), doc.get("token"), rel("token_file"), rel("ca_file"))


def same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def resolve(*servers: str | None) -> Connection:
    """The connection: the first of ``servers`` given (the command's option, then the group's), else
    ``$OTA_SERVER_URL``, else the file's; the token and CA as the module docstring says. Raises UserError."""
    file = load_file()
    url = next((s for s in servers if s), None) or os.environ.get(SERVER_ENV) or (file.server if file else None)
    if not url:
        raise UserError(f"give the update server with --server URL or ${SERVER_ENV} (or server = \"URL\" in "
                        f"{config_path()})")
    check_url(url)
    ca_file = os.environ.get(CA_ENV) or (str(file.ca_file) if file and file.ca_file else None)
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if env_token:
        return Connection(url, _token(env_token, f"${TOKEN_ENV}"), ca_file, f"${TOKEN_ENV}")
    token = file.read_token() if file else None
    if token is None:
        raise UserError(f"give an API token in ${TOKEN_ENV}, or token_file = \"PATH\" in {config_path()}")
    assert file is not None and file.server is not None
    if not same_server(url, file.server):
        raise UserError(f"the token of {file.path} is for {file.server}, not {url}: give that server's token in "
                        f"${TOKEN_ENV}")
    return Connection(url, token, ca_file, str(file.token_file or file.path))
