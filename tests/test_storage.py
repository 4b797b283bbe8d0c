"""The artifact store behind its interface (the local directory behaves exactly as the server did before stores
existed), the strict ``s3://`` URL, and the server secrets shared through a file or the environment. The
object store itself, with several server processes, is tested in tests/test_scale_out.py."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from cli.server import storage_option
from ota_common.errors import UserError
from ota_server import secretkeys
from ota_server.downloads import LinkSigner
from ota_server.settings import SERVER_SECRETS_ENV, new_secrets_doc, shared_secrets
from ota_server.storage import LocalStore, S3Store, make_store, parse_s3_url

KEY = b"k" * 32


def test_local_store_is_the_artifact_directory_and_the_signed_link(tmp_path: Path) -> None:
    links = LinkSigner(KEY, 3600)
    store = make_store("", tmp_path, links)
    assert isinstance(store, LocalStore)
    store.check()
    upload = tmp_path / "tmp-upload"
    upload.write_bytes(b"artifact bytes")
    store.put("a-1", upload, "0" * 64, 14)
    assert not upload.exists()  # moved, as before: no second copy of a large file
    assert (tmp_path / "artifacts" / "a-1.mender").read_bytes() == b"artifact bytes"
    assert store.exists("a-1") and store.size("a-1") == 14
    assert store.local_path("a-1") == tmp_path / "artifacts" / "a-1.mender"
    with store.open("a-1") as f:
        assert f.read() == b"artifact bytes"
    url, expires = links.link("http://ota.example/", "a-1")
    assert store.download_url("a-1", expires, "http://ota.example/") == url  # the link ``next`` gave before
    links.check("a-1", str(expires), url.rsplit("sig=", 1)[1])  # and the download route accepts it
    store.delete("a-1")
    store.delete("a-1")  # already gone: nothing
    assert not store.exists("a-1") and store.size("a-1") is None
    with pytest.raises(FileNotFoundError):
        store.open("a-1")


@pytest.mark.parametrize("url, bucket, prefix", [
    ("s3://fleet-artifacts", "fleet-artifacts", ""),
    ("s3://fleet-artifacts/", "fleet-artifacts", ""),
    ("s3://fleet.artifacts/prod/arm64/", "fleet.artifacts", "prod/arm64"),
])
def test_s3_urls(url: str, bucket: str, prefix: str) -> None:
    assert parse_s3_url(url) == (bucket, prefix)
    store = S3Store(url)
    assert store.key("a-1") == (f"{prefix}/a-1.mender" if prefix else "a-1.mender")


@pytest.mark.parametrize("url", [
    "s3://", "s3://UPPER", "s3://a", "s3://bkt/../other", "s3://bkt/./x", "s3://bkt/a//x", "s3://bkt/x?y=1", "s3://bkt/x#f",
    "s3://user@bucket/x", "s3://bucket:9000/x", "s3://bu..cket", "http://bucket/x", "s3://bkt/x y",
])
def test_s3_urls_that_are_refused(url: str) -> None:
    """The URL says where every server process writes and deletes: anything unusual is refused."""
    with pytest.raises(UserError, match="is not s3://BUCKET"):
        parse_s3_url(url)


def test_s3_options_need_an_s3_storage(tmp_path: Path) -> None:
    assert storage_option(str(tmp_path), None) == ("", tmp_path)
    for args in ((tmp_path, None, None), (None, "http://minio:9000", None), (None, None, "eu-west-1")):
        with pytest.raises(UserError, match="needs an s3:// --storage"):
            storage_option(str(tmp_path), *args)
    assert storage_option("s3://bkt/p/", None) == ("s3://bkt/p", Path("var"))
    with pytest.raises(UserError, match="--s3-endpoint-url must start with http"):
        storage_option("s3://bucket", None, "minio:9000")


# ---------------------------------------------------------------------------------------------------------
# Server secrets shared by every process: a file (0600) or the environment


def _secrets_file(path: Path, doc: dict[str, Any], mode: int = 0o600) -> Path:
    path.write_text(json.dumps(doc))
    os.chmod(path, mode)
    return path


def test_shared_secrets_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert shared_secrets(None) is None
    doc = new_secrets_doc(with_fernet_key=True)
    f = _secrets_file(tmp_path / "s.json", doc)
    from_file = shared_secrets(f)
    assert from_file is not None and from_file.secrets.jwt_key == base64.b64decode(doc["jwt_key"])
    monkeypatch.setenv(SERVER_SECRETS_ENV, json.dumps(doc))
    from_env = shared_secrets(None)
    assert from_env is not None and from_env.where == SERVER_SECRETS_ENV
    assert from_env.secrets == from_file.secrets  # session key too: derived from the token key
    other = new_secrets_doc(with_fernet_key=False)
    chosen = shared_secrets(_secrets_file(tmp_path / "o.json", other))  # the option wins over the environment
    assert chosen is not None and chosen.secrets.link_key == base64.b64decode(other["link_key"])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secrets_file_other_users_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    """Attack: another account on the machine reads the token key and mints device tokens for any device."""
    f = _secrets_file(tmp_path / "s.json", new_secrets_doc(True), mode)
    with pytest.raises(UserError, match=r"is accessible by other users .*chmod 600"):
        shared_secrets(f)


@pytest.mark.parametrize("text", [
    "", "not json", "[]", '{"jwt_key": "a"}',
    json.dumps({"jwt_key": base64.b64encode(b"short").decode(), "link_key": base64.b64encode(KEY).decode()}),
    json.dumps({"jwt_key": base64.b64encode(KEY).decode(), "link_key": "not base64!"}),
    json.dumps({"jwt_key": base64.b64encode(KEY).decode(), "link_key": base64.b64encode(KEY).decode(),
                "fernet_key": "nope"}),
])
def test_malformed_shared_secrets_are_one_clear_error(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_SECRETS_ENV, text or " x")
    with pytest.raises(UserError, match=f"^{SERVER_SECRETS_ENV} does not hold server secrets") as e:
        shared_secrets(None)
    assert "\n" not in str(e.value)


def test_the_default_secrets_key_comes_from_the_shared_secrets(tmp_path: Path) -> None:
    """Every server decrypts the same configuration secrets without a key file of its own."""
    doc = new_secrets_doc(with_fernet_key=True)
    f = _secrets_file(tmp_path / "s.json", doc)
    keys = secretkeys.resolve(None, tmp_path / "storage", f)
    assert keys is not None and keys.keys == (doc["fernet_key"],) and keys.source == "default"
    apart = Fernet.generate_key().decode()
    key_file = tmp_path / "keys"
    secretkeys.write_key_file(key_file, [apart])
    keys = secretkeys.resolve(key_file, tmp_path / "storage", f)
    assert keys is not None and keys.keys == (apart, doc["fernet_key"])  # the old default still decrypts


def test_server_refuses_shared_secrets_it_cannot_use(run_cli: Any, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/db.sqlite"
    readable = _secrets_file(tmp_path / "readable.json", new_secrets_doc(True), 0o644)
    r = run_cli("server", "--db", db, "--storage", tmp_path / "st", "--secrets-file", readable, "--allow-unsigned")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: --secrets-file {readable} is accessible by other users "
                                                 f"(mode 0644): chmod 600 {readable}")
    no_key = _secrets_file(tmp_path / "nokey.json", new_secrets_doc(False))
    r = run_cli("server", "--db", db, "--storage", tmp_path / "st", "--secrets-file", no_key, "--allow-unsigned")
    assert r.returncode == 2 and "holds no fernet_key and no secrets key is kept apart" in r.stderr
    assert not (tmp_path / "st" / "server-secrets.json").exists()  # nothing generated beside the database
    r = run_cli("server", "--db", db, "--storage", tmp_path / "st", "--work-dir", tmp_path / "w")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --work-dir needs an s3://")


def test_new_server_secrets(run_cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "shared.json"
    r = run_cli("server", "secrets", "new-server-secrets", "--out", out)
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    s = shared_secrets(out)
    assert s is not None and s.secrets.fernet_key is not None
    r = run_cli("server", "secrets", "new-server-secrets", "--out", out)  # never over the secrets in use
    assert r.returncode == 2 and "exists" in r.stderr
