"""Shared fixtures: a clean environment, keys made by our own generator, small payload files, the real
mender-artifact binary."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from artifacts import KeyType, generate_keypair
from ota_common.tools import find_program, install_hint

REPO = Path(__file__).resolve().parent.parent
BUILD_PY = REPO / "build.py"

#: environment variables the product reads (grep os.environ, getenv and click's envvar=), removed for the whole
#: session so that no test depends on the caller's shell: every OTA_* variable (server settings, admin token,
#: secrets keys, database URL, release keys, the agent's fault injection, the e2e seed), the reproducibility
#: clock, the metrics directory, and what ``requests``/``urllib``/``ssl`` take from the environment (proxies,
#: CA bundles, .netrc credentials). A test that needs one sets it with ``monkeypatch.setenv``.
SCRUBBED_PREFIXES = ("OTA_", "AWS_")
SCRUBBED = frozenset({
    "SOURCE_DATE_EPOCH", "PROMETHEUS_MULTIPROC_DIR",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "NETRC",
    "XDG_CONFIG_HOME",  # where build.py fleet finds cli.toml (server, token): tests give their own
})
#: read by the product but kept, with the reason
KEPT = {
    "PATH": "where the external tools are",
    "XDG_CACHE_HOME": "where the build cache lives, not what is built: the image tests reuse the caller's cache",
    "VV_ENV_FILE": "read by the application stand-in inside the image only",
    "VV_HEALTH_PORT": "read by the application stand-in inside the image only",
    "OTA_E2E_SEED": "read by the QEMU suite, not the product: it repeats a run's random power-cut points",
}


def scrubbed(name: str) -> bool:
    return name not in KEPT and (name in SCRUBBED or name.startswith(SCRUBBED_PREFIXES))


@pytest.fixture(scope="session", autouse=True)
def clean_environment() -> Iterator[None]:
    """The session runs without the variables of :data:`SCRUBBED` (kas' ``monkeykas`` is the model); session
    fixtures and the subprocesses the tests start (``build.py``, servers, agents) inherit the clean
    environment. Restored at the end of the session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if scrubbed(n)]:
            mp.delenv(name)
        yield


@pytest.fixture(autouse=True)
def clean_environment_per_test() -> Iterator[None]:
    """Each test starts and ends without them too: product code run in process may set one (``build_release``
    sets ``SOURCE_DATE_EPOCH``, ``build.py server`` its settings) and it must not reach the next test."""
    _scrub()
    yield
    _scrub()


def _scrub() -> None:
    for name in [n for n in os.environ if scrubbed(n)]:
        del os.environ[name]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``{"ec": (private, public), "rsa": ..., "ec2": ...}`` generated once per session."""
    base = tmp_path_factory.mktemp("keys")
    out = {}
    for name, kt in (("ec", KeyType.ECDSA_P256), ("rsa", KeyType.RSA_3072), ("ec2", KeyType.ECDSA_P256)):
        out[name] = generate_keypair(kt, base / name)
    return out


def make_payload(path: Path, size: int, seed: int = 1) -> Path:
    """A file that looks like a filesystem: text, binary-ish runs and zero blocks."""
    rng = random.Random(seed)
    words = [b"systemd", b"video", b"ai", b"rootfs", b"slot", b"\x00\x01\x02", b"libc.so.6", b"/usr/lib/"]
    parts: list[bytes] = []
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.5:
            chunk = b" ".join(rng.choice(words) for _ in range(rng.randint(10, 400)))
        elif kind < 0.8:
            chunk = rng.randbytes(rng.randint(100, 5000))
        else:
            chunk = bytes(4096 * rng.randint(1, 8))
        parts.append(chunk)
        total += len(chunk)
    path.write_bytes(b"".join(parts)[:size])
    return path


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    return make_payload(tmp_path / "rootfs.ext4", 300_000)


@pytest.fixture(scope="session")
def mender_artifact() -> str:
    """The real mender-artifact 3.9 binary (installed by the README's setup). Its absence is a failure."""
    path = shutil.which("mender-artifact")
    if path is None:
        pytest.fail("mender-artifact is not installed: run scripts/setup.sh (apt-get install mender-artifact)")
    return path


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python build.py ...`` as a user would."""

    def run(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"build.py {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


EPOCH = "1700000000"


def build_release(out: Path, key: Path, *extra: str) -> Path:
    """``build.py release`` as a release engineer runs it (reproducible: SOURCE_DATE_EPOCH); returns the
    version directory."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(BUILD_PY), "release", "--key", str(key), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / "1.0.0"


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> Path:
    """The default release (both boards), built once per test session and shared by the image tests."""
    return build_release(tmp_path_factory.mktemp("release"), keys["ec"][0])


# ---------------------------------------------------------------------------------------------------------
# Databases: the server's tests run on SQLite and on PostgreSQL through one fixture parameter


def _pg_tool(name: str) -> str:
    path = find_program(name)
    if path is None:
        pytest.fail(f"{name} not found: {install_hint(name)}")
    return str(path)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the session (initdb/pg_ctl; run as the ``postgres`` user
    when the tests run as root, its directory outside pytest's private temporary tree so that user can reach
    it). The URL of its ``ota`` database; :func:`create_database` makes more."""
    from devkit.net import free_port

    base = Path(tempfile.mkdtemp(prefix="ota-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    subprocess.run([*as_user, _pg_tool("initdb"), "-D", str(data), "-A", "trust", "-U", "ota"], check=True,
                   capture_output=True, cwd=base)
    pg_ctl = _pg_tool("pg_ctl")
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, cwd=base)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([_pg_tool("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "ota", "-d", "postgres",
                              "-c", "CREATE DATABASE ota"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, (base / "log").read_text()
            time.sleep(0.3)
        yield f"postgresql://ota@127.0.0.1:{port}/ota"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def create_database(postgres: str, prefix: str = "ota") -> str:
    """A new, empty database on the session's cluster (``postgres`` is the fixture's URL); its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    subprocess.run([_pg_tool("psql"), postgres, "-c", f"CREATE DATABASE {name}"], check=True, capture_output=True)
    return postgres.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """The database of a module's server, one module run per backend: ``None`` (the server's own SQLite file
    in its work directory) or a new database on the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return None
    return create_database(request.getfixturevalue("postgres"))


@pytest.fixture(scope="module")
def server(db_url: str | None, tmp_path_factory: pytest.TempPathFactory,
           keys: dict[str, tuple[Path, Path]]) -> Iterator[Any]:
    """One server per test module and database (see :func:`db_url`), trusting the ``ec`` and ``rsa`` release
    keys. Modules that import ``server_fixture`` from server_helpers get a SQLite-only one instead."""
    from .server_helpers import Server

    s = Server(tmp_path_factory.mktemp("server"), "--release-key", str(keys["ec"][1]),
               "--release-key", str(keys["rsa"][1]), db_url=db_url).start()
    yield s
    s.stop()
