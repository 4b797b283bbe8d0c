"""Update server: instant fleet rollback (ota_server/rollback.py) end to end with simulated devices, on SQLite and
on PostgreSQL (the ``server`` fixture of tests/conftest.py): what each device ran is recorded at hand-out, a
rollback deployment sends each device back to its own earlier artifact, skips the ones it cannot, and hands our
agent a signed link to the artifact's header part only."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from artifacts import ArtifactReader, load_signer, load_verifier
from artifacts.reader import header_part_size
from artifacts.writer import rootfs_image_spec, write_artifact
from ota_server.downloads import LinkSigner

from .conftest import make_payload
from .server_helpers import Device, Server, deploy, upload
from .test_server_deployments import DEPLOYMENTS, get, stats

ARTIFACTS = "/api/management/v1/deployments/artifacts"


@pytest.fixture(scope="module")
def releases(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    """Three rootfs-image releases for qemu-virt: ``r1``, ``r2`` (the one rolled back from) and ``gone`` (deleted
    again before the rollback)."""
    d = tmp_path_factory.mktemp("rb")
    out = {}
    for i, kind in enumerate(("r1", "r2", "gone")):
        payload = make_payload(d / f"{kind}.ext4", 200_000, seed=i + 1)
        path = d / f"{kind}.mender"
        write_artifact(rootfs_image_spec(file=payload, name=f"{kind}-app", device_types=["qemu-virt"]), path,
                       signer=load_signer(keys["ec"][0]))
        assert upload(server, path).status_code == 201
        out[kind] = path
    return out


def name_of(path: Path) -> str:
    with ArtifactReader.open(path) as r:
        return r.read_header().info.artifact_name


def update(dev: Device, dep_id: str, running: str, final: str = "success") -> dict:  # type: ignore[type-arg]
    r = dev.next(running)
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
    for st in ("downloading", "installing", "rebooting", final):
        assert dev.status(dep_id, st).status_code == 204
    return r.json()  # type: ignore[no-any-return]


def rollback(server: Server, dep_id: str, **body: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    with server.admin() as a:
        r = a.post(f"{DEPLOYMENTS}/{dep_id}/rollback", json=body or None)
    return r.status_code, r.json()


def test_rollback_sends_each_device_back_to_its_own_artifact(server: Server, releases: dict[str, Path],
                                                             keys: dict[str, tuple[Path, Path]]) -> None:
    r1, r2, gone = (name_of(releases[k]) for k in ("r1", "r2", "gone"))
    devs = []
    for _ in range(5):
        d = Device(server)
        devs.append((d, d.accept()))
    (a, a_id), (b, b_id), (c, c_id), (f, f_id), (g, g_id) = devs
    dep_id = deploy(server, name="to r2", artifact_name=r2, devices=[x for _, x in devs], allow_downgrade=True)
    first = update(a, dep_id, r1)
    assert "vv_rollback" not in first, "the hint is for rollback deployments only"
    update(b, dep_id, gone)  # b ran an artifact that is deleted before the rollback
    update(c, dep_id, "built-at-the-factory")  # never uploaded
    update(f, dep_id, r1, final="failure")  # failed: stays on r1, nothing to roll back
    update(g, dep_id, r1)
    with server.admin() as adm:
        members = {m["id"]: m for m in adm.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}
        assert members[a_id]["from_artifact"] == r1 and members[b_id]["from_artifact"] == gone
        gone_id = next(x["id"] for x in adm.get(ARTIFACTS, params={"name": gone}).json())
        assert adm.delete(f"{ARTIFACTS}/{gone_id}").status_code == 204

    code, answer = rollback(server, dep_id, name="back", phases=[{"batch_size": 50}, {"wait_s": 0}])
    assert code == 201, answer
    rb = answer["id"]
    assert answer["device_count"] == 2 and answer["targets"] == {r1: 2}
    skipped = {s["id"]: s["reason"] for s in answer["skipped"]}
    assert set(skipped) == {b_id, c_id}, "a failed device is not rolled back, and not listed either"
    assert "no longer on the server" in skipped[b_id] and "built-at-the-factory" in skipped[c_id]
    doc = get(server, rb)
    assert (doc["kind"], doc["rollback_of"], doc["allow_downgrade"], doc["name"]) == ("rollback", dep_id, True, "back")
    assert len(doc["phases"]) == 2 and get(server, dep_id)["kind"] == "software"

    # a's next: Mender's shape with r1 and a download link, plus the hint with the header link
    body = a.next(r2).json()
    assert body["id"] == rb and body["artifact"]["artifact_name"] == r1 and body["allow_downgrade"] is True
    assert "/api/devices/v1/download/" in body["artifact"]["source"]["uri"]
    header_uri = body["vv_rollback"]["header_uri"]
    assert urlsplit(header_uri).path.endswith("/header")
    for st in ("installing", "rebooting", "success"):  # downloading skipped, as our agent does
        assert a.status(rb, st).status_code == 204
    # the devices of a rollback record what they ran too: a rollback of the rollback goes forward again
    with server.admin() as adm:
        row = next(m for m in adm.get(f"{DEPLOYMENTS}/{rb}/devices").json() if m["id"] == a_id)
    assert (row["from_artifact"], row["target_artifact"], row["status"]) == (r2, r1, "success")
    code, again = rollback(server, rb)
    assert code == 201 and again["targets"] == {r2: 1}

    # the artifact a rollback sends devices to cannot be deleted while a device still waits for it
    with server.admin() as adm:
        r1_id = next(x["id"] for x in adm.get(ARTIFACTS, params={"name": r1}).json())
        assert adm.delete(f"{ARTIFACTS}/{r1_id}").status_code == 409
    # the other device already runs r1 again (rolled back by hand): counted as usual
    assert g.next(r1).status_code == 204
    counts = stats(server, rb)
    assert (counts["success"], counts["already-installed"]) == (1, 1) and get(server, rb)["status"] == "finished"


def test_nothing_to_roll_back_and_unknown_deployment(server: Server, releases: dict[str, Path]) -> None:
    r2 = name_of(releases["r2"])
    d = Device(server)
    dep_id = deploy(server, name="x", artifact_name=r2, devices=[d.accept()])
    code, answer = rollback(server, dep_id)
    assert code == 400 and "no device" in answer["error"]
    code, _ = rollback(server, str(uuid.uuid4()))
    assert code == 404
    code, answer = rollback(server, dep_id, phases=[{"batch_size": 50, "gate": {"min_success_pct": 50}}])
    assert code == 400, answer


def test_header_route_serves_only_the_signed_header(server: Server, releases: dict[str, Path],
                                                    keys: dict[str, tuple[Path, Path]]) -> None:
    r1, r2 = name_of(releases["r1"]), name_of(releases["r2"])
    d = Device(server)
    dep_id = deploy(server, name="y", artifact_name=r2, devices=[d.accept()], allow_downgrade=True)
    update(d, dep_id, r1)
    code, answer = rollback(server, dep_id)
    assert code == 201
    hint = d.next(r2).json()["vv_rollback"]["header_uri"]
    http = server.client()
    r = http.get(hint)  # no Authorization header: the link is the credential
    assert r.status_code == 200, r.text
    whole = releases["r1"].read_bytes()
    assert r.content == whole[:header_part_size(io.BytesIO(whole))] and len(r.content) < len(whole) // 4
    with ArtifactReader(io.BytesIO(r.content), verifiers=[load_verifier(keys["ec"][1])]) as reader:
        assert reader.read_header().info.artifact_name == r1  # verifies on its own: signature, header checksum
    assert http.get(hint, headers={"Range": "bytes=0-9"}).content == r.content, "Range is irrelevant here"

    parts = urlsplit(hint)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    base = f"{server.url}{parts.path}"
    bad_sig = "0" * 64
    assert http.get(base, params={"expires": q["expires"], "sig": bad_sig}).status_code == 403
    assert http.get(base).status_code == 403
    # the download link's signature does not open the header route, nor the header's the download
    art_id = parts.path.split("/")[-2]
    download = base.rsplit("/", 1)[0]
    assert http.get(download, params=q).status_code == 403
    signer = LinkSigner(server_link_key(server), 60)
    expired_uri, _ = signer.link(server.url, art_id, time.time() - 3600, part="header")
    r = http.get(expired_uri)
    assert r.status_code == 403 and "expired" in r.text
    fresh, _ = signer.link(server.url, art_id, part="header")
    assert http.get(fresh).status_code == 200


def server_link_key(server: Server) -> bytes:
    import base64

    return base64.b64decode(server.secrets()["link_key"])
