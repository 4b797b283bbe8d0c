"""What every request handler needs, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from fastapi import Request

from artifacts.keys import load_verifiers
from ota_common.fleetca import load_fleet_cas

from . import metrics
from .auth import TokenCodec
from .configvars import ConfigStore
from .db import Database
from .downloads import LinkSigner
from .groupcommit import GroupCommitter
from .lastseen import LastSeen
from .limits import AuthLimiter
from .settings import ServerSecrets, Settings
from .storage import ArtifactStore, make_store


@dataclass
class ServerContext:
    settings: Settings
    db: Database
    tokens: TokenCodec
    links: LinkSigner
    config: ConfigStore
    verifiers: list[Any]
    #: HMAC key of dashboard sessions and login links (derived from the server secrets)
    session_key: bytes
    auth_limits: AuthLimiter
    #: the fleet enrolment CAs (empty: no zero-touch enrolment, the auth request's ``device_cert`` is ignored)
    fleet_cas: list[x509.Certificate]
    #: where artifacts live (local directory or object store) and how devices download them
    store: ArtifactStore
    #: devices heard from since the last flush (written in batches by the app's lifespan task)
    last_seen: LastSeen = field(default_factory=LastSeen)
    #: device reports (status, logs) share transactions and commits (:mod:`.groupcommit`)
    committer: GroupCommitter = field(init=False)

    def __post_init__(self) -> None:
        self.committer = GroupCommitter(self.db)

    @classmethod
    def create(cls, settings: Settings, secrets: ServerSecrets) -> ServerContext:
        db = Database(settings.db_url)
        metrics.configure(db, stale_after=settings.stale_after)
        links = LinkSigner(secrets.link_key, settings.link_ttl)
        return cls(
            settings=settings,
            db=db,
            tokens=TokenCodec(secrets.jwt_key, settings.device_token_ttl),
            links=links,
            config=ConfigStore(settings.secrets_keys or ([secrets.fernet_key] if secrets.fernet_key else [])),
            verifiers=list(load_verifiers(settings.release_keys)),
            session_key=secrets.session_key,
            auth_limits=AuthLimiter.from_settings(settings.auth_rate_per_address, settings.auth_rate_per_identity),
            fleet_cas=load_fleet_cas(settings.fleet_ca_file) if settings.fleet_ca_file is not None else [],
            store=make_store(settings.artifact_store, settings.storage, links, settings.s3_endpoint_url,
                             settings.s3_region),
        )

    def base_url(self, request: Request) -> str:
        return self.settings.public_url or str(request.base_url)


def get_ctx(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx
