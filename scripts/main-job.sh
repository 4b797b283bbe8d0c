#!/usr/bin/env bash
# The main job: the whole product in one command, on this machine (`build.py demo`). It builds releases
# 1.0.0, 2.0.0 and a broken 2.1.0 of the default configuration for qemu-virt (the first build bootstraps the
# arm64 base, ~8 minutes; later ones reuse it), checks each artifact with the real mender-artifact, starts the
# update server, boots a QEMU device from 1.0.0, updates it to 2.0.0 and shows the rollback from 2.1.0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python build.py demo "$@"
