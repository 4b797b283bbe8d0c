"""Issue 17: every release says what is inside it (``<board>/sbom.cdx.json``, CycloneDX 1.5) and how it was built
(``provenance.intoto.json``, SLSA provenance in a DSSE envelope signed with the release key), and the artifact's
signed header names its SBOM's sha256.

Built on the small fake release of test_release_steps (a hand-made base instead of mmdebstrap; everything else
real). The stories: the SBOM is valid by the CycloneDX library's own schema validator and lists what the image
holds; a rebuild gives the same SBOM bytes; the stock mender-artifact reads the artifact and shows the hash, and
the hash is the SBOM's; a provenance document with one changed byte, or a swapped statement, or the wrong key,
does not verify; a hostile header cannot smuggle a malformed SBOM hash past the reader.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL

from artifacts.format import SBOM_SHA256_KEY
from artifacts.header import ArtifactHeader
from artifacts.keys import load_signer, load_verifier
from artifacts.provenance import pae, sign_envelope, statement, subjects_of, verify_provenance
from artifacts.reader import ArtifactReader
from artifacts.writer import rootfs_image_spec
from image.release import ReleaseResult, build_release
from ota_common.errors import BadSignature, MalformedArtifact, UnsignedArtifact, UserError

from .test_release_steps import ONE, TWO, small_release  # noqa: F401 (a fixture)

SBOM = "qemu-virt/sbom.cdx.json"
ART = "small-1.0.0-qemu-virt.mender"


def _build(config: Path, out: Path, key: Path | None, epoch: int = ONE, cache: Path | None = None) -> ReleaseResult:
    return build_release(config=config, signer=None if key is None else load_signer(key), unsigned=key is None,
                         out=out, cache_dir=cache or out.parent / "cache", epoch=epoch)


@pytest.fixture
def built(small_release: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> ReleaseResult:  # noqa: F811
    return _build(small_release, tmp_path / "out", keys["ec"][0])


def test_the_sbom_is_valid_cyclonedx_and_lists_packages_layer_files_and_the_app(built: ReleaseResult) -> None:
    text = (built.out_dir / SBOM).read_text()
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["metadata"]["timestamp"] == "2023-11-14T22:13:20+00:00"  # the release's SOURCE_DATE_EPOCH (ONE)
    assert doc["metadata"]["component"]["name"] == "small" and doc["metadata"]["component"]["version"] == "1.0.0"
    by_ref = {c["bom-ref"]: c for c in doc["components"]}
    deb = by_ref["deb:base-files:arm64"]
    assert deb["version"] == "12.4"
    assert deb["purl"] == "pkg:deb/debian/base-files@12.4?arch=arm64&distro=debian-bookworm"
    layer = by_ref["layer:small"]
    files = {c["name"]: c["hashes"][0]["content"] for c in layer["components"]}
    layers_dir = built.out_dir.parent.parent / "config" / "layers"
    assert files == {"small.yaml": hashlib.sha256((layers_dir / "small.yaml").read_bytes()).hexdigest(),
                     "small/version.j2": hashlib.sha256((layers_dir / "small" / "version.j2").read_bytes()).hexdigest()}
    assert doc["serialNumber"].startswith("urn:uuid:")
    manifest = json.loads((built.out_dir / "manifest.json").read_text())
    assert {"qemu-virt/sbom.cdx.json", "provenance.intoto.json"} <= set(manifest["outputs"])


def test_the_app_layer_is_an_application_component(tmp_path: Path) -> None:
    from image.layers import load_layers
    from image.sbom import make_sbom

    repo = Path(__file__).resolve().parent.parent
    layers = load_layers([repo / "layers" / "app.yaml"])
    doc = json.loads(make_sbom(name="vv", version="2", board="rpi4", device_type="raspberrypi4", suite="bookworm",
                               kernel="k", epoch=ONE, packages=[], layers=layers))
    (app,) = doc["components"]
    assert app["type"] == "application" and app["version"] == "2"
    assert "app/files/vv-video-ai.py" in {c["name"] for c in app["components"]}


def test_a_rebuild_gives_the_same_sbom_bytes_and_another_epoch_another_serial(
        small_release: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:  # noqa: F811
    first = _build(small_release, tmp_path / "a", keys["ec"][0], cache=tmp_path / "cache")
    again = _build(small_release, tmp_path / "b", keys["ec"][0], cache=tmp_path / "cache")
    assert (first.out_dir / SBOM).read_bytes() == (again.out_dir / SBOM).read_bytes()
    # the statement is the same too, but for the artifacts' digests (their ECDSA signatures are randomised)
    statements = [json.loads(base64.b64decode(json.loads((r.out_dir / "provenance.intoto.json").read_bytes())["payload"]))
                  for r in (first, again)]
    for doc in statements:
        doc["subject"] = [s for s in doc["subject"] if not s["name"].endswith(".mender")]
    assert statements[0] == statements[1] and len(statements[0]["subject"]) == 3
    later = _build(small_release, tmp_path / "c", keys["ec"][0], epoch=TWO, cache=tmp_path / "cache")
    serials = [json.loads((r.out_dir / SBOM).read_text())["serialNumber"] for r in (first, later)]
    assert serials[0] != serials[1]


def test_the_signed_header_carries_the_sboms_sha256_and_mender_artifact_shows_it(
        built: ReleaseResult, keys: dict[str, tuple[Path, Path]], mender_artifact: str) -> None:
    digest = hashlib.sha256((built.out_dir / SBOM).read_bytes()).hexdigest()
    art = built.out_dir / ART
    with ArtifactReader.open(art, verifiers=[load_verifier(keys["ec"][1])], require_signature=True) as r:
        assert r.read_header().sbom_sha256() == digest
    shown = subprocess.run([mender_artifact, "read", str(art)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert f'"{SBOM_SHA256_KEY}": "{digest}"' in shown.stdout
    valid = subprocess.run([mender_artifact, "validate", "-k", str(keys["ec"][1]), str(art)], capture_output=True,
                           text=True)
    assert valid.returncode == 0, valid.stdout + valid.stderr


def _header(meta: dict[str, Any] | None) -> ArtifactHeader:
    from artifacts.format import Compression
    from artifacts.header import HeaderInfo

    return ArtifactHeader(HeaderInfo("a", ("d",), ("rootfs-image",)), (), (meta,), {}, Compression.NONE)


@pytest.mark.parametrize("value", ["AB" * 32, "ab" * 31, 7, "ab" * 32 + "\n", None])
def test_a_hostile_header_cannot_name_a_malformed_sbom_hash(value: object) -> None:
    with pytest.raises(MalformedArtifact, match=SBOM_SHA256_KEY):
        _header({SBOM_SHA256_KEY: value}).sbom_sha256()
    assert _header(None).sbom_sha256() is None and _header({"other": 1}).sbom_sha256() is None


def test_the_writer_refuses_a_malformed_sbom_hash(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="SBOM hash"):
        rootfs_image_spec(file=tmp_path / "x", name="a", device_types=["d"], sbom_sha256="abc")


def test_the_provenance_verifies_names_the_outputs_and_fails_on_a_changed_byte(
        built: ReleaseResult, keys: dict[str, tuple[Path, Path]], run_cli) -> None:  # type: ignore[no-untyped-def]
    path = built.out_dir / "provenance.intoto.json"
    data = path.read_bytes()
    doc, signed_by = verify_provenance(data, [load_verifier(keys["ec2"][1]), load_verifier(keys["ec"][1])])
    assert signed_by.fingerprint == load_verifier(keys["ec"][1]).fingerprint
    subjects = subjects_of(doc)
    for name in (ART, "qemu-virt/disk.img", "qemu-virt/disk.img.gz", SBOM):
        assert subjects[name] == hashlib.sha256((built.out_dir / name).read_bytes()).hexdigest(), name
    deps = {d["name"]: d["digest"] for d in doc["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert "config:release.yaml" in deps and "layer:small:small.yaml" in deps and "debian-packages:bookworm" in deps
    assert set(doc["predicate"]["runDetails"]["builder"]["version"]) >= {"python", "mmdebstrap", "mender-artifact"}

    with pytest.raises(BadSignature):
        verify_provenance(data, [load_verifier(keys["ec2"][1])])
    env = json.loads(data)
    payload = bytearray(base64.b64decode(env["payload"]))
    payload[payload.index(b"sha256") + 12] ^= 1  # one changed byte inside the signed statement (in a digest)
    with pytest.raises(BadSignature):
        verify_provenance(json.dumps({**env, "payload": base64.b64encode(bytes(payload)).decode()}).encode(),
                          [load_verifier(keys["ec"][1])])

    ok = run_cli("artifact", "verify-provenance", path, "--key", keys["ec"][1])
    assert ok.returncode == 0 and ok.stdout.startswith("OK") and ART in ok.stdout, ok.stderr
    bad = run_cli("artifact", "verify-provenance", path, "--key", keys["ec2"][1])
    assert bad.returncode != 0 and "no signature verifies" in bad.stderr


def test_a_swapped_statement_with_the_original_signature_fails(keys: dict[str, tuple[Path, Path]]) -> None:
    """An attacker keeps the signature and replaces the statement with one that names their image."""
    signer = load_signer(keys["rsa"][0])
    real = json.loads(sign_envelope(statement({"a.mender": "00" * 32}, {}), signer))
    fake = json.loads(sign_envelope(statement({"a.mender": "11" * 32}, {}), None))
    forged = json.dumps({**fake, "signatures": real["signatures"]}).encode()
    with pytest.raises(BadSignature):
        verify_provenance(forged, [load_verifier(keys["rsa"][1])])
    assert subjects_of(verify_provenance(json.dumps(real).encode(), [load_verifier(keys["rsa"][1])])[0]) == {
        "a.mender": "00" * 32}
    # the signature is over DSSE's PAE, not the bare payload
    assert pae("t", b"xy") == b"DSSEv1 1 t 2 xy"


def test_an_unsigned_release_has_an_envelope_that_does_not_verify(
        small_release: Path, tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:  # noqa: F811
    result = _build(small_release, tmp_path / "out", None)
    with pytest.raises(UnsignedArtifact):
        verify_provenance((result.out_dir / "provenance.intoto.json").read_bytes(), [load_verifier(keys["ec"][1])])


@pytest.mark.parametrize("data", [b"", b"[]", b'{"payloadType": "x", "payload": "", "signatures": []}',
                                  b'{"payloadType": "application/vnd.in-toto+json", "payload": "!!", '
                                  b'"signatures": [{"sig": "AA=="}]}'])
def test_malformed_envelopes_are_refused_in_words(data: bytes, keys: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(MalformedArtifact, match="provenance"):
        verify_provenance(data, [load_verifier(keys["ec"][1])])


@pytest.mark.slow
def test_a_real_release_has_a_valid_sbom_of_its_rootfs_and_verified_provenance(
        release_dir: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """The default release built with mmdebstrap (shared with test_image_build): every package manifest.json
    records is in each board's SBOM with its purl, and the provenance names every artifact."""
    manifest = json.loads((release_dir / "manifest.json").read_text())
    doc, _ = verify_provenance((release_dir / "provenance.intoto.json").read_bytes(), [load_verifier(keys["ec"][1])])
    subjects = subjects_of(doc)
    for board in manifest["boards"]:
        text = (release_dir / board / "sbom.cdx.json").read_text()
        assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(text) is None
        purls = [PackageURL.from_string(c["purl"]) for c in json.loads(text)["components"] if "purl" in c]
        listed = {(u.type, u.namespace, u.name, u.version, u.qualifiers["arch"], u.qualifiers["distro"])  # type: ignore[index]
                  for u in purls}
        assert listed == {("deb", "debian", p["name"], p["version"], p["architecture"], "debian-bookworm")
                          for p in manifest["packages"]}
        art = f"{manifest['artifact_name']}-{board}.mender"
        assert subjects[art] == manifest["outputs"][art]["sha256"]
        with ArtifactReader.open(release_dir / art, verifiers=[load_verifier(keys["ec"][1])],
                                 require_signature=True) as r:
            assert r.read_header().sbom_sha256() == manifest["outputs"][f"{board}/sbom.cdx.json"]["sha256"]
