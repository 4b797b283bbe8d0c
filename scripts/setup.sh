#!/usr/bin/env bash
# One command for a new user on Debian bookworm: install everything, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec scripts/main-job.sh "$@"
