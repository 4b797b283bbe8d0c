"""Run the real, unmodified Mender client 3.4 (Debian bookworm ``mender-client``) against a local server.

The package is never installed (its postinst enables and starts ``mender-client.service``): the ``.deb`` is
unpacked with ``dpkg-deb -x`` and ``usr/bin/mender`` runs from there. The client hard-codes
``/etc/mender`` (config, ``artifact_info``), ``/usr/share/mender`` (identity and inventory scripts, update
modules) and ``/var/lib/mender`` (key, store, module work dirs); each client runs in a private mount namespace
(``unshare --mount --propagation private``, root needed) where directories owned by the test are bind-mounted
over those paths. A path that does not exist on the host is created inside an overlay of its parent whose upper
layer lives on a tmpfs of the namespace, so nothing on the host changes and everything vanishes with the
process.

No ``fw_printenv`` is needed: without ``RootfsPartA``/``RootfsPartB`` the client logs "No dual rootfs
configuration present" and only module-image updates are possible, which is what the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEB_CACHE = REPO / "var" / "cache" / "debs"

# A trivial update module (v3 protocol): records every state it is called with, copies the payload files on
# ArtifactInstall, never asks for a reboot. With fail_with, ArtifactInstall prints it to stderr and exits 3;
# rollback is then supported (a no-op), so the client rolls back and keeps its artifact name instead of
# recording "<name>_INCONSISTENT".
UPDATE_MODULE = r"""#!/bin/sh
STATE="$1"
FILES="$2"
echo "$STATE" >> "{states}"
case "$STATE" in
  NeedsArtifactReboot) echo No ;;
  SupportsRollback) if [ -n "{fail_with}" ]; then echo Yes; else echo No; fi ;;
  ArtifactInstall)
    if [ -n "{fail_with}" ]; then
      echo "{fail_with}" >&2
      exit 3
    fi
    cp "$FILES"/files/* "{dest}/" || exit 1
    echo "{module}: installed $(ls "$FILES"/files)" >&2
    ;;
esac
exit 0
"""

# Runs inside the new mount namespace: tmpfs for overlay upper layers, then the bind mounts, then exec.
LAUNCHER = r"""set -eu
root=$1
shift
mount -t tmpfs -o mode=0700 vv-mender-ns "$root/ns"
place() {
  src=$1
  dest=$2
  if [ ! -d "$dest" ]; then
    parent=$(dirname "$dest")
    name=$(echo "$parent" | tr / _)
    mkdir -p "$root/ns/$name.up" "$root/ns/$name.work"
    mount -t overlay vv-mender-ov -o "lowerdir=$parent,upperdir=$root/ns/$name.up,workdir=$root/ns/$name.work" "$parent"
    mkdir -p "$dest"
  fi
  mount --bind "$src" "$dest"
}
place "$root/etc" /etc/mender
place "$root/share" /usr/share/mender
place "$root/data" /var/lib/mender
exec "$@"
"""


class MenderUnavailable(RuntimeError):
    """The client cannot be provided on this machine (the message says what to install)."""


def find_client_deb() -> Path:
    """The mender-client .deb: $VV_MENDER_CLIENT_DEB, var/cache/debs (scripts/install.sh), apt's archive,
    else ``apt-get download`` into var/cache/debs."""
    explicit = os.environ.get("VV_MENDER_CLIENT_DEB")
    if explicit:
        return Path(explicit)
    patterns = [str(DEB_CACHE / "mender-client_*.deb"), "/var/cache/apt/archives/mender-client_*.deb"]
    for pattern in patterns:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1])
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", "mender-client"], cwd=DEB_CACHE, capture_output=True, text=True)
    found = sorted(glob.glob(patterns[0]))
    if proc.returncode != 0 or not found:
        raise MenderUnavailable(
            "mender-client .deb not found and `apt-get download mender-client` failed "
            f"({proc.returncode}): {proc.stderr.strip()}; run scripts/install.sh"
        )
    return Path(found[-1])


def unpack_client(deb: Path, dest: Path) -> Path:
    """Unpack the .deb (no maintainer scripts run) and return the ``mender`` binary after checking it runs."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    binary = dest / "usr" / "bin" / "mender"
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MenderUnavailable(f"{binary} --version failed (missing libglib2.0-0/libssl3?): {proc.stderr.strip()}")
    return binary


def needs_root() -> str | None:
    """The reason the client cannot run here (not root), or None."""
    if os.geteuid() != 0:
        return "the mender client test needs root (mount namespace with bind and overlay mounts)"
    return None


def probe_namespace(scratch: Path) -> None:
    """Check, in a throwaway namespace, the mounts the launcher makes; raise MenderUnavailable if refused."""
    if shutil.which("unshare") is None:
        raise MenderUnavailable("unshare (util-linux) is missing")
    scratch.mkdir(parents=True, exist_ok=True)
    script = (f"mount -t tmpfs vv-probe {scratch} && mkdir {scratch}/u {scratch}/w && "
              f"mount -t overlay vv-probe -o lowerdir=/usr/share,upperdir={scratch}/u,workdir={scratch}/w /usr/share")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MenderUnavailable(f"private mount namespace with tmpfs+overlay refused (CAP_SYS_ADMIN and the "
                                f"overlay filesystem are needed): {proc.stderr.strip()}")


@dataclass
class MenderClient:
    """One client: its directories (``root/etc``, ``root/share``, ``root/data``), config, process and log."""

    binary: Path
    root: Path
    server_url: str
    mac: str
    device_type: str = "test-device"
    artifact_name: str = "initial"
    verify_key: Path | None = None
    #: the CA (or certificate) the client trusts for an https:// server, besides the system's
    server_certificate: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        for sub in ("ns", "etc", "share/identity", "share/inventory", "share/modules/v3", "data", "out"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "ServerURL": self.server_url,
            "UpdatePollIntervalSeconds": 1,
            "InventoryPollIntervalSeconds": 2,
            "RetryPollIntervalSeconds": 1,
            "ModuleTimeoutSeconds": 60,
            "DBus": {"Enabled": False},
        }
        if self.verify_key is not None:
            shutil.copy(self.verify_key, self.root / "etc" / "artifact-verify-key.pem")
            config["ArtifactVerifyKey"] = "/etc/mender/artifact-verify-key.pem"
        if self.server_certificate is not None:
            shutil.copy(self.server_certificate, self.root / "etc" / "server.crt")
            config["ServerCertificate"] = "/etc/mender/server.crt"
        (self.root / "etc" / "mender.conf").write_text(json.dumps(config, indent=2))
        (self.root / "etc" / "artifact_info").write_text(f"artifact_name={self.artifact_name}\n")
        (self.root / "data" / "device_type").write_text(f"device_type={self.device_type}\n")
        self._script("identity/mender-device-identity", f"#!/bin/sh\necho mac={self.mac}\n")
        self._script("inventory/mender-inventory-vv", "#!/bin/sh\necho vv_test_client=mender-3.4\n")

    def _script(self, rel: str, text: str) -> Path:
        path = self.root / "share" / rel
        path.write_text(text)
        path.chmod(0o755)
        return path

    @property
    def log_path(self) -> Path:
        return self.root / "client.log"

    @property
    def installed_dir(self) -> Path:
        """Where the update modules copy the payload (outside the namespace's hidden paths)."""
        return self.root / "out"

    def states_path(self, module: str) -> Path:
        return self.root / f"states-{module}.log"

    def add_module(self, name: str, fail_with: str = "") -> None:
        """Install the trivial update module ``name`` into /usr/share/mender/modules/v3."""
        text = UPDATE_MODULE.format(
            states=self.states_path(name), dest=self.installed_dir, fail_with=fail_with, module=name
        )
        self._script(f"modules/v3/{name}", text)

    def module_states(self, name: str) -> list[str]:
        path = self.states_path(name)
        return path.read_text().split() if path.exists() else []

    def set_device_key(self, pem: bytes) -> None:
        """Pre-place the device key (``mender-agent.pem``) instead of letting the client generate RSA 3072."""
        key = self.root / "data" / "mender-agent.pem"
        key.write_bytes(pem)
        key.chmod(0o600)

    def start(self) -> None:
        launcher = self.root / "launch.sh"
        launcher.write_text(LAUNCHER)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", str(launcher), str(self.root),
               str(self.binary), "--no-syslog", "--log-level", "info", "daemon"]
        with open(self.log_path, "ab") as log:
            # unshare and sh exec, so proc.pid is the daemon; its own session holds the update modules too
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the client's process group, SIGKILL after 5 s; the namespace dies with it."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        # anything left in the group (an update module child) goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 120) -> str:
        if not self.log_path.exists():
            return "(no client log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- a byte-exact recording TCP proxy: the client talks to the server through it, unchanged --------------


@dataclass
class HttpExchange:
    method: str
    path: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int | None
    response_headers: dict[str, str]
    response_body: bytes

    def summary(self, limit: int = 300) -> str:
        hdrs = {k: v for k, v in self.request_headers.items() if k.lower() not in ("x-men-signature",)}
        return (f"{self.method} {self.path} {hdrs} body={self.request_body[:limit]!r}\n"
                f"  -> {self.status} {self.response_headers} body={self.response_body[:limit]!r}")


def _read_headers(buf: bytes, pos: int) -> tuple[str, dict[str, str], int] | None:
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        return None
    lines = buf[pos:end].decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, end + 4


def _read_body(buf: bytes, pos: int, headers: dict[str, str], no_body: bool) -> tuple[bytes, int] | None:
    if no_body:
        return b"", pos
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(buf[pos:eol].split(b";")[0] or b"0", 16)
            pos = eol + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n", pos)
                while trailer_end > pos:  # skip trailers
                    pos = trailer_end + 2
                    trailer_end = buf.find(b"\r\n", pos)
                return (body, trailer_end + 2) if trailer_end >= 0 else None
            body += buf[pos:pos + size]
            pos += size + 2
    length = int(headers.get("content-length", "0") or 0)
    if len(buf) < pos + length:
        return None
    return buf[pos:pos + length], pos + length


def parse_exchanges(client_bytes: bytes, server_bytes: bytes) -> list[HttpExchange]:
    """Pair the HTTP/1.1 requests of one connection with the responses (keep-alive, chunked aware)."""
    out: list[HttpExchange] = []
    cpos = spos = 0
    while cpos < len(client_bytes):
        req = _read_headers(client_bytes, cpos)
        if req is None:
            break
        line, rh, cpos = req
        method, _, rest = line.partition(" ")
        path = rest.rsplit(" ", 1)[0]
        got = _read_body(client_bytes, cpos, rh, no_body=False)
        if got is None:
            break
        rbody, cpos = got
        status: int | None = None
        sh: dict[str, str] = {}
        sbody = b""
        while True:  # skip 1xx (100-continue)
            resp = _read_headers(server_bytes, spos)
            if resp is None:
                break
            sline, sh, spos = resp
            status = int(sline.split(" ")[1])
            if status >= 200:
                got = _read_body(server_bytes, spos, sh, no_body=method == "HEAD" or status in (204, 304))
                if got is not None:
                    sbody, spos = got
                break
        out.append(HttpExchange(method, path, rh, rbody, status, sh, sbody))
    return out


class RecordingProxy:
    """Forwards 127.0.0.1:port to the server and keeps both directions of every connection.

    Plain: byte for byte. With ``tls=(listen_context, upstream_context)`` it terminates the client's TLS with
    ``listen_context`` (the run's server certificate), records the plaintext and talks TLS to the server, verified
    with ``upstream_context``: both hops are HTTPS, and the transcript is still readable."""

    def __init__(self, upstream_port: int, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None) -> None:
        self.upstream_port = upstream_port
        self._tls = tls
        self._conns: list[tuple[bytearray, bytearray]] = []
        #: (old, new) byte strings of the same length replaced in what the client sends (and recorded as sent
        #: on): e.g. a request line made to ask a path the server does not have, to see the client fall back
        self.rewrites: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        self._writers: list[asyncio.StreamWriter] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls[0] if tls else None, backlog=64),
            self._loop).result(timeout=10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=self._tls[1] if self._tls else None,
                server_hostname="127.0.0.1" if self._tls else None), timeout=5)
        except OSError:  # refused, timed out, TLS failure
            down_w.transport.abort()
            return
        c2s, s2c = bytearray(), bytearray()
        with self._lock:
            self._conns.append((c2s, s2c))
            self._writers += [down_w, up_w]
        await asyncio.gather(self._pump(down_r, up_w, c2s, down_w, rewrite=True),
                             self._pump(up_r, down_w, s2c, up_w))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray,
                    src_w: asyncio.StreamWriter, rewrite: bool = False) -> None:
        try:
            while data := await src.read(65536):
                for old, new in self.rewrites if rewrite else ():
                    data = data.replace(old, new)
                with self._lock:
                    record += data
                dst.write(data)
                await dst.drain()
        except OSError:  # also ssl.SSLError
            pass
        finally:  # one side ended: end the whole connection, as the client and server see it
            for w in (src_w, dst):
                w.close()

    def exchanges(self) -> list[HttpExchange]:
        with self._lock:
            conns = [(bytes(c), bytes(s)) for c, s in self._conns]
        out: list[HttpExchange] = []
        for c, s in conns:
            out += parse_exchanges(c, s)
        return out

    def transcript(self, keep: Callable[[HttpExchange], bool] = lambda e: True) -> str:
        return "\n".join(e.summary() for e in self.exchanges() if keep(e))[-20000:] or "(no traffic)"

    async def _shutdown(self) -> None:
        self._server.close()
        with self._lock:
            writers = list(self._writers)
        for w in writers:
            w.transport.abort()
        await asyncio.sleep(0.2)  # the pumps see their connections end

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, diagnostics: Callable[[], str],
             interval: float = 0.5) -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``diagnostics()`` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # reported below if it persists
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else "") + "\n" + diagnostics())
