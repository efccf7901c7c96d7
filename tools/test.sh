#!/usr/bin/env bash
# README command two: install what the tests need, then run the whole test suite.
# Extra arguments go to pytest (e.g. tools/test.sh -k proxy -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the tests use, by the command that shows each is there.
declare -A packages=([shellcheck]=shellcheck [dot]=graphviz [rclone]=rclone
                     [systemd-analyze]=systemd [unshare]=util-linux [ip]=iproute2
                     [git]=git [curl]=curl)
missing=()
for command in "${!packages[@]}"; do
    command -v "$command" >/dev/null || missing+=("${packages[$command]}")
done
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "note: missing ${missing[*]} and not root: install them with apt-get" >&2
    fi
fi
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-input -r tests/requirements.txt
exec python3 -m pytest -q tests "$@"
