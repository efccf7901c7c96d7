#!/usr/bin/env bash
# README command one: run the whole 3GSync pipeline locally, no cloud account needed.
# Installs the requirements (and moto server) quietly, then runs tools/local_sync.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-input -r requirements.txt 'moto[server]>=5.1,<6'
exec python3 tools/local_sync.py "$@"
