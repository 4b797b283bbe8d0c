"""``sbom.cdx.json``: a CycloneDX 1.5 software bill of materials of a release's image (issue 17).

What is in the image, for whoever must answer "are we affected by CVE-x?" without booting a device: every Debian
package of the built rootfs (from its dpkg status, the list manifest.json records) with a purl, the files of the
layers with their sha256, and the application. Written with ``cyclonedx-python-lib`` (the reference library,
whose own validator the tests run) rather than by hand, so the document follows the schema as it evolves.

The SBOM is reproducible: the same release at the same ``SOURCE_DATE_EPOCH`` gives the same bytes. Its time is
the release's epoch, every component has a fixed ``bom-ref`` (the library's default is a random UUID), and its
serial number is a UUID derived from the document's own content rather than a random one. Its sha256 is carried
in the artifact's signed header (:data:`artifacts.format.SBOM_SHA256_KEY`), so a device or server can prove
which SBOM belongs to a payload.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePath

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot5
from packageurl import PackageURL

from ota_common.files import sha256_file

from .layers import Layer, tree_files

SBOM = "sbom.cdx.json"
#: the layer that holds the preloaded application (DESIGN.md section 1): listed as an application component
APP_LAYER = "app"
#: the namespace of the SBOM's serial number: uuid5(namespace, sha256 of the document without it)
_SERIAL_NAMESPACE = uuid.UUID("6f7c1d2e-5a1b-5c3e-9d7f-0a6b2c4e8f10")


def debian_purl(package: Mapping[str, str], suite: str) -> PackageURL:
    """``pkg:deb/debian/<name>@<version>?arch=<arch>&distro=debian-<suite>`` (the purl spec's deb type)."""
    return PackageURL("deb", "debian", package["name"], package["version"],
                      {"arch": package["architecture"], "distro": f"debian-{suite}"})


def layer_files(layer: Layer) -> Iterator[tuple[str, Path]]:
    """The files a layer consists of, each with its path relative to the layers directory as a layer names its
    sources (``app.yaml``, ``app/files/vv-video-ai.py``, ``../device_hooks/agent.py`` for a tree outside it), so
    every name is unique; in a stable order: the layer file, then its files, templates and trees (of a tree, what
    the image gets: no bytecode caches, :data:`image.layers.TREE_IGNORE`)."""
    top = layer.path.resolve().parent
    seen: set[Path] = set()

    def named(p: Path) -> Iterator[tuple[str, Path]]:
        if p not in seen:
            seen.add(p)
            yield PurePath(os.path.relpath(p, top)).as_posix(), p

    yield from named(layer.path.resolve())
    m = layer.model
    for entry in (*m.files, *m.templates):
        yield from named(layer.source(entry.src))
    for tree in m.trees:
        for p in tree_files(layer.source(tree.src)):
            if p.is_file():
                yield from named(p.resolve())


def _file_component(layer: str, name: str, path: Path) -> Component:
    return Component(type=ComponentType.FILE, name=name, bom_ref=f"file:{layer}:{name}",
                     hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha256_file(path))])


def _layer_component(layer: Layer, version: str) -> Component:
    files = [_file_component(layer.name, name, p) for name, p in layer_files(layer)]
    if layer.name == APP_LAYER:
        return Component(type=ComponentType.APPLICATION, name=layer.name, version=version, bom_ref=f"app:{layer.name}",
                         description=(layer.model.description or "").strip() or None, components=files,
                         properties=[Property(name="vv:layer", value=layer.name)])
    return Component(type=ComponentType.FILE, name=f"{layer.name}.yaml", group="layer", bom_ref=f"layer:{layer.name}",
                     components=files, properties=[Property(name="vv:layer", value=layer.name)])


def make_sbom(*, name: str, version: str, board: str, device_type: str, suite: str, kernel: str, epoch: int,
              packages: Sequence[Mapping[str, str]], layers: Sequence[Layer]) -> bytes:
    """The SBOM of one board's image of a release, as the bytes of ``sbom.cdx.json``. ``packages``: the rootfs's
    installed Debian packages (``name``, ``version``, ``architecture``, as :func:`image.rootfs.package_list`
    gives them)."""
    bom = Bom(serial_number=uuid.UUID(int=0))  # a placeholder while the content is hashed
    bom.metadata.timestamp = datetime.fromtimestamp(epoch, UTC)
    bom.metadata.component = Component(
        type=ComponentType.FIRMWARE, name=name, version=version, bom_ref=f"release:{name}@{version}",
        description=f"{name} {version}: the A/B root filesystem image for {board}",
        properties=[Property(name="vv:board", value=board), Property(name="vv:device_type", value=device_type),
                    Property(name="vv:source_date_epoch", value=str(epoch)), Property(name="vv:kernel", value=kernel)])
    bom.metadata.properties.add(Property(name="vv:debian_suite", value=suite))
    for p in packages:
        bom.components.add(Component(type=ComponentType.LIBRARY, name=p["name"], version=p["version"],
                                     bom_ref=f"deb:{p['name']}:{p['architecture']}", purl=debian_purl(p, suite),
                                     properties=[Property(name="vv:architecture", value=p["architecture"])]))
    for layer in layers:
        bom.components.add(_layer_component(layer, version))
    bom.register_dependency(bom.metadata.component, bom.components)  # the image holds all of them
    _check_unique_refs(bom)
    unnumbered = _render(bom)
    bom.serial_number = uuid.uuid5(_SERIAL_NAMESPACE, hashlib.sha256(unnumbered).hexdigest())
    return _render(bom)


def _check_unique_refs(bom: Bom) -> None:
    """Every component's ``bom-ref`` is set and unique. The library's writer replaces a missing or repeated one
    with a *random* value (``BomRef.0.123…``), which would make the SBOM — and the artifact header that carries
    its sha256 — differ on every build. Raises :class:`ValueError` naming the repeated references (a bug here:
    the references are derived from unique names)."""
    refs: list[str | None] = []
    stack = [bom.metadata.component, *bom.components]
    while stack:
        c = stack.pop()
        if c is not None:
            refs.append(c.bom_ref.value)
            stack.extend(c.components)
    if None in refs:
        raise ValueError("SBOM: a component has no bom-ref")
    repeated = sorted(r for r, n in Counter(refs).items() if r is not None and n > 1)
    if repeated:
        raise ValueError(f"SBOM: repeated bom-ref {', '.join(repeated[:5])}: the SBOM would not be reproducible")


def _render(bom: Bom) -> bytes:
    return (JsonV1Dot5(bom).output_as_string(indent=2) + "\n").encode()


__all__ = ["APP_LAYER", "SBOM", "debian_purl", "layer_files", "make_sbom"]
