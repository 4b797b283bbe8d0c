"""The update server: Mender-compatible device API, management API, phased deployments, signed Range downloads.

Modules: :mod:`.settings` (configuration and persisted secrets), :mod:`.db` (engine, SQLite tuning,
migrations), :mod:`.models` (tables), :mod:`.app` (the FastAPI application), :mod:`.auth` (device signatures,
JWT, admin token), :mod:`.device_api` (with :mod:`.devauth`, :mod:`.device_deployments`, :mod:`.fastpoll`),
:mod:`.management`, :mod:`.deployments` (rollout logic),
:mod:`.downloads` (signed links), :mod:`.configvars` (configuration variables, secrets, Ansible import),
:mod:`.metrics`, :mod:`.dashboard` (fleet pages under /ui/). Run it with ``python build.py server``; see ``docs/server.md``.
"""
