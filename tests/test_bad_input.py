"""Attack and corruption stories: every one is refused with a clear error, never a traceback, never a
partial success."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifacts import ArtifactReader, Compression, load_signer, load_verifier, read_artifact
from artifacts.writer import module_image_spec, rootfs_image_spec, write_artifact
from ota_common.errors import (
    ArtifactError,
    BadSignature,
    ChecksumMismatch,
    MalformedArtifact,
    TruncatedArtifact,
    UnsignedArtifact,
    UnsupportedArtifact,
)

from .conftest import make_payload
from .tampering import inner_tar, members, pack, replace, resign


@pytest.fixture
def signed(tmp_path: Path, payload: Path, keys) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "good.mender"
    write_artifact(rootfs_image_spec(file=payload, name="good", device_types=["qemu-virt"]), out,
                   signer=load_signer(keys["ec"][0]))
    return out


def verify(path: Path, keys, key: str = "ec"):  # type: ignore[no-untyped-def]
    return read_artifact(path, [load_verifier(keys[key][1])])


def test_good_artifact_verifies(signed: Path, keys) -> None:  # type: ignore[no-untyped-def]
    assert verify(signed, keys).signature.value == "verified"


def test_unsigned_is_refused_when_a_key_is_given(tmp_path: Path, payload: Path, keys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "unsigned.mender"
    write_artifact(rootfs_image_spec(file=payload, name="u", device_types=["q"]), out)
    with pytest.raises(UnsignedArtifact, match="not signed"):
        verify(out, keys)


def test_wrong_key_is_refused(signed: Path, keys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadSignature, match="does not verify"):
        verify(signed, keys, "ec2")
    with pytest.raises(BadSignature):
        verify(signed, keys, "rsa")


def test_any_of_several_trusted_keys_is_enough(signed: Path, keys) -> None:  # type: ignore[no-untyped-def]
    info = read_artifact(signed, [load_verifier(keys["rsa"][1]), load_verifier(keys["ec"][1])])
    assert info.signed_by is not None and str(keys["ec"][1]) in info.signed_by


def test_der_encoded_ecdsa_signature_is_refused(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = members(signed)
    raw = base64.b64decode(dict(items)["manifest.sig"])
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    bad = pack(tmp_path / "der.mender", replace(items, "manifest.sig", base64.b64encode(der)))
    with pytest.raises(BadSignature, match="DER"):
        verify(bad, keys)


def test_manifest_without_final_newline_is_refused_even_when_signed(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = replace(members(signed), "manifest", dict(members(signed))["manifest"].rstrip(b"\n"))
    bad = pack(tmp_path / "nl.mender", resign(items, load_signer(keys["ec"][0])))
    with pytest.raises(MalformedArtifact, match="newline"):
        verify(bad, keys)


@pytest.mark.parametrize(
    "order",
    [
        ["manifest", "version", "manifest.sig", "header.tar.gz", "data/0000.tar.gz"],
        ["version", "manifest.sig", "manifest", "header.tar.gz", "data/0000.tar.gz"],
        ["version", "manifest", "manifest.sig", "data/0000.tar.gz", "header.tar.gz"],
        ["version", "manifest", "header.tar.gz", "manifest.sig", "data/0000.tar.gz"],
        ["version", "manifest", "manifest.sig", "header.tar.gz"],
        ["version", "manifest", "manifest.sig", "header.tar.gz", "data/0000.tar.gz", "data/0000.tar.gz"],
    ],
)
def test_wrong_member_order_or_count_is_refused(signed: Path, keys, tmp_path: Path, order: list[str]) -> None:  # type: ignore[no-untyped-def]
    d = dict(members(signed))
    bad = pack(tmp_path / "order.mender", [(n, d[n]) for n in order])
    with pytest.raises(ArtifactError):
        verify(bad, keys)


def test_payload_not_matching_the_signed_manifest_is_refused_at_the_end_of_the_file(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_payload(tmp_path / "a" / "rootfs.ext4", 5_000_000, seed=1)
    b = make_payload(tmp_path / "b" / "rootfs.ext4", 5_000_000, seed=2)
    signer = load_signer(keys["ec"][0])
    write_artifact(rootfs_image_spec(file=a, name="x", device_types=["q"]), tmp_path / "a.mender", signer=signer)
    write_artifact(rootfs_image_spec(file=b, name="x", device_types=["q"]), tmp_path / "b.mender", signer=signer)
    evil = dict(members(tmp_path / "b.mender"))["data/0000.tar.gz"]
    bad = pack(tmp_path / "mix.mender", replace(members(tmp_path / "a.mender"), "data/0000.tar.gz", evil))
    handed_out = 0
    with ArtifactReader.open(bad, verifiers=[load_verifier(keys["ec"][1])]) as r:
        f = next(r.files())
        with pytest.raises(ChecksumMismatch, match="data/0000/rootfs.ext4") as exc:
            for chunk in f.chunks():
                handed_out += len(chunk)
        assert f.sha256 is None  # never marked verified
    # the whole file streamed through before the verdict: the device writes while downloading
    assert handed_out == 5_000_000
    assert exc.value.expected == hashlib.sha256(a.read_bytes()).hexdigest()


def test_signature_is_checked_before_any_payload_byte_is_handed_out(signed: Path, keys) -> None:  # type: ignore[no-untyped-def]
    with ArtifactReader.open(signed, verifiers=[load_verifier(keys["ec2"][1])]) as r:
        files = r.files()
        with pytest.raises(BadSignature):
            next(files)


def test_tampered_header_is_refused_before_it_is_parsed(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = members(signed)
    header = gzip.decompress(dict(items)["header.tar.gz"])
    evil = gzip.compress(header.replace(b"qemu-virt", b"raspberrypi"))
    bad = pack(tmp_path / "hdr.mender", replace(items, "header.tar.gz", evil))
    with pytest.raises(ChecksumMismatch, match="header.tar.gz"):
        verify(bad, keys)


def _header_with(info: dict, files: list[tuple[str, bytes]] | None = None) -> bytes:  # type: ignore[type-arg]
    payloads = info["payloads"]
    ti = json.dumps({"type": payloads[0]["type"] if isinstance(payloads, list) else ""}).encode()
    return gzip.compress(inner_tar(("header-info", json.dumps(info).encode()), *(files or []), ("headers/0000/type-info", ti)))


def _forge(signed: Path, keys, tmp_path: Path, header: bytes, data_files: list[tuple[str, bytes]] | None = None) -> Path:  # type: ignore[no-untyped-def]
    """A correctly signed artifact with our own header (and data), to reach the structural checks."""
    items = members(signed)
    if data_files is not None:
        items = replace(items, "data/0000.tar.gz", gzip.compress(inner_tar(*data_files)))
    items = replace(items, "header.tar.gz", header)
    lines = {"version": hashlib.sha256(dict(items)["version"]).hexdigest(),
             "header.tar.gz": hashlib.sha256(header).hexdigest()}
    for name, data in data_files or []:
        lines[f"data/0000/{name}"] = hashlib.sha256(data).hexdigest()
    if data_files is None:
        old = dict(items)["manifest"].decode().splitlines()
        lines.update({p: c for c, p in (line.split("  ") for line in old) if p.startswith("data/")})
    manifest = "".join(f"{c}  {p}\n" for p, c in sorted(lines.items())).encode()
    items = replace(items, "manifest", manifest)
    return pack(tmp_path / "forged.mender", resign(items, load_signer(keys["ec"][0])))


GOOD_INFO = {"payloads": [{"type": "rootfs-image"}], "artifact_provides": {"artifact_name": "x"},
             "artifact_depends": {"device_type": ["qemu-virt"]}}


def test_forging_helper_makes_valid_artifacts(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert verify(_forge(signed, keys, tmp_path, _header_with(GOOD_INFO)), keys).header.info.artifact_name == "x"


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({**GOOD_INFO, "payloads": [{"type": "../../bin/sh"}]}, "invalid type"),
        ({**GOOD_INFO, "payloads": [{"type": ""}]}, "invalid type"),
        ({**GOOD_INFO, "artifact_depends": {}}, "device_type"),
        ({**GOOD_INFO, "artifact_depends": {"device_type": "qemu-virt"}}, "device_type"),
        ({**GOOD_INFO, "artifact_provides": {}}, "artifact_name"),
        ({**GOOD_INFO, "payloads": [{"type": "rootfs-image"}] * 2}, "headers/0001/type-info"),
        ({**GOOD_INFO, "payloads": "rootfs-image"}, "payloads"),
    ],
)
def test_malformed_header_info_is_refused(signed: Path, keys, tmp_path: Path, info: dict, message: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    with pytest.raises(MalformedArtifact, match=message):
        verify(_forge(signed, keys, tmp_path, _header_with(info)), keys)


def test_unknown_payload_type_is_refused_where_unsupported(tmp_path: Path, keys) -> None:  # type: ignore[no-untyped-def]
    f = make_payload(tmp_path / "x.bin", 1000)
    out = tmp_path / "mod.mender"
    write_artifact(module_image_spec(module_type="docker-compose", files=[f], name="m", device_types=["q"]), out,
                   signer=load_signer(keys["ec"][0]))
    with pytest.raises(UnsupportedArtifact, match="payload type 'docker-compose' is not supported"):
        read_artifact(out, [load_verifier(keys["ec"][1])], payload_types={"rootfs-image", "vv-app"})


@pytest.mark.parametrize("name", ["../../etc/passwd", "scripts/../../x", "ArtifactInstall_Enter_1", "Sync_Enter_01"])
def test_bad_script_names_are_refused(signed: Path, keys, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedArtifact):
        verify(_forge(signed, keys, tmp_path, _header_with(GOOD_INFO, [(f"scripts/{name}", b"#!/bin/sh\n")])), keys)


def test_path_traversal_in_payload_file_names_is_refused(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the manifest cannot even name such a file, so the data tar's member is unknown/unsafe either way
    items = members(signed)
    evil = gzip.compress(inner_tar(("../../../etc/shadow", b"root::0:0")))
    bad = pack(tmp_path / "trav.mender", replace(items, "data/0000.tar.gz", evil))
    with pytest.raises(MalformedArtifact, match="unsafe file name"):
        verify(bad, keys)


def test_payload_file_missing_from_the_manifest_is_refused(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = members(signed)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(dict(items)["data/0000.tar.gz"]))) as original:
        f = original.getmembers()[0]
        data = original.extractfile(f).read()  # type: ignore[union-attr]
    extra = gzip.compress(inner_tar((f.name, data), ("extra.bin", b"surprise")))
    with pytest.raises(MalformedArtifact, match="not in the manifest"):
        verify(pack(tmp_path / "extra.mender", replace(items, "data/0000.tar.gz", extra)), keys)
    empty = gzip.compress(inner_tar())
    with pytest.raises(MalformedArtifact, match="does not contain"):
        verify(pack(tmp_path / "none.mender", replace(items, "data/0000.tar.gz", empty)), keys)


def test_rootfs_checksum_provide_must_match_the_image(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ti = json.dumps({"type": "rootfs-image", "artifact_provides": {"rootfs-image.checksum": "0" * 64}}).encode()
    header = gzip.compress(inner_tar(("header-info", json.dumps(GOOD_INFO).encode()), ("headers/0000/type-info", ti)))
    with pytest.raises(MalformedArtifact, match="rootfs-image.checksum"):
        verify(_forge(signed, keys, tmp_path, header), keys)


def test_other_format_versions_and_augmented_artifacts_are_unsupported(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = members(signed)
    v2 = pack(tmp_path / "v2.mender", replace(items, "version", b'{"format":"mender","version":2}'))
    with pytest.raises(UnsupportedArtifact, match="version 2"):
        verify(v2, keys)
    aug = pack(tmp_path / "aug.mender", [*items[:3], ("manifest-augment", b""), *items[3:]])
    with pytest.raises(UnsupportedArtifact, match="augmented"):
        verify(aug, keys)


def _patch_member_size(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite the size field of a member's tar header (with a valid header checksum)."""
    pos = data.index(name + b"\x00")
    h = bytearray(data[pos : pos + 512])
    h[124:136] = b"%011o\x00" % size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return data[:pos] + bytes(h) + data[pos + 512 :]


@pytest.mark.parametrize(("member", "size"), [(b"manifest", 100 << 20), (b"version", 1 << 30), (b"data/0000.tar.gz", 1 << 40)])
def test_absurd_sizes_are_refused_before_reading(signed: Path, keys, tmp_path: Path, member: bytes, size: int) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "big.mender"
    bad.write_bytes(_patch_member_size(signed.read_bytes(), member, size))
    with pytest.raises((MalformedArtifact, TruncatedArtifact), match="absurd|truncated"):
        verify(bad, keys)


def test_decompression_bomb_member_is_refused(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a gzip member whose trailer claims an absurd size is refused without inflating it
    items = members(signed)
    bomb = bytearray(gzip.compress(bytes(1 << 20)))
    bomb[-4:] = (1 << 31).to_bytes(4, "little")
    # wrap it in our size subfield so the parallel path is used
    from artifacts.compression import _GZIP_MAGIC

    body = bytes(bomb[10:])
    extra = b"OT" + (4).to_bytes(2, "little") + (10 + 2 + 8 + len(body)).to_bytes(4, "little")
    member = _GZIP_MAGIC + b"\x04" + b"\x00" * 5 + b"\xff" + len(extra).to_bytes(2, "little") + extra + body
    bad = pack(tmp_path / "bomb.mender", replace(items, "data/0000.tar.gz", member))
    with pytest.raises(MalformedArtifact, match="absurd"):
        verify(bad, keys)


def test_every_truncation_is_refused(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = signed.read_bytes()
    bad = tmp_path / "cut.mender"
    offsets = sorted({*range(0, len(data), 509), *range(0, len(data), 512), len(data) - 1, len(data) - 512, len(data) - 1024})
    for n in offsets:
        bad.write_bytes(data[:n])
        with pytest.raises(ArtifactError):
            verify(bad, keys)


def _content(path: Path, keys) -> tuple:  # type: ignore[no-untyped-def,type-arg]
    with ArtifactReader.open(path, verifiers=[load_verifier(keys["ec"][1])]) as r:
        header = r.read_header()
        files = [(f.name, b"".join(f.chunks())) for f in r.files()]
    return header, files


@pytest.fixture(params=list(Compression), ids=lambda c: c.value)
def any_compression(request, tmp_path: Path, keys) -> Path:  # type: ignore[no-untyped-def]
    src = make_payload(tmp_path / "rootfs.ext4", 40_000, seed=8)
    out = tmp_path / f"{request.param.value}.mender"
    spec = rootfs_image_spec(file=src, name="m", device_types=["q"], scripts=[_state_script(tmp_path)])
    write_artifact(spec, out, compression=request.param, signer=load_signer(keys["ec"][0]))
    return out


def _state_script(tmp_path: Path) -> Path:
    p = tmp_path / "ArtifactInstall_Leave_01_x"
    p.write_text("#!/bin/sh\ntrue\n")
    return p


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bit_flips_anywhere_are_refused_or_provably_harmless(any_compression: Path, keys, tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    """Flip one bit anywhere. The artifact must be refused, unless the flip sits in bytes that carry no
    meaning (e.g. the gzip MTIME field of a data member, which the v3 manifest does not cover): then the
    verified header and payload must be exactly the original ones."""
    raw = any_compression.read_bytes()
    pos = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit
    _refused_or_identical(any_compression, bytes(flipped), keys, tmp_path, pos, 1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_overwritten_runs_are_refused_or_provably_harmless(any_compression: Path, keys, tmp_path: Path, data) -> None:  # type: ignore[no-untyped-def]
    raw = any_compression.read_bytes()
    pos = data.draw(st.integers(0, len(raw) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=64))
    mutated = raw[:pos] + junk + raw[pos + len(junk) :]
    _refused_or_identical(any_compression, mutated[: len(raw)], keys, tmp_path, pos, len(junk))


def _refused_or_identical(original: Path, mutated: bytes, keys, tmp_path: Path, pos: int, length: int) -> None:  # type: ignore[no-untyped-def]
    raw = original.read_bytes()
    changed = [i for i in range(pos, pos + length) if mutated[i : i + 1] != raw[i : i + 1]]
    if not changed:
        return
    pos, length = changed[0], changed[-1] - changed[0] + 1
    bad = tmp_path / "mutated.mender"
    bad.write_bytes(mutated)
    try:
        got = _content(bad, keys)
    except ArtifactError:
        return
    what = f"{length} byte(s) changed at {pos}"
    assert got == _content(original, keys), f"{what} changed verified content"
    # The v3 format authenticates content, not container bytes. What may be accepted: (1) bytes of a
    # compressed payload stream (gzip header fields, other encodings of the same data), (2) edits confined to
    # the metadata fields of tar headers (mode, owner, times, checksum) that keep the header checksum right.
    # Names, sizes, types, padding and everything else must be refused.
    with tarfile.open(original) as tf:
        members = tf.getmembers()
    data = next(m for m in members if m.name.startswith("data/0000.tar"))
    in_payload = data.offset_data <= pos and pos + length <= data.offset_data + data.size
    compressed = not original.name.startswith("none")
    metadata = [range(m.offset + a, m.offset + b) for m in members for a, b in _METADATA_FIELDS]
    in_metadata = all(any(i in r for r in metadata) for i in changed)
    assert (compressed and in_payload) or in_metadata, f"{what} accepted outside unauthenticated bytes"


#: tar header fields that carry no content: mode, uid, gid, mtime, chksum, uname, gname, devmajor, devminor
_METADATA_FIELDS = ((100, 124), (136, 156), (265, 345))


def test_two_byte_edit_balanced_in_the_signed_tar_checksum_is_refused(any_compression: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Found by the mutation test: 'm\xf3' over the gid digits keeps the *signed* header sum; we accept only
    the unsigned sum (what every writer uses) and parse every numeric field."""
    raw = any_compression.read_bytes()
    bad = tmp_path / "gid.mender"
    bad.write_bytes(raw[:116] + b"m\xf3" + raw[118:])
    with pytest.raises(MalformedArtifact, match="checksum mismatch|invalid number"):
        verify(bad, keys)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_garbage_never_crashes(tmp_path: Path, keys, data) -> None:  # type: ignore[no-untyped-def]
    blob = data.draw(st.binary(min_size=0, max_size=4096))
    bad = tmp_path / "garbage.mender"
    bad.write_bytes(blob)
    with pytest.raises(ArtifactError):
        verify(bad, keys)


def test_signing_refuses_a_corrupt_artifact_and_writes_nothing(signed: Path, keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from artifacts import sign_artifact

    raw = bytearray(signed.read_bytes())
    raw[-2000] ^= 0xFF  # inside the compressed payload
    bad = tmp_path / "corrupt.mender"
    bad.write_bytes(bytes(raw))
    out_dir = tmp_path / "signed-out"
    out_dir.mkdir()
    with pytest.raises(ArtifactError):
        sign_artifact(bad, out_dir / "x.mender", load_signer(keys["rsa"][0]))
    assert list(out_dir.iterdir()) == []


def test_signer_gives_the_public_key_that_verifies_it(keys) -> None:  # type: ignore[no-untyped-def]
    for name in ("ec", "rsa"):
        private, public = keys[name]
        assert load_signer(private).public_key_pem() == public.read_bytes()
