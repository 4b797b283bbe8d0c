"""The update server past one machine: two ``build.py server`` processes on one PostgreSQL, artifacts in one
S3-compatible object store (moto's server, a real process on the loopback), the server secrets shared through
``--secrets-file`` instead of a shared disk. Devices are spread over both servers as a load balancer would; they
download straight from the store with the presigned URL that ``next`` hands out (with a Range request that
resumes the second half), and every view of the fleet is the same through either server."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from .conftest import create_database
from .moto_helpers import AWS_ENV, Moto, moto  # noqa: F401 - fixture
from .server_helpers import ADMIN_TOKEN, Device, Server, deploy, upload, write_artifact

pytestmark = pytest.mark.slow

DEVICES = 8


@pytest.fixture(scope="module")
def secrets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Server secrets made once with the CLI and handed to every server: the only secret material they share."""
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO

    path = tmp_path_factory.mktemp("secrets") / "server-secrets.json"
    subprocess.run([sys.executable, str(BUILD_PY), "server", "secrets", "new-server-secrets", "--out", str(path)],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path


class Cluster:
    def __init__(self, servers: list[Server], bucket: str, prefix: str) -> None:
        self.servers = servers
        self.bucket = bucket
        self.prefix = prefix


@pytest.fixture(scope="module")
def cluster(moto: Moto, postgres: str, secrets_file: Path, keys: dict[str, tuple[Path, Path]],  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    bucket = moto.new_bucket()
    db_url = create_database(postgres)
    servers = []
    try:
        for i in range(2):
            work = tmp_path_factory.mktemp(f"server{i}")  # nothing shared on disk between the two
            args = ["--storage", f"s3://{bucket}/fleet/artifacts", "--s3-endpoint-url", moto.url,
                    "--work-dir", str(work / "local"), "--secrets-file", str(secrets_file),
                    "--release-key", str(keys["ec"][1])]
            if i:
                args.append("--no-migrate")  # as a second machine would start: the first one migrated
            servers.append(Server(work, *args, db_url=db_url, env=AWS_ENV).start())
        yield Cluster(servers, bucket, "fleet/artifacts")
    finally:
        for s in servers:
            s.stop()


def _fetch(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """What a device does with the ``uri``: a plain GET without credentials."""
    return httpx.get(url, headers=headers, timeout=30, follow_redirects=False)


def test_two_servers_one_fleet(cluster: Cluster, moto: Moto, run_cli: Any, keys: dict[str, tuple[Path, Path]],  # noqa: F811
                               tmp_path: Path) -> None:
    one, two = cluster.servers
    assert not (one.workdir / "local" / "server-secrets.json").exists()  # the shared file is the only one

    # devices spread over both servers; an auth set accepted through server 1 gets a token from server 2
    devices = [Device(cluster.servers[i % 2]) for i in range(DEVICES)]
    with one.admin() as a:
        ids = []
        for d in devices:
            r = a.post("/api/management/v2/devauth/devices", json={"identity_data": d.identity, "pubkey": d.pubkey})
            assert r.status_code == 201, r.text
            ids.append(r.headers["Location"].rsplit("/", 1)[1])
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda d: d.auth().status_code, devices)) == [200] * DEVICES
    # a token made by one server is valid on the other (same token key, no shared disk)
    other = Device(two)
    other.identity, other.key, other.pubkey, other.token = devices[0].identity, devices[0].key, devices[0].pubkey, \
        devices[0].token
    assert other.next().status_code == 204

    # upload through server 1: the object is in the bucket, not on either server's disk
    art = write_artifact(run_cli, tmp_path / "app-3.mender", "app-3", key=keys["ec"][0], size=300_000)
    r = upload(one, art)
    assert r.status_code == 201, r.text
    artifact_id = r.headers["Location"].rsplit("/", 1)[1]
    key = f"{cluster.prefix}/{artifact_id}.mender"
    assert key in moto.keys(cluster.bucket)
    body = art.read_bytes()
    assert moto.client().get_object(Bucket=cluster.bucket, Key=key)["Body"].read() == body
    for s in cluster.servers:
        assert not list(s.workdir.rglob("*.mender"))

    # deploy through server 2
    dep_id = deploy(two, name="scale", artifact_name="app-3", devices=ids)

    def update(d: Device) -> str:
        r = d.next()
        assert r.status_code == 200, r.text
        uri = r.json()["artifact"]["source"]["uri"]
        got = urlsplit(uri)
        assert f"{got.scheme}://{got.netloc}" == moto.url, uri  # straight to the store, not through a server
        query = parse_qs(got.query)
        # the presigned GET expires with the answer's "expire" (the link TTL, 24 h): signing time + its lifetime
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        until = signed + timedelta(seconds=int(query["X-Amz-Expires"][0]))
        expire = datetime.fromisoformat(r.json()["artifact"]["source"]["expire"].replace("Z", "+00:00"))
        assert abs((until - expire).total_seconds()) <= 1 and 86_390 < int(query["X-Amz-Expires"][0]) <= 86_400
        assert d.status(dep_id, "downloading").status_code == 204
        first = _fetch(uri, {"Range": f"bytes=0-{len(body) // 2 - 1}"})
        assert first.status_code == 206 and first.content == body[: len(body) // 2]
        rest = _fetch(uri, {"Range": f"bytes={len(body) // 2}-"})  # resume: the second half
        assert rest.status_code == 206, rest.text
        assert rest.headers["content-range"] == f"bytes {len(body) // 2}-{len(body) - 1}/{len(body)}"
        assert hashlib.sha256(first.content + rest.content).hexdigest() == hashlib.sha256(body).hexdigest()
        for status in ("installing", "rebooting", "success"):
            assert d.status(dep_id, status).status_code == 204
        return uri

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(update, devices))

    # exact statistics, the same through either server
    for s in cluster.servers:
        with s.admin() as a:
            stats = a.get(f"/api/management/v1/deployments/deployments/{dep_id}/statistics").json()
            assert stats["success"] == DEVICES and sum(stats.values()) == DEVICES, stats
            assert a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()["status"] == "finished"

    # a server's own signed link (as handed out before the store changed) leads on to the store
    from ota_server.downloads import LinkSigner
    from ota_server.settings import parse_secrets

    secrets = parse_secrets(json.loads(Path(one.args[one.args.index("--secrets-file") + 1]).read_text()))
    link, _ = LinkSigner(secrets.link_key, 3600).link(two.url, artifact_id)
    r = _fetch(link)
    assert r.status_code == 307 and r.headers["location"].startswith(moto.url + "/")
    assert _fetch(r.headers["location"]).content == body
    assert _fetch(link.replace("sig=", "sig=0")).status_code == 403  # still signed by the servers' link key

    # deleting the artifact through server 2 removes the object
    with two.admin() as a:
        assert a.delete(f"/api/management/v1/deployments/artifacts/{artifact_id}").status_code == 204
    assert key not in moto.keys(cluster.bucket)
    with one.admin() as a:
        assert a.get(f"/api/management/v1/deployments/artifacts/{artifact_id}").status_code == 404


def test_a_session_made_by_one_server_is_valid_on_the_other(cluster: Cluster) -> None:
    """The dashboard's session key is derived from the shared secrets: a browser sent to the other server by the
    load balancer stays logged in."""
    one, two = cluster.servers
    with httpx.Client(base_url=one.url, timeout=30) as c:
        r = c.post("/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui/"})
        assert r.status_code == 303, r.text
        cookie = c.cookies["ota_session"]
    with httpx.Client(base_url=two.url, timeout=30, cookies={"ota_session": cookie}) as c:
        assert c.get("/ui/").status_code == 200


def test_backup_with_an_object_store_says_what_it_covers(cluster: Cluster, moto: Moto, run_cli: Any,  # noqa: F811
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          postgres: str, keys: dict[str, tuple[Path, Path]]) -> None:
    """The backup holds the database and the server secrets; the objects stay in the bucket, and it says so. A
    restore finds each artifact's object in the bucket, and names the one that is gone."""
    one = cluster.servers[0]
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    ids = []
    for name in ("kept", "lost"):
        r = upload(one, write_artifact(run_cli, tmp_path / f"{name}.mender", name, key=keys["ec"][0]))
        assert r.status_code == 201, r.text
        ids.append(r.headers["Location"].rsplit("/", 1)[1])
    secrets_file = one.args[one.args.index("--secrets-file") + 1]
    out = tmp_path / "backup"
    r = run_cli("server", "backup", "--db", one.db_url, "--storage", f"s3://{cluster.bucket}/{cluster.prefix}",
                "--s3-endpoint-url", moto.url, "--work-dir", one.workdir / "local", "--secrets-file", secrets_file,
                "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"no artifacts (they stay in s3://{cluster.bucket}/{cluster.prefix}" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifact_store"] == f"s3://{cluster.bucket}/{cluster.prefix}" and manifest["artifacts"] == 0
    assert not list((out / "artifacts").iterdir())
    assert json.loads((out / "server-secrets.json").read_text()) == json.loads(Path(secrets_file).read_text())

    moto.client().delete_object(Bucket=cluster.bucket, Key=f"{cluster.prefix}/{ids[1]}.mender")
    r = run_cli("server", "restore", out, "--db", create_database(postgres), "--storage",
                f"s3://{cluster.bucket}/{cluster.prefix}", "--s3-endpoint-url", moto.url,
                "--work-dir", tmp_path / "restored", "--secrets-key-file", tmp_path / "restored.key")
    assert r.returncode == 0, r.stderr
    assert f"the artifacts are not in the backup: they are in s3://{cluster.bucket}/{cluster.prefix}" in r.stdout
    assert f"warning: artifact {ids[1]} is in the database but not in s3://" in r.stderr
    assert ids[0] not in r.stderr
    with one.admin() as a:
        for artifact_id in ids:
            assert a.delete(f"/api/management/v1/deployments/artifacts/{artifact_id}").status_code == 204


# ---------------------------------------------------------------------------------------------------------
# Start-up checks: a wrong store is one error line, before anything listens


def test_a_missing_bucket_stops_the_start(moto: Moto, run_cli: Any, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    r = run_cli("server", "--db", f"sqlite:///{tmp_path}/db.sqlite", "--storage", "s3://no-such-bucket-here/x",
                "--s3-endpoint-url", moto.url, "--work-dir", tmp_path / "w", "--allow-unsigned",
                "--port", "1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: bucket no-such-bucket-here at {moto.url} does not exist: "
                                                 "--storage s3://no-such-bucket-here/x")


def test_missing_credentials_stop_the_start(moto: Moto, run_cli: Any, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = moto.new_bucket()
    r = run_cli("server", "--db", f"sqlite:///{tmp_path}/db.sqlite", "--storage", f"s3://{bucket}",
                "--s3-endpoint-url", moto.url, "--work-dir", tmp_path / "w", "--allow-unsigned")
    assert r.returncode == 2
    assert "error: no credentials for s3://" in r.stderr and "AWS_ACCESS_KEY_ID" in r.stderr
