"""Alembic environment: runs on the connection :func:`ota_server.db.migrate` passes in."""

from __future__ import annotations

from alembic import context

from ota_server.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached when someone runs the alembic CLI directly
    raise RuntimeError("run migrations through ota_server.db.migrate(url)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
