"""Issue 17 on the update server: an operator uploads a release's SBOM and provenance next to each artifact; the
server takes them only when it can prove they belong to it (the SBOM's sha256 is the one the artifact's signed
header names; the provenance is signed by a trusted release key and names the artifact's sha256), and shows the
packages of a release and the diff between two releases in the API and on the dashboard (headless Chromium).
The pure parts (reading a CycloneDX document, Debian version order, the diff): tests/test_sbom_diff.py."""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from collections.abc import Sequence
from html import unescape
from pathlib import Path
from typing import Any

import pytest

from artifacts import load_signer
from artifacts.provenance import sign_envelope, statement
from artifacts.writer import rootfs_image_spec, write_artifact
from image.sbom import make_sbom

from .conftest import make_payload
from .server_helpers import Device, Server, server_fixture, upload  # noqa: F401 - fixture
from .server_helpers import write_artifact as write_module_artifact

ARTIFACTS = "/api/management/v1/deployments/artifacts"
RELEASES = "/api/management/v1/deployments/deployments/releases"
OLD = [("libc6", "2.36-9"), ("openssl", "3.0.11-1"), ("oldpkg", "1.0"), ("python3", "3.11.2-1"), ("epochy", "10.0-1")]
NEW = [("libc6", "2.36-9+deb12u4"), ("openssl", "3.0.9-1"), ("newpkg", "0.1"), ("python3", "3.11.2-1"),
       ("epochy", "1:2.0-1")]


def sbom_of(version: str, packages: Sequence[tuple[str, str]], device_type: str = "qemu-virt") -> bytes:
    return make_sbom(name="vv", version=version, board=device_type, device_type=device_type, suite="bookworm",
                     kernel="6.1.0-18-arm64", epoch=1700000000, layers=[],
                     packages=[{"name": n, "version": v, "architecture": "arm64"} for n, v in packages])


def release(tmp: Path, name: str, packages: Sequence[tuple[str, str]], key: Path, device_type: str = "qemu-virt",
            seed: int = 1) -> tuple[Path, bytes]:
    """A signed rootfs-image artifact whose header names the sha256 of its SBOM, and that SBOM."""
    sbom = sbom_of(name, packages, device_type)
    image = make_payload(tmp / f"{name}-{device_type}.ext4", 40_000, seed=seed)
    spec = rootfs_image_spec(file=image, name=name, device_types=[device_type], software_version=name,
                             sbom_sha256=hashlib.sha256(sbom).hexdigest())
    return write_artifact(spec, tmp / f"{name}-{device_type}.mender", signer=load_signer(key)).path, sbom


def uploaded(server: Server, path: Path) -> str:
    r = upload(server, path)
    assert r.status_code == 201, r.text
    return r.headers["Location"].rsplit("/", 1)[1]


def provenance(key: Path | None, **subjects: Path) -> bytes:
    return sign_envelope(statement({n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in subjects.items()},
                                   {"buildDefinition": {"buildType": "urn:test"}}),
                         None if key is None else load_signer(key))


def put(server: Server, path: str, body: bytes) -> Any:
    with server.admin() as a:
        return a.put(path, content=body, headers={"Content-Type": "application/json"})


def get(server: Server, path: str) -> Any:
    with server.admin() as a:
        return a.get(path)


def test_the_sbom_and_provenance_are_stored_with_their_artifact(server: Server, keys: dict[str, tuple[Path, Path]],
                                                                 tmp_path: Path) -> None:
    art, sbom = release(tmp_path, "vv-1.0", OLD, keys["ec"][0])
    art_id = uploaded(server, art)
    assert get(server, f"{ARTIFACTS}/{art_id}/sbom").status_code == 404
    r = put(server, f"{ARTIFACTS}/{art_id}/sbom", sbom)
    assert r.status_code == 204, r.text
    r = get(server, f"{ARTIFACTS}/{art_id}/sbom")
    assert r.status_code == 200 and r.content == sbom and r.headers["content-type"] == "application/vnd.cyclonedx+json"
    doc = get(server, f"{ARTIFACTS}/{art_id}/packages").json()
    assert doc["artifact_name"] == "vv-1.0" and doc["sbom_sha256"] == hashlib.sha256(sbom).hexdigest()
    assert sorted((p["name"], p["version"]) for p in doc["packages"]) == sorted(OLD)
    assert all(p["purl"].startswith(f"pkg:deb/debian/{p['name']}@") for p in doc["packages"])
    assert put(server, f"{ARTIFACTS}/{art_id}/sbom", sbom).status_code == 204  # again: the same, replaced

    env = provenance(keys["ec"][0], **{art.name: art, "qemu-virt/sbom.cdx.json": tmp_path / "vv-1.0-qemu-virt.ext4"})
    r = put(server, f"{ARTIFACTS}/{art_id}/provenance", env)
    assert r.status_code == 204, r.text
    r = get(server, f"{ARTIFACTS}/{art_id}/provenance")
    assert r.status_code == 200 and r.content == env and r.headers["x-provenance-signed-by"].startswith("ECDSA")
    summaries = [s for (s,) in server.query("SELECT summary FROM audit_log")]
    assert any(s.startswith("uploaded the SBOM of artifact vv-1.0") and "5 packages" in s for s in summaries)
    assert any(s.startswith("uploaded the provenance of artifact vv-1.0") and "signed by ECDSA" in s for s in summaries)

    # deleting the artifact deletes them
    with server.admin() as a:
        assert a.delete(f"{ARTIFACTS}/{art_id}").status_code == 204
    assert server.query("SELECT count(*) FROM artifact_sboms WHERE artifact_id = :i", i=art_id) == [(0,)]
    assert server.query("SELECT count(*) FROM artifact_provenance WHERE artifact_id = :i", i=art_id) == [(0,)]


def test_attack_stories_documents_that_do_not_belong_to_the_artifact_are_refused(
        server: Server, keys: dict[str, tuple[Path, Path]], tmp_path: Path, run_cli: Any) -> None:
    old, old_sbom = release(tmp_path, "vv-a-1.0", OLD, keys["ec"][0], seed=2)
    new, new_sbom = release(tmp_path, "vv-a-2.0", NEW, keys["ec"][0], seed=3)
    old_id, new_id = uploaded(server, old), uploaded(server, new)

    # an SBOM of another release (say, one without the vulnerable package) offered for this artifact
    r = put(server, f"{ARTIFACTS}/{old_id}/sbom", new_sbom)
    assert r.status_code == 400 and "not the one of artifact vv-a-1.0" in r.json()["error"], r.text
    # the same document with one byte changed (a package version "fixed" by hand)
    forged = old_sbom.replace(b'"10.0-1"', b'"10.0-2"')
    assert forged != old_sbom
    assert put(server, f"{ARTIFACTS}/{old_id}/sbom", forged).status_code == 400
    assert get(server, f"{ARTIFACTS}/{old_id}/sbom").status_code == 404  # nothing was stored

    # an artifact whose signed header names no SBOM cannot get one
    module = write_module_artifact(run_cli, tmp_path / "module.mender", "vv-a-module", key=keys["ec"][0])
    module_id = uploaded(server, module)
    r = put(server, f"{ARTIFACTS}/{module_id}/sbom", old_sbom)
    assert r.status_code == 409 and "names no SBOM" in r.json()["error"]

    # a document past the body limit is refused before it is read; an empty one is no document
    r = put(server, f"{ARTIFACTS}/{old_id}/sbom", b" " * (16 * 1024 * 1024 + 1))
    assert r.status_code == 413, r.text
    assert put(server, f"{ARTIFACTS}/{old_id}/sbom", b"").status_code == 400
    assert put(server, f"{ARTIFACTS}/no-such-id/sbom", old_sbom).status_code == 404

    # provenance signed by a key the server does not trust (an attacker's own "release key")
    r = put(server, f"{ARTIFACTS}/{old_id}/provenance", provenance(keys["ec2"][0], **{old.name: old}))
    assert r.status_code == 400 and "no signature verifies" in r.json()["error"], r.text
    # a genuine provenance, but of another artifact
    r = put(server, f"{ARTIFACTS}/{old_id}/provenance", provenance(keys["ec"][0], **{new.name: new}))
    assert r.status_code == 400 and "not about artifact vv-a-1.0" in r.json()["error"], r.text
    # an unsigned envelope (the server has release keys and does not allow unsigned uploads)
    r = put(server, f"{ARTIFACTS}/{old_id}/provenance", provenance(None, **{old.name: old}))
    assert r.status_code == 400 and "not signed" in r.json()["error"], r.text
    # a signed envelope whose statement was swapped for another (the signature is over the payload)
    import base64
    import json

    env = json.loads(provenance(keys["ec"][0], **{new.name: new}))
    env["payload"] = json.loads(provenance(keys["ec"][0], **{old.name: old}))["payload"]
    env["signatures"] = json.loads(provenance(keys["ec2"][0], **{new.name: new}))["signatures"]
    r = put(server, f"{ARTIFACTS}/{old_id}/provenance", json.dumps(env).encode())
    assert r.status_code == 400 and "no signature verifies" in r.json()["error"]
    assert base64.b64decode(env["payload"])  # (the swapped payload itself is well-formed)
    assert put(server, f"{ARTIFACTS}/{old_id}/provenance", b"{}").status_code == 400
    assert get(server, f"{ARTIFACTS}/{old_id}/provenance").status_code == 404
    assert put(server, f"{ARTIFACTS}/{new_id}/sbom", new_sbom).status_code == 204  # the right one still goes in


def test_release_packages_and_the_diff_between_two_releases(server: Server, keys: dict[str, tuple[Path, Path]],
                                                            tmp_path: Path) -> None:
    for name, packages, seed in (("vv-b-1.0", OLD, 4), ("vv-b-2.0", NEW, 5)):
        art, sbom = release(tmp_path, name, packages, keys["ec"][0], seed=seed)
        assert put(server, f"{ARTIFACTS}/{uploaded(server, art)}/sbom", sbom).status_code == 204
    doc = get(server, f"{RELEASES}/vv-b-2.0/packages").json()
    assert doc["name"] == "vv-b-2.0" and doc["device_types"] == ["qemu-virt"]
    assert sorted((p["name"], p["version"]) for p in doc["packages"]) == sorted(NEW)

    d = get(server, f"{RELEASES}/vv-b-2.0/diff?from=vv-b-1.0").json()
    assert (d["from"], d["to"]) == ("vv-b-1.0", "vv-b-2.0")
    assert [p["name"] for p in d["added"]] == ["newpkg"] and [p["name"] for p in d["removed"]] == ["oldpkg"]
    assert [(c["name"], c["from_version"], c["to_version"]) for c in d["upgraded"]] == [
        ("epochy", "10.0-1", "1:2.0-1"), ("libc6", "2.36-9", "2.36-9+deb12u4")]  # the epoch wins (Debian order)
    assert [(c["name"], c["to_version"]) for c in d["downgraded"]] == [("openssl", "3.0.9-1")]
    assert d["unchanged"] == 1
    back = get(server, f"{RELEASES}/vv-b-1.0/diff?from=vv-b-2.0").json()  # a rollback's view
    assert [p["name"] for p in back["added"]] == ["oldpkg"] and [c["name"] for c in back["upgraded"]] == ["openssl"]

    r = get(server, f"{RELEASES}/vv-b-2.0/diff?from=no-such-release")
    assert r.status_code == 404 and "no release named 'no-such-release'" in r.json()["error"]
    assert get(server, f"{RELEASES}/no-such-release/diff?from=vv-b-1.0").status_code == 404
    assert get(server, f"{RELEASES}/no-such-release/packages").status_code == 404
    assert get(server, f"{RELEASES}/vv-b-2.0/diff").status_code == 400  # from is required
    # a release uploaded without its SBOM
    art, _ = release(tmp_path, "vv-b-3.0", NEW, keys["ec"][0], seed=6)
    uploaded(server, art)
    r = get(server, f"{RELEASES}/vv-b-3.0/diff?from=vv-b-1.0")
    assert r.status_code == 404 and "has no SBOM" in r.json()["error"]

    # one release whose boards' SBOMs differ: the device type says which
    art, sbom = release(tmp_path, "vv-b-2.0", [*NEW, ("rpi-firmware", "1.2")], keys["ec"][0], device_type="rpi4",
                        seed=7)
    assert put(server, f"{ARTIFACTS}/{uploaded(server, art)}/sbom", sbom).status_code == 204
    r = get(server, f"{RELEASES}/vv-b-2.0/packages")
    assert r.status_code == 409 and "give device_type" in r.json()["error"]
    d = get(server, f"{RELEASES}/vv-b-2.0/diff?from=vv-b-1.0&device_type=qemu-virt").json()
    assert [p["name"] for p in d["added"]] == ["newpkg"]
    assert get(server, f"{RELEASES}/vv-b-2.0/diff?from=vv-b-1.0&device_type=rpi4").status_code == 404  # 1.0: no rpi4


def _rows(dom: str, table_id: str) -> list[list[str]]:
    """The cells of each body row of the table ``table_id``, as text."""
    m = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', dom, re.S)
    assert m, f"no table {table_id}"
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", m.group(1), re.S)]


@pytest.mark.slow
def test_chromium_shows_the_package_diff_between_two_releases(
        server: Server, keys: dict[str, tuple[Path, Path]], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An operator opens the releases list, follows "since vv-c-1.0" to the diff page and reads the added, removed,
    upgraded and downgraded packages; the deployment preview shows the same diff for the devices' release."""
    from .test_dashboard import SCREENSHOTS, _group_alive, _kill_group, chromium_binary, fetch, run_chromium

    for name, packages, seed in (("vv-c-1.0", OLD, 8), ("vv-c-2.0", NEW, 9)):
        art, sbom = release(tmp_path, name, packages, keys["ec"][0], seed=seed)
        art_id = uploaded(server, art)
        assert put(server, f"{ARTIFACTS}/{art_id}/sbom", sbom).status_code == 204
        assert put(server, f"{ARTIFACTS}/{art_id}/provenance",
                   provenance(keys["ec"][0], **{art.name: art})).status_code == 204
    listing = fetch(server, "/ui/releases", bearer=server.admin_token)
    assert listing.status == 200
    html = listing.body.decode()
    link = '/ui/releases/vv-c-2.0/diff?from=vv-c-1.0'
    assert f'href="{link}"' in html.replace("&amp;", "&")

    binary = chromium_binary()
    live: list[int] = []
    request.addfinalizer(lambda: [_kill_group(pid) for pid in live])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    r = fetch(server, "/ui/login-link?" + urllib.parse.urlencode({"next": link}), method="POST",
              bearer=server.admin_token)
    assert r.status == 200, r
    shot = SCREENSHOTS / "release-diff.png"
    shot.unlink(missing_ok=True)
    t0 = time.monotonic()
    dom = run_chromium(binary, tmp_path / "profile-diff", server.url + r.json()["url"], shot, live)
    print(f"screenshot: {shot} ({time.monotonic() - t0:.1f} s)")
    assert "<title>vv-c-1.0 → vv-c-2.0 · vv-ota</title>" in dom
    assert _rows(dom, "diff-added") == [["newpkg", "0.1"]]
    assert _rows(dom, "diff-removed") == [["oldpkg", "1.0"]]
    assert _rows(dom, "diff-upgraded") == [["epochy", "10.0-1", "1:2.0-1"], ["libc6", "2.36-9", "2.36-9+deb12u4"]]
    assert _rows(dom, "diff-downgraded") == [["openssl", "3.0.11-1", "3.0.9-1"]]
    assert re.search(r'id="count-unchanged">1<', dom)
    for pid in live:
        assert not _group_alive(pid), f"Chromium processes of group {pid} left behind"

    # the release page lists its packages and the provenance as verified; unknown releases are a 404 page
    page = fetch(server, "/ui/releases/vv-c-2.0", bearer=server.admin_token).body.decode()
    assert sorted(tuple(row[:2]) for row in _rows(page, "packages-table")) == sorted(NEW)
    assert ">verified<" in page
    assert fetch(server, "/ui/releases/nothing-like-it", bearer=server.admin_token).status == 404
    assert fetch(server, "/ui/releases/vv-c-2.0/diff?from=nothing-like-it", bearer=server.admin_token).status == 404
    r = fetch(server, "/ui/compare?from=vv-c-1.0&to=vv-c-2.0", bearer=server.admin_token)
    assert r.status == 303 and r.headers["location"] == link

    # before a deployment: a device runs vv-c-1.0; the preview of deploying vv-c-2.0 shows it the same diff
    device = Device(server)
    device.accept()
    assert device.next(artifact_name="vv-c-1.0").status_code in (200, 204)
    page = fetch(server, "/ui/deploy/preview?artifact_name=vv-c-2.0", bearer=server.admin_token).body.decode()
    assert "1 device(s) running" in page and "vv-c-1.0" in page
    assert _rows(page, "diff-added") == [["newpkg", "0.1"]] and len(_rows(page, "diff-upgraded")) == 2


def test_publish_sends_each_artifact_with_its_release_documents(server: Server, keys: dict[str, tuple[Path, Path]],
                                                                tmp_path: Path) -> None:
    """``build.py publish`` / ``release --publish``: the SBOM is found next to the artifact by the sha256 its
    header names (not by its place), the provenance when it is signed and names the artifact."""
    from cli.publish import publish_release, release_documents
    from devkit.client import ManagementClient

    from .server_helpers import ADMIN_TOKEN

    d = tmp_path / "vv-d-1.0"
    (d / "qemu-virt").mkdir(parents=True)
    (d / "rpi4").mkdir()
    art, sbom = release(d, "vv-d-1.0", OLD, keys["ec"][0], seed=10)
    (d / "qemu-virt" / "sbom.cdx.json").write_bytes(sbom)
    (d / "rpi4" / "sbom.cdx.json").write_bytes(sbom_of("vv-d-1.0", NEW, "rpi4"))  # another board's: not this one
    (d / "provenance.intoto.json").write_bytes(provenance(keys["ec"][0], **{art.name: art}))
    notes: list[str] = []
    assert release_documents(art, notes.append) == [("sbom", d / "qemu-virt" / "sbom.cdx.json"),
                                                   ("provenance", d / "provenance.intoto.json")] and notes == []

    client = ManagementClient(server.url, ADMIN_TOKEN)
    (location,) = publish_release(client, [art], progress=notes.append)
    art_id = location.rsplit("/", 1)[1]
    assert get(server, f"{ARTIFACTS}/{art_id}/sbom").content == sbom
    assert get(server, f"{ARTIFACTS}/{art_id}/provenance").status_code == 200
    assert any("published sbom.cdx.json with vv-d-1.0" in n for n in notes)

    # an unsigned provenance and an SBOM that is not there are told, not sent
    (d / "provenance.intoto.json").write_bytes(provenance(None, **{art.name: art}))
    (d / "qemu-virt" / "sbom.cdx.json").unlink()
    notes.clear()
    assert release_documents(art, notes.append) == []
    assert any("its SBOM" in n and "is not next to it" in n for n in notes) and any("not signed" in n for n in notes)
