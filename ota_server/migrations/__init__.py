"""Alembic migrations, shipped with the package and applied by :func:`ota_server.db.migrate` at start."""
