#!/usr/bin/env bash
# The whole test suite (fast, slow and qemu tests), after installing what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/python -m ruff check .
# two workers: the QEMU scenarios and image builds (one group) run beside the rest (conftest.py)
exec .venv/bin/python -m pytest -n 2 --dist loadscope "$@"
