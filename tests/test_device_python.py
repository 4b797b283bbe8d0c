"""The reader must run on a device with Debian's python3 + python3-cryptography only: no ISA-L, no
zstandard. Run it in a subprocess where those modules cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from artifacts import Compression, load_signer
from artifacts.writer import rootfs_image_spec, write_artifact

from .conftest import REPO, make_payload

_SCRIPT = """
import sys
sys.modules["isal"] = None          # make 'import isal' fail, as on a device
sys.modules["zstandard"] = None
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import hashlib
from artifacts import ArtifactReader, load_verifier
from artifacts import compression
assert compression.igzip_lib is None
with ArtifactReader.open(Path(sys.argv[2]), verifiers=[load_verifier(Path(sys.argv[3]))]) as r:
    for f in r.files():
        h = hashlib.sha256()
        for chunk in f.chunks():
            h.update(chunk)
        print(f.name, h.hexdigest())
"""


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.LZMA, Compression.NONE])
@pytest.mark.parametrize("writer", ["ours", "mender-artifact"])
def test_reader_without_optional_modules(tmp_path: Path, keys, mender_artifact: str, compression: Compression, writer: str) -> None:  # type: ignore[no-untyped-def]
    src = make_payload(tmp_path / "rootfs.ext4", 6_000_000, seed=4)
    art = tmp_path / "a.mender"
    if writer == "ours":
        write_artifact(rootfs_image_spec(file=src, name="d", device_types=["q"]), art, compression=compression,
                       signer=load_signer(keys["ec"][0]))
    else:
        subprocess.run([mender_artifact, "write", "rootfs-image", "-f", str(src), "-n", "d", "-t", "q", "-k",
                        str(keys["ec"][0]), "--compression", compression.value, "-o", str(art)], check=True,
                       capture_output=True)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(REPO), str(art), str(keys["ec"][1])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import hashlib

    assert out.stdout.split() == ["rootfs.ext4", hashlib.sha256(src.read_bytes()).hexdigest()]


def test_zstd_without_zstandard_is_a_clear_error(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    src = make_payload(tmp_path / "rootfs.ext4", 100_000)
    art = tmp_path / "z.mender"
    write_artifact(rootfs_image_spec(file=src, name="d", device_types=["q"]), art, compression=Compression.ZSTD,
                   signer=load_signer(keys["ec"][0]))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(REPO), str(art), str(keys["ec"][1])],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "zstandard" in out.stderr and "UnsupportedArtifact" in out.stderr
