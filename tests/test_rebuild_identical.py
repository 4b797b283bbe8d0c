"""A rebuild of a release is bit-identical (the fast half of tests/test_image_build.py's slow
``test_rebuild_is_bit_identical``).

The regression it pins: the ``ota`` layer copies the repository's own packages (``device_hooks``, ``artifacts``,
``ota_common``) into the image as trees. Between two builds in one checkout those source trees change in ways that
are not the release's content: Python writes ``__pycache__/*.pyc`` into them whenever a module is imported (the
build itself, or any test, imports them), which also moves their directories' mtimes; and a fresh checkout gives
every file another mtime. The rebuild must not see any of that: the image's tree files are stamped with the release's
epoch (not the checkout's times), and bytecode caches — which the image never gets — are not in the SBOM (whose
sha256 is in the artifact's signed header) nor in the layer hashes.
"""

from __future__ import annotations

import filecmp
import json
import os
import tarfile
from pathlib import Path

import pytest

from artifacts.keys import load_signer
from image.layers import load_layers, tree_files
from image.release import build_release, layer_hash
from image.sbom import layer_files, make_sbom

from .test_release_steps import ONE, small_release  # noqa: F401 (a fixture)

ART = "small-1.0.0-qemu-virt.mender"
SBOM = "qemu-virt/sbom.cdx.json"
PACKAGES = [{"name": "base-files", "version": "12.4", "architecture": "arm64"}]


def _package(top: Path) -> Path:
    """A Python package as a layer's tree source: two modules, one in a subpackage."""
    pkg = top / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("X = 2\n")
    return pkg


def _import_and_touch(pkg: Path, when: float) -> None:
    """What happens to a source tree between two builds: its modules are imported (bytecode caches appear, which
    moves the directories' mtimes) and its files get other mtimes (a fresh checkout, a git operation)."""
    for d in (pkg, pkg / "sub"):
        cache = d / "__pycache__"
        cache.mkdir()
        (cache / "mod.cpython-311.pyc").write_bytes(b"\xa7\r\r\n" + os.urandom(16))
    (pkg / "stray.pyc").write_bytes(os.urandom(8))
    for p in [pkg, *pkg.rglob("*")]:
        if "__pycache__" not in p.parts and p.suffix != ".pyc":
            os.utime(p, (when, when))


def _manifest_of(art: Path) -> bytes:
    with tarfile.open(art) as tf:
        f = tf.extractfile("manifest")
        assert f is not None
        return f.read()


@pytest.fixture
def release_with_tree(small_release: Path) -> tuple[Path, Path]:  # noqa: F811
    """The small release with a tree (a Python package) in its layer: (configuration, the package's source)."""
    layers = small_release.parent / "layers"
    pkg = _package(layers / "small")
    os.utime(pkg / "mod.py", (ONE - 86400, ONE - 86400))  # older than the epoch too: the image stamps it anyway
    (layers / "small.yaml").write_text("templates:\n  - {src: small/version.j2, dest: /etc/small-version}\n"
                                       "trees:\n  - {src: small/pkg, dest: /usr/lib/small/pkg}\n")
    return small_release, pkg


def test_a_rebuild_after_the_sources_were_imported_and_checked_out_again_is_bit_identical(
        release_with_tree: tuple[Path, Path], tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    config, pkg = release_with_tree
    signer = load_signer(keys["ec"][0])
    cache = tmp_path / "cache"
    first = build_release(config=config, signer=signer, out=tmp_path / "a", cache_dir=cache, epoch=ONE)
    _import_and_touch(pkg, when=ONE + 12345)
    again = build_release(config=config, signer=signer, out=tmp_path / "b", cache_dir=cache, epoch=ONE)

    # the image's copy of the tree: the release's epoch, whatever the checkout's times; no bytecode
    root = cache / "work" / "small" / "root" / "usr" / "lib" / "small" / "pkg"
    assert {os.lstat(p).st_mtime for p in [root, *root.rglob("*")]} == {ONE}
    assert not [p for p in root.rglob("*") if "__pycache__" in p.parts or p.suffix == ".pyc"]

    a, b = first.out_dir, again.out_dir
    assert (a / "rootfs.ext4").read_bytes() == (b / "rootfs.ext4").read_bytes()
    assert (a / SBOM).read_bytes() == (b / SBOM).read_bytes()
    assert _manifest_of(a / ART) == _manifest_of(b / ART)  # payload and header checksums: the signed content
    assert filecmp.cmp(a / "qemu-virt" / "disk.img", b / "qemu-virt" / "disk.img", shallow=False)
    layers = [json.loads((d / "manifest.json").read_text())["layers"] for d in (a, b)]
    assert layers[0] == layers[1]


def test_the_sbom_of_the_same_inputs_is_the_same_bytes_and_lists_no_bytecode(
        release_with_tree: tuple[Path, Path]) -> None:
    config, pkg = release_with_tree
    (layer,) = load_layers([config.parent / "layers" / "small.yaml"])

    def sbom() -> bytes:
        return make_sbom(name="small", version="1.0.0", board="qemu-virt", device_type="qemu-virt", suite="bookworm",
                         kernel="6.1", epoch=ONE, packages=PACKAGES, layers=[layer])

    before, hashed = sbom(), layer_hash(layer)
    assert sbom() == before
    _import_and_touch(pkg, when=ONE + 1)
    assert sbom() == before and layer_hash(layer) == hashed
    assert [name for name, _ in layer_files(layer)] == [
        "small.yaml", "small/version.j2", "small/pkg/__init__.py", "small/pkg/mod.py", "small/pkg/sub/__init__.py",
        "small/pkg/sub/x.py"]
    # what the SBOM lists of a tree is what the image gets of it
    assert [p.relative_to(pkg).as_posix() for p in tree_files(pkg)] == [
        "__init__.py", "mod.py", "sub", "sub/__init__.py", "sub/x.py"]
    # a changed source is a changed SBOM (the hashes are of the content)
    (pkg / "mod.py").write_text("VALUE = 2\n")
    assert sbom() != before and layer_hash(layer) != hashed
