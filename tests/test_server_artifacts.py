"""Update server: artifact upload (signature, structure and checksums verified on the way in) and the signed,
expiring, Range-capable download link."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_helpers import Device, Server, deploy, server_fixture, upload, write_artifact  # noqa: F401 - fixture
from .tampering import members, pack, replace

ARTIFACTS = "/api/management/v1/deployments/artifacts"


def test_upload_verifies_and_lists(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path: Path, run_cli: Any) -> None:
    good = write_artifact(run_cli, tmp_path / "good.mender", "app-good", ("qemu-virt", "rpi4"), key=keys["ec"][0])
    r = upload(server, good, description="first release")
    assert r.status_code == 201, r.text
    assert r.headers["Location"].startswith(ARTIFACTS + "/")
    art_id = r.headers["Location"].rsplit("/", 1)[1]
    with server.admin() as a:
        doc = a.get(f"{ARTIFACTS}/{art_id}").json()
        listed = a.get(ARTIFACTS).json()
    assert doc["name"] == "app-good" and doc["device_types_compatible"] == ["qemu-virt", "rpi4"]
    assert doc["signed"] is True and doc["signed_by"].startswith("ECDSA-P256") and doc["description"] == "first release"
    assert doc["size"] == good.stat().st_size and doc["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert doc["artifact_provides"]["artifact_name"] == "app-good"
    assert doc["updates"][0]["type_info"]["type"] == "vv-app" and doc["updates"][0]["files"][0]["name"] == "good.bin"
    assert any(x["id"] == art_id for x in listed)
    # the stored file is the uploaded one, nothing is left in the temporary directory
    assert (server.storage / "artifacts" / f"{art_id}.mender").read_bytes() == good.read_bytes()
    assert list((server.storage / "tmp").iterdir()) == []

    # same name, overlapping device type: conflict; same name for another device type: fine (RSA key)
    again = write_artifact(run_cli, tmp_path / "again.mender", "app-good", ("rpi4",), key=keys["rsa"][0])
    r = upload(server, again)
    assert r.status_code == 409 and "rpi4" in r.json()["error"]
    other = write_artifact(run_cli, tmp_path / "other.mender", "app-good", ("rpi3",), key=keys["rsa"][0])
    assert upload(server, other).status_code == 201


def test_upload_refuses_untrusted_artifacts(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path: Path,
                                            run_cli: Any) -> None:
    unsigned = write_artifact(run_cli, tmp_path / "unsigned.mender", "app-unsigned")
    r = upload(server, unsigned)
    assert r.status_code == 400 and "not signed" in r.json()["error"]

    wrong = write_artifact(run_cli, tmp_path / "wrong.mender", "app-wrong", key=keys["ec2"][0])
    r = upload(server, wrong)
    assert r.status_code == 400 and "bad signature" in r.json()["error"]

    good = write_artifact(run_cli, tmp_path / "t.mender", "app-tampered", key=keys["ec"][0], seed=5)
    # flip one payload byte inside data/0000.tar.gz's uncompressed tar: rebuild the member with a changed file
    import gzip
    import io
    import tarfile

    items = members(good)
    data = dict(items)["data/0000.tar.gz"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as inner, \
            tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as out:
        for m in inner.getmembers():
            content = bytearray(inner.extractfile(m).read())  # type: ignore[union-attr]
            content[len(content) // 2] ^= 0x01
            out.addfile(m, io.BytesIO(bytes(content)))
    tampered = pack(tmp_path / "tampered.mender", replace(items, "data/0000.tar.gz", gzip.compress(buf.getvalue())))
    r = upload(server, tampered)
    assert r.status_code == 400 and "checksum mismatch" in r.json()["error"]

    trunc = tmp_path / "trunc.mender"
    trunc.write_bytes(good.read_bytes()[:2000])
    r = upload(server, trunc)
    assert r.status_code == 400 and "artifact rejected" in r.json()["error"]

    with server.admin() as a:
        names = {x["name"] for x in a.get(ARTIFACTS).json()}
        assert not names & {"app-unsigned", "app-wrong", "app-tampered"}
        # not multipart, no artifact field, bad size field
        assert a.post(ARTIFACTS, content=b"x", headers={"Content-Type": "application/octet-stream"}).status_code == 400
        r = a.post(ARTIFACTS, data={"description": "x"}, files={"other": ("a", b"b")})
        assert r.status_code == 400 and "artifact" in r.json()["error"]
        r = a.post(ARTIFACTS, data={"size": "12"}, files={"artifact": ("a", good.read_bytes())})
        assert r.status_code == 400 and "size" in r.json()["error"]
    assert list((server.storage / "tmp").iterdir()) == []


def test_server_without_keys_refuses_uploads_unless_allowed(tmp_path: Path, run_cli: Any) -> None:
    art = write_artifact(run_cli, tmp_path / "u.mender", "app-u")
    s = Server(tmp_path / "a").start()
    try:
        r = upload(s, art)
        assert r.status_code == 400 and "--release-key" in r.json()["error"]
    finally:
        s.stop()
    s = Server(tmp_path / "b", "--allow-unsigned").start()
    try:
        r = upload(s, art)
        assert r.status_code == 201
        with s.admin() as a:
            assert a.get(r.headers["Location"]).json()["signed"] is False
    finally:
        s.stop()


def test_delete_artifact(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path: Path, run_cli: Any) -> None:
    art = write_artifact(run_cli, tmp_path / "d.mender", "app-del", key=keys["ec"][0])
    loc = upload(server, art).headers["Location"]
    art_id = loc.rsplit("/", 1)[1]
    dev = Device(server)
    device_id = dev.accept()
    dep_id = deploy(server, name="d", artifact_name="app-del", devices=[device_id])
    with server.admin() as a:
        r = a.delete(loc)
        assert r.status_code == 409 and dep_id in r.json()["error"]
        assert a.put(f"/api/management/v1/deployments/deployments/{dep_id}/status", json={"status": "aborted"}).status_code == 204
        assert a.delete(loc).status_code == 204
        assert a.get(loc).status_code == 404
        assert a.delete(loc).status_code == 404
    assert not (server.storage / "artifacts" / f"{art_id}.mender").exists()


@pytest.fixture(scope="module")
def link(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory,
         ) -> tuple[str, bytes, Device]:
    """A download link handed to a device, and the artifact's bytes."""
    import os
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO, make_payload

    d = tmp_path_factory.mktemp("range")
    payload = make_payload(d / "r.bin", 200_000, seed=9)
    art = d / "r.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "-T", "vv-app", "-f", str(payload),
                    "-n", "app-range", "-t", "qemu-virt", "-k", str(keys["ec"][0]), "-o", str(art)], check=True,
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert upload(server, art).status_code == 201
    dev = Device(server)
    device_id = dev.accept()
    deploy(server, name="range", artifact_name="app-range", devices=[device_id])
    r = dev.next()
    assert r.status_code == 200
    return r.json()["artifact"]["source"]["uri"], art.read_bytes(), dev


def test_download_whole_and_ranges(link: tuple[str, bytes, Device]) -> None:
    uri, data, _ = link
    size = len(data)
    assert uri.startswith("http://127.0.0.1:") and "/api/devices/v1/download/" in uri
    with httpx.Client(timeout=30) as c:  # no Authorization header
        r = c.get(uri)
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-length"] == str(size) and r.headers["accept-ranges"] == "bytes"
        etag = r.headers["etag"]
        assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
        h = c.head(uri)
        assert h.status_code == 200 and h.headers["content-length"] == str(size) and h.content == b""
        cases = {"bytes=0-99": (0, 99), "bytes=100-": (100, size - 1), "bytes=-500": (size - 500, size - 1),
                 f"bytes={size - 10}-{size + 1000}": (size - 10, size - 1), "bytes=5-5": (5, 5)}
        for header, (a, b) in cases.items():
            r = c.get(uri, headers={"Range": header})
            assert r.status_code == 206, header
            assert r.headers["content-range"] == f"bytes {a}-{b}/{size}", header
            assert r.headers["content-length"] == str(b - a + 1) and r.content == data[a:b + 1], header
        for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
            r = c.get(uri, headers={"Range": header})
            assert r.status_code == 416, header
            assert r.headers["content-range"] == f"bytes */{size}", header
        for header in ("bytes=9-2", "items=0-1", "bytes=abc", "bytes=0-1,5-9"):  # ignored: whole file
            r = c.get(uri, headers={"Range": header})
            assert r.status_code == 200 and r.content == data, header
        r = c.get(uri, headers={"Range": "bytes=10-19", "If-Range": etag})
        assert r.status_code == 206 and r.content == data[10:20]
        r = c.get(uri, headers={"Range": "bytes=10-19", "If-Range": '"stale"'})
        assert r.status_code == 200 and r.content == data


def test_download_link_must_be_signed_and_fresh(server: Server, link: tuple[str, bytes, Device]) -> None:
    uri, _, _ = link
    base, query = uri.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&"))
    art_id = base.rsplit("/", 1)[1]
    with httpx.Client(timeout=30) as c:
        assert c.get(base).status_code == 403
        r = c.get(base, params={"expires": params["expires"], "sig": "0" * 64})
        assert r.status_code == 403 and "signature" in r.json()["error"]
        r = c.get(base, params={"expires": str(int(params["expires"]) + 1), "sig": params["sig"]})
        assert r.status_code == 403
        # a correctly signed link whose time is up
        key = base64.b64decode(server.secrets()["link_key"])
        past = int(time.time()) - 1
        sig = hmac.new(key, f"{art_id}\n{past}".encode(), hashlib.sha256).hexdigest()
        r = c.get(base, params={"expires": str(past), "sig": sig})
        assert r.status_code == 403 and "expired" in r.json()["error"]
        # signed for another artifact id
        r = c.get(base.rsplit("/", 1)[0] + "/other", params=params)
        assert r.status_code == 403
