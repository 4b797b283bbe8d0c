"""The server's reading of a release's SBOM and the package diff between two releases (issue 17), as pure
functions: ota_server/sbom.py. The routes and pages that use them: tests/test_server_sbom.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from image.sbom import make_sbom
from ota_server.sbom import MAX_SBOM, Package, SbomError, compare_versions, diff_packages, read_sbom


def _pkg(name: str, version: str, arch: str = "arm64", suite: str = "bookworm") -> Package:
    return Package(name, version, f"pkg:deb/debian/{name}@{version}?arch={arch}&distro=debian-{suite}")


def _doc(components: list[Any], **top: Any) -> bytes:
    return json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.5", "components": components, **top}).encode()


def test_the_packages_of_a_release_sbom_are_its_components_with_a_purl() -> None:
    data = make_sbom(name="vv", version="2", board="rpi4", device_type="raspberrypi4", suite="bookworm", kernel="6.1",
                     epoch=1700000000, layers=[],
                     packages=[{"name": "libc6", "version": "2.36-9+deb12u4", "architecture": "arm64"},
                               {"name": "bash", "version": "5.2.15-2+b2", "architecture": "arm64"}])
    got = read_sbom(data)
    assert [(p.name, p.version) for p in got] == [("bash", "5.2.15-2+b2"), ("libc6", "2.36-9+deb12u4")]
    assert got[0].purl == "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=arm64&distro=debian-bookworm"
    # nested components count too; a component without a purl (a layer file, the app) is not a package
    nested = _doc([{"type": "application", "name": "app", "version": "2",
                    "components": [{"type": "library", "name": "flask", "version": "3.0.0", "purl": "pkg:pypi/flask@3.0.0"},
                                   {"type": "file", "name": "app.py"}]}])
    assert read_sbom(nested) == [Package("flask", "3.0.0", "pkg:pypi/flask@3.0.0")]
    assert read_sbom(_doc([])) == [] and read_sbom(b'{"bomFormat": "CycloneDX", "specVersion": "1.6"}') == []


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (b'{"bomFormat": "SPDX", "specVersion": "1.5"}', "not a CycloneDX document"),
    (b'{"bomFormat": "CycloneDX", "specVersion": "9.9"}', "specVersion '9.9'"),
    (_doc({"name": "x"}), "components must be a list"),  # type: ignore[arg-type]
    (_doc(["libc6"]), "components[0] is not an object"),
    (_doc([{"type": "library", "version": "1"}]), "components[0].name must be a non-empty string"),
    (_doc([{"name": "libc6", "purl": "pkg:deb/debian/libc6"}]), "version (of package libc6) must be"),
    (_doc([{"name": "libc6", "version": "1", "purl": "libc6"}]), "is not a package URL"),
    (_doc([{"name": "libc6\n<b>", "version": "1", "purl": "pkg:deb/debian/libc6@1"}]), "control character"),
    (_doc([{"name": "x" * 300, "version": "1", "purl": "pkg:deb/debian/x@1"}]), "longer than 256"),
    (_doc([{"name": "libc6", "version": "1", "purl": "pkg:deb/debian/libc6@1?arch=arm64"},
           {"name": "libc6", "version": "2", "purl": "pkg:deb/debian/libc6@2?arch=arm64"}]), "listed twice"),
])
def test_a_document_the_server_cannot_read_is_refused_in_words(data: bytes, message: str) -> None:
    with pytest.raises(SbomError) as e:
        read_sbom(data)
    assert message in str(e.value)


def test_bounds_on_size_depth_and_count() -> None:
    with pytest.raises(SbomError, match="more than an SBOM may have"):
        read_sbom(b" " * (MAX_SBOM + 1))
    deep: dict[str, Any] = {"name": "leaf"}
    for i in range(20):
        deep = {"name": f"n{i}", "components": [deep]}
    with pytest.raises(SbomError, match="nest deeper"):
        read_sbom(_doc([deep]))
    # the same package for two architectures is two packages
    two = _doc([{"name": "libc6", "version": "1", "purl": "pkg:deb/debian/libc6@1?arch=arm64"},
                {"name": "libc6", "version": "1", "purl": "pkg:deb/debian/libc6@1?arch=armhf"}])
    assert len(read_sbom(two)) == 2


def test_debian_version_order() -> None:
    assert compare_versions("2.36-9+deb12u4", "2.36-9") == 1
    assert compare_versions("1:1.0", "9.9") == 1  # an epoch wins: a string comparison would say older
    assert compare_versions("1.0~rc1", "1.0") == -1
    assert compare_versions("1.0", "1.0") == 0
    assert compare_versions("not a version!", "also not!") in (-1, 1)


def test_the_diff_between_two_releases() -> None:
    old = [_pkg("libc6", "2.36-9"), _pkg("openssl", "3.0.11-1"), _pkg("oldpkg", "1.0"), _pkg("python3", "3.11.2-1"),
           _pkg("epochy", "10.0-1"), _pkg("libc6", "2.36-9", arch="armhf")]
    new = [_pkg("libc6", "2.36-9+deb12u4", suite="trixie"), _pkg("openssl", "3.0.9-1"), _pkg("newpkg", "0.1"),
           _pkg("python3", "3.11.2-1"), _pkg("epochy", "1:2.0-1"), _pkg("libc6", "2.36-9", arch="armhf")]
    d = diff_packages(old, new)
    assert [p.name for p in d.added] == ["newpkg"] and [p.name for p in d.removed] == ["oldpkg"]
    # another distro qualifier (bookworm -> trixie) is the same package, upgraded
    assert [(c.name, c.from_version, c.to_version) for c in d.upgraded] == [
        ("epochy", "10.0-1", "1:2.0-1"), ("libc6", "2.36-9", "2.36-9+deb12u4")]
    assert [(c.name, c.from_version, c.to_version) for c in d.downgraded] == [("openssl", "3.0.11-1", "3.0.9-1")]
    assert d.unchanged == 2  # python3, libc6:armhf
    assert d.doc()["upgraded"][1] == {"name": "libc6", "purl": new[0].purl, "from_version": "2.36-9",
                                      "to_version": "2.36-9+deb12u4"}
    assert diff_packages(new, new).doc() == {"added": [], "removed": [], "upgraded": [], "downgraded": [],
                                             "unchanged": len(new)}
