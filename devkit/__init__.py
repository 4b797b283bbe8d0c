"""The test and demo harness, in one place: what ``build.py demo``, ``build.py publish``, ``tests/``,
``qemu_tests/`` and ``bench/`` use to start and drive the product.

- :mod:`devkit.qemu` — the QEMU line of each board (pure argv functions), the preflight, and :class:`Vm`, a
  device booted from a disk image with its console in a log file.
- :mod:`devkit.server` — ``build.py server`` as a child process on a free loopback port.
- :mod:`devkit.client` — the management API client (streams uploads; ``build.py publish`` uses it too).
- :mod:`devkit.config` — the demo's release configuration and its TLS authority.
- :mod:`devkit.wait` — the one "poll until done" loop, and what a time-out reports.
- :mod:`devkit.net` — a free TCP port.

It sits between ``image`` and ``cli`` in the import order: it imports ``ota_common`` only (the server and
QEMU are child processes), and ``cli`` imports it.
"""
