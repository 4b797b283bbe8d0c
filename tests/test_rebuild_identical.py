"""A rebuild of a release is bit-identical (the fast half of tests/test_image_build.py's slow
``test_rebuild_is_bit_identical``).

The regressions it pins, both in what the ``ota`` layer brings in: the repository's own packages (``device_hooks``,
``artifacts``, ``ota_common``), copied into the image as trees from outside the layers directory.

- The SBOM (whose sha256 is in the artifact's signed header) named a file of such a tree by its base name alone,
  so ``__init__.py`` (and ``format.py``) stood for several files under one ``bom-ref``; cyclonedx-python-lib
  replaces a repeated ``bom-ref`` with a *random* one when it writes the document, so every build had another
  SBOM, another header, another signed manifest. Names are now the paths as the layer spells its sources
  (``../device_hooks/__init__.py``), and a repeated reference is an error, never a random one.
- Between two builds in one checkout those source trees change in ways that are not the release's content:
  Python writes ``__pycache__/*.pyc`` into them whenever a module is imported (also moving their directories'
  mtimes), and a fresh checkout gives every file another mtime. The image's tree files were stamped with the
  checkout's times and the SBOM listed the bytecode; now they get the release's epoch, and bytecode caches (which
  the image never gets) are in neither the SBOM nor the layer hashes.
"""

from __future__ import annotations

import filecmp
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

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
    (pkg / "__init__.py").write_text('"""The package."""\n')
    (pkg / "mod.py").write_text("VALUE = 1\n")
    (pkg / "sub" / "__init__.py").write_text('"""A subpackage."""\n')
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
    """The small release with a tree in its layer, a Python package from outside the layers directory (as the ota
    layer takes the repository's packages): (configuration, the package's source)."""
    layers = small_release.parent / "layers"
    pkg = _package(small_release.parent)
    os.utime(pkg / "mod.py", (ONE - 86400, ONE - 86400))  # older than the epoch too: the image stamps it anyway
    (layers / "small.yaml").write_text("templates:\n  - {src: small/version.j2, dest: /etc/small-version}\n"
                                       "trees:\n  - {src: ../pkg, dest: /usr/lib/small/pkg}\n")
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
    # named as the layer names its sources: the two __init__.py are two files, two components, two bom-refs
    assert [name for name, _ in layer_files(layer)] == [
        "small.yaml", "small/version.j2", "../pkg/__init__.py", "../pkg/mod.py", "../pkg/sub/__init__.py",
        "../pkg/sub/x.py"]
    refs = _bom_refs(json.loads(before))
    assert "file:small:../pkg/sub/__init__.py" in refs and len(refs) == len(set(refs))
    assert not [r for r in refs if r.startswith("BomRef")]  # the library's random stand-ins for repeated refs
    # what the SBOM lists of a tree is what the image gets of it
    assert [p.relative_to(pkg).as_posix() for p in tree_files(pkg)] == [
        "__init__.py", "mod.py", "sub", "sub/__init__.py", "sub/x.py"]
    # a changed source is a changed SBOM (the hashes are of the content)
    (pkg / "mod.py").write_text("VALUE = 2\n")
    assert sbom() != before and layer_hash(layer) != hashed


def _bom_refs(doc: dict[str, Any]) -> list[str]:
    refs, stack = [], [doc["metadata"]["component"], *doc["components"]]
    while stack:
        c = stack.pop()
        refs.append(c["bom-ref"])
        stack.extend(c.get("components", []))
    return refs


def test_the_sbom_of_the_repositorys_own_layers_is_the_same_bytes_every_time() -> None:
    """The layers a release ships (the ota layer's trees are device_hooks, artifacts and ota_common, with many
    files of one name): two SBOMs of the same inputs are the same bytes, every component under its own bom-ref."""
    repo = Path(__file__).resolve().parent.parent
    layers = load_layers([repo / "layers" / f"{n}.yaml" for n in ("base", "boot", "ota", "app")])

    def sbom() -> bytes:
        return make_sbom(name="vv-video-ai", version="1.0.0", board="qemu-virt", device_type="qemu-virt",
                         suite="bookworm", kernel="6.1", epoch=ONE, packages=PACKAGES, layers=layers)

    first = sbom()
    assert sbom() == first
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(first.decode()) is None
    refs = _bom_refs(json.loads(first))
    assert len(refs) == len(set(refs)) and not [r for r in refs if r.startswith("BomRef")]
    assert {"file:ota:../device_hooks/__init__.py", "file:ota:../artifacts/__init__.py",
            "file:ota:../artifacts/delta/__init__.py"} <= set(refs)


def test_a_repeated_bom_ref_is_an_error_not_a_random_one() -> None:
    """Two components under one reference (here a package listed with two versions): the library would write one
    of them under a random reference."""
    twice = [*PACKAGES, {**PACKAGES[0], "version": "12.5"}]
    with pytest.raises(ValueError, match="repeated bom-ref deb:base-files:arm64"):
        make_sbom(name="small", version="1.0.0", board="qemu-virt", device_type="qemu-virt", suite="bookworm",
                  kernel="6.1", epoch=ONE, packages=twice, layers=[])
