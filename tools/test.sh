#!/usr/bin/env bash
# README command two: install what the tests need, then run the whole test suite.
# Extra arguments go to pytest (e.g. tools/test.sh -k proxy -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v shellcheck >/dev/null || ! command -v rclone >/dev/null || ! command -v dot >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck rclone graphviz >/dev/null
    else
        echo "note: shellcheck or rclone is missing and this is not root; skipping apt-get" \
             "(install them: apt-get install shellcheck rclone graphviz)" >&2
    fi
fi
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-input -r tests/requirements.txt
exec python3 -m pytest -q tests "$@"
