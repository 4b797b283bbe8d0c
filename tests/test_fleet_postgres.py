"""The fleet onboarding stories (staged Ansible hosts, bulk accept) on a real PostgreSQL: migration 0005 and the
queries behind them there too."""

from __future__ import annotations

from .test_fleet_server import (  # noqa: F401
    test_bulk_accept_leaves_a_second_key_and_refuses_bad_requests,
    test_ini_inventory_imported_before_the_devices_exist_applies_on_bulk_accept,
    test_preauthorized_device_gets_its_staged_configuration,
)
from .test_server_postgres import pg_server, postgres  # noqa: F401 - fixtures (the server on PostgreSQL)
