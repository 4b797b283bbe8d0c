"""Shared fixtures: keys made by our own generator, small payload files, the real mender-artifact binary."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from artifacts import KeyType, generate_keypair

REPO = Path(__file__).resolve().parent.parent
BUILD_PY = REPO / "build.py"


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
