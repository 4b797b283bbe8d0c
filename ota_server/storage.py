"""Where artifacts live: a directory on the server's disk (the embedded default) or an S3-compatible object store.

The store is the one piece of the server that holds bytes outside the database, so it decides whether several
server processes on several machines can serve the same fleet:

- :class:`LocalStore` — ``STORAGE/artifacts/<id>.mender``. Devices download through the server's own route
  (``/api/devices/v1/download/<id>``, a signed expiring link, Range). One machine (any number of workers).
- :class:`S3Store` — ``s3://bucket/prefix/<id>.mender`` through boto3 (AWS S3, MinIO, Ceph RGW, ...). Devices
  download straight from the store with a presigned GET URL that expires with the link TTL (S3 honours Range),
  so the server processes hold nothing but configuration and any number of them can run anywhere.

Every method is blocking (disk or network): the server calls ``put``, ``delete`` and ``open`` from a thread
pool. ``download_url`` never does I/O (presigning is a local HMAC computation): it is on the ``next`` path.
Credentials of the object store come from where boto3 reads them (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role ...): never from the command line, which other
users of the machine can read.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ota_common.errors import UserError

if TYPE_CHECKING:
    from .downloads import LinkSigner

S3_SCHEME = "s3://"
#: what the bucket of an ``s3://`` URL may be (S3's rules for new buckets; dots allowed for older ones)
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: what a key prefix may hold: plain path segments, no ``..``, no empty segment
PREFIX_RE = re.compile(r"[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*")
#: SigV4 presigned URLs live at most 7 days
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
MEDIA_TYPE = "application/vnd.mender-artifact"


class ArtifactStore(Protocol):
    """What the server needs from wherever artifacts live. ``artifact_id`` is always a server-made UUID."""

    @property
    def where(self) -> str:
        """Where the artifacts are, for messages (``/var/lib/vv-ota/artifacts``, ``s3://bucket/prefix``)."""

    def check(self) -> None:
        """Verify at start that the store is usable (one cheap call). Raises UserError (one line) otherwise."""

    def put(self, artifact_id: str, path: Path, sha256: str, size: int) -> None:
        """Store the verified upload ``path`` (its SHA-256 and size already known) under ``artifact_id``; the
        file may be moved away. Raises OSError (or the store's error) when it cannot be stored."""

    def open(self, artifact_id: str) -> IO[bytes]:
        """The artifact's bytes as a stream (close it). Raises FileNotFoundError when it is not there."""

    def delete(self, artifact_id: str) -> None:
        """Remove the artifact; nothing when it is already gone."""

    def exists(self, artifact_id: str) -> bool: ...

    def size(self, artifact_id: str) -> int | None:
        """Its size in bytes, None when it is not there."""

    def download_url(self, artifact_id: str, expires: int, base_url: str) -> str:
        """A URL that downloads the artifact without credentials until ``expires`` (epoch seconds) and honours
        Range. ``base_url`` is the server's public base (the local store's links point there). No I/O."""

    def local_path(self, artifact_id: str) -> Path | None:
        """The file on this machine, when the store is a local directory (the server's download route serves
        it); None for a remote store."""


@dataclass
class LocalStore:
    """``<directory>/<id>.mender`` and download links to the server's own signed-link route (the behaviour of
    the server before stores existed, unchanged)."""

    directory: Path
    links: LinkSigner

    @property
    def where(self) -> str:
        return str(self.directory)

    def _path(self, artifact_id: str) -> Path:
        return self.directory / f"{artifact_id}.mender"

    def check(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the artifact directory {self.directory}: {e.strerror}") from None

    def put(self, artifact_id: str, path: Path, sha256: str, size: int) -> None:
        os.replace(path, self._path(artifact_id))  # upload temp files live in STORAGE/tmp: same file system

    def open(self, artifact_id: str) -> IO[bytes]:
        return open(self._path(artifact_id), "rb")

    def delete(self, artifact_id: str) -> None:
        self._path(artifact_id).unlink(missing_ok=True)

    def exists(self, artifact_id: str) -> bool:
        return self._path(artifact_id).is_file()

    def size(self, artifact_id: str) -> int | None:
        try:
            return self._path(artifact_id).stat().st_size
        except FileNotFoundError:
            return None

    def download_url(self, artifact_id: str, expires: int, base_url: str) -> str:
        return self.links.url(base_url, artifact_id, expires)

    def local_path(self, artifact_id: str) -> Path | None:
        return self._path(artifact_id)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at its ends; may be empty). Strict: the URL
    names where every process writes and deletes. Raises UserError."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    if (parts.scheme != "s3" or not BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc
            or parts.query or parts.fragment or (prefix and not PREFIX_RE.fullmatch(prefix))
            or any(seg in (".", "..") for seg in prefix.split("/"))):
        raise UserError(f"--storage {url!r} is not s3://BUCKET[/PREFIX] (a bucket name of 3-63 of a-z 0-9 . -, "
                        "a prefix of plain path segments)")
    return parts.netloc, prefix


class S3Store:
    """Artifacts as objects ``<prefix>/<id>.mender`` in ``bucket``. ``endpoint_url`` selects an S3-compatible
    service other than AWS (path-style addressing then, which every such service understands). The boto3
    client is made once per process, when first needed (clients are thread-safe)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self._where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url
        self.region = region
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise UserError("an s3:// storage needs boto3: pip install 'vv-ota[s3]' (or boto3)") from None
            config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=60,
                            retries={"max_attempts": 3, "mode": "standard"},
                            s3={"addressing_style": "path"} if self.endpoint_url else None)
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        return self._client

    @property
    def where(self) -> str:
        return self._where

    def key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}.mender" if self.prefix else f"{artifact_id}.mender"

    def check(self) -> None:
        """One HEAD of the bucket: it exists and these credentials may use it."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise UserError(f"no credentials for {self.where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                            "AWS_PROFILE, an instance role) in the server's environment") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", "?"))
            why = {"404": "does not exist", "NoSuchBucket": "does not exist",
                   "403": "refuses these credentials (access denied)"}.get(code, f"answered {code}")
            raise UserError(f"bucket {self.bucket}{at} {why}: --storage {self.where}") from None
        except BotoCoreError as e:
            raise UserError(f"cannot reach the object store{at} for {self.where}: {e}") from None

    def put(self, artifact_id: str, path: Path, sha256: str, size: int) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(artifact_id), ExtraArgs={
            "ContentType": MEDIA_TYPE, "Metadata": {"sha256": sha256}})

    def open(self, artifact_id: str) -> IO[bytes]:
        from botocore.exceptions import ClientError

        try:
            body: IO[bytes] = self.client.get_object(Bucket=self.bucket, Key=self.key(artifact_id))["Body"]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.where}/{artifact_id}.mender") from None
            raise
        return body

    def delete(self, artifact_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(artifact_id))

    def size(self, artifact_id: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(artifact_id))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return int(head["ContentLength"])

    def exists(self, artifact_id: str) -> bool:
        return self.size(artifact_id) is not None

    def download_url(self, artifact_id: str, expires: int, base_url: str) -> str:
        seconds = max(1, min(MAX_PRESIGN_SECONDS, expires - int(time.time())))
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(artifact_id)}, ExpiresIn=seconds)
        return url

    def local_path(self, artifact_id: str) -> Path | None:
        return None


def is_s3(storage: str) -> bool:
    return storage.startswith(S3_SCHEME)


def make_store(artifact_store: str, local_dir: Path, links: LinkSigner, endpoint_url: str | None = None,
               region: str | None = None) -> ArtifactStore:
    """The store the settings name: ``s3://...`` or, when empty, ``local_dir/artifacts``."""
    if artifact_store:
        return S3Store(artifact_store, endpoint_url, region)
    return LocalStore(local_dir / "artifacts", links)
