#!/usr/bin/env bash
# Install or refresh the 3GSync worker on this machine from a release directory.
#
#   sudo tools/deploy/install-worker.sh --config FILE [--mode GET|PUT]
#        [--release DIR] [--ignore-list FILE] [--env-file FILE]
#
# gce-startup.sh and ec2-user-data.sh call it after fetching the code; it can
# also be run by hand from a checkout. It is idempotent: run it on every boot.
# It restarts the worker only when the code, the dependencies, the ini or the
# unit changed, and otherwise just makes sure the worker is running.
#
# What it does:
#   0. reads the ini: JobType must match --mode; warns when MaxParallelFile x
#      MaxThread x ChunkSize does not fit this machine;
#   1. makes the system user `gsync` (no home, no shell);
#   2. puts the release under /opt/3gsync/releases/ (a copy, unless it is there
#      already) and points /opt/3gsync/app at it;
#   3. builds a virtualenv per requirements.txt (keyed by its hash and the
#      Python version) under /opt/3gsync/venvs/ and points /opt/3gsync/venv at it,
#      so a running worker never sees its packages change under it;
#   4. has the new worker check the ini (--check-config) and stops here, leaving
#      the deployed worker alone, if it is rejected; then installs it as
#      /etc/3gsync/s3_migration_cluster_config.ini (root:gsync 0640);
#   5. installs 3gsync-worker.service plus a drop-in whose TimeoutStopSec is the
#      ini's ShutdownGrace + 10 s;
#   6. enables the unit and (re)starts it; keeps the last two releases and venvs.
set -euo pipefail

readonly UNIT=3gsync-worker.service
readonly SERVICE_USER=gsync
readonly INI_NAME=s3_migration_cluster_config.ini
# Seconds systemd waits after SIGTERM beyond the worker's own ShutdownGrace.
readonly STOP_MARGIN_S=10
readonly DEFAULT_SHUTDOWN_GRACE_S=25

readonly PREFIX=/opt/3gsync
readonly ETC_DIR=/etc/3gsync
readonly UNIT_DIR=/etc/systemd/system
readonly PYTHON=/usr/bin/python3

log() { printf '3gsync-install: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
release_src=$(cd "$script_dir/../.." && pwd)
config=""
mode=""
ignore_list=""
env_file=""
while (($#)); do
    case $1 in
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --mode) mode=${2:?--mode needs GET or PUT}; shift 2 ;;
    --release) release_src=${2:?--release needs a directory}; shift 2 ;;
    --ignore-list) ignore_list=${2:?--ignore-list needs a file}; shift 2 ;;
    --env-file) env_file=${2:?--env-file needs a file}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) log "unknown argument: $1"; usage 2 ;;
    esac
done

[[ -n $config ]] || die "--config FILE is required"
[[ -r $config ]] || die "cannot read config $config"
[[ -z $mode || $mode == GET || $mode == PUT ]] || die "--mode must be GET or PUT, not $mode"
[[ -f $release_src/s3_migration_cluster_worker.py ]] ||
    die "$release_src does not look like a 3GSync release (no s3_migration_cluster_worker.py)"
[[ -f $release_src/requirements.txt ]] || die "$release_src has no requirements.txt"
if [[ $EUID -ne 0 ]]; then
    die "run as root"
fi

# Reads a few values from the ini with Python's own parser, the same one the
# worker uses. Prints "JobType|ShutdownGrace|memory": the grace in whole
# seconds, the estimated peak memory in MiB; a value that cannot be read is empty.
read_ini() {
    "$PYTHON" - "$1" <<'PY'
import configparser, math, sys

cp = configparser.RawConfigParser(strict=False, inline_comment_prefixes=("#", ";"))
cp.read(sys.argv[1], encoding="utf-8")

def num(section, key, default):
    try:
        return float(cp.get(section, key, fallback=str(default)).strip())
    except ValueError:
        return None

job_type = cp.get("Basic", "JobType", fallback="").strip().upper()
grace = num("Mode", "ShutdownGrace", 25)
# Defaults as in s3_migration_lib.py.
files, threads, chunk = (num("Mode", "MaxParallelFile", 5), num("Mode", "MaxThread", 5),
                         num("Debug", "ChunkSize", 10))
memory = "" if None in (files, threads, chunk) else str(math.ceil(files * threads * chunk + 150))
print(job_type, "" if grace is None or grace < 0 else math.ceil(grace), memory, sep="|")
PY
}

ensure_user() {
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin --comment "3GSync worker" "$SERVICE_USER"
        log "created system user $SERVICE_USER"
    fi
}

# Exports the KEY=value lines of a systemd environment file, without running it
# as shell code (quotes around a value are dropped, as systemd does).
load_env_file() {
    local key value
    while IFS='=' read -r key value || [[ -n $key ]]; do
        key=${key//[[:space:]]/}
        [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        value=${value#"${value%%[![:space:]]*}"}
        [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]] && value=${BASH_REMATCH[1]}
        export "$key=$value"
    done <"$1"
}

# Atomically points symlink $2 at $1.
switch_link() {
    ln -sfn "$1" "$2.new"
    mv -Tf "$2.new" "$2"
}

# Keeps the $2 most recently used entries of directory $1 (by mtime; the
# current one is touched on every run) and never the one symlink $3 points at.
prune() {
    local dir=$1 keep=$2 current entry n=0
    current=$(readlink -f "$3" 2>/dev/null || true)
    while IFS= read -r entry; do
        n=$((n + 1))
        if ((n > keep)) && [[ $(readlink -f "$dir/$entry") != "$current" ]]; then
            rm -rf -- "${dir:?}/$entry"
            log "removed old ${dir##*/} entry $entry"
        fi
    done < <(find "$dir" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%T@ %f\n' |
        sort -rn | cut -d' ' -f2-)
}

# --- 0. the ini, before anything changes -------------------------------------
ini_values=$(read_ini "$config") || die "cannot parse $config as an ini file"
IFS='|' read -r job_type grace memory_mib <<<"$ini_values"
if [[ -n $mode && $job_type != "$mode" ]]; then
    die "the ini says JobType = $job_type but this machine runs $mode mode: fix [Basic] JobType"
fi
if [[ -z $grace ]]; then
    log "warning: ShutdownGrace in the ini is not a number; assuming ${DEFAULT_SHUTDOWN_GRACE_S}s"
    grace=$DEFAULT_SHUTDOWN_GRACE_S
fi
mem_total_mib=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
if [[ -n $memory_mib && -n $mem_total_mib ]] && ((memory_mib > mem_total_mib * 9 / 10)); then
    log "warning: MaxParallelFile x MaxThread x ChunkSize + 150 MiB = ${memory_mib} MiB," \
        "more than 90% of this machine's ${mem_total_mib} MiB: lower them or use a larger machine"
fi

# --- 1. user ---------------------------------------------------------------
install -d -m 0755 "$PREFIX"
# One run at a time (a boot script and a manual run, say).
exec 9>"$PREFIX/.lock"
flock -w 900 9 || die "another install-worker.sh has held $PREFIX/.lock for 15 minutes"
ensure_user
group=$SERVICE_USER

# --- 2. release --------------------------------------------------------------
install -d -m 0755 "$PREFIX" "$PREFIX/releases" "$PREFIX/venvs"
# Leftovers of an interrupted earlier run.
find "$PREFIX/releases" -mindepth 1 -maxdepth 1 -name '.new-*' -exec rm -rf -- {} +
release_src=$(cd "$release_src" && pwd -P)
if [[ $(dirname "$release_src") == "$(cd "$PREFIX/releases" && pwd -P)" ]]; then
    release=$release_src
else
    # A checkout somewhere else: snapshot it by content, without .git.
    digest=$(tar -C "$release_src" --exclude=.git --exclude=__pycache__ --sort=name \
        --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . | sha256sum | cut -c1-12)
    release=$PREFIX/releases/local-$digest
    if [[ ! -d $release ]]; then
        tmp=$(mktemp -d "$PREFIX/releases/.new-XXXXXX")
        tar -C "$release_src" --exclude=.git --exclude=__pycache__ -cf - . |
            tar -C "$tmp" --no-same-owner -xf -
        chmod 0755 "$tmp"
        mv -T "$tmp" "$release"
    fi
fi
touch "$release"
if [[ -n $ignore_list ]]; then
    install -m 0644 "$ignore_list" "$release/s3_migration_ignore_list.txt"
fi

# --- 3. virtualenv -----------------------------------------------------------
py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv_id=$( (cat "$release/requirements.txt"; echo "python $py_version") | sha256sum | cut -c1-12)
venv=$PREFIX/venvs/py$py_version-$venv_id
if [[ ! -f $venv/.complete ]] || ! "$venv/bin/python3" -c 'import sys' 2>/dev/null; then
    log "building virtualenv $venv"
    rm -rf -- "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$release/requirements.txt"
    touch "$venv/.complete"
fi
touch "$venv"
# Compile once as root; the unit runs with PYTHONDONTWRITEBYTECODE on a read-only tree.
"$venv/bin/python3" -m compileall -q "$release" >/dev/null || log "warning: compileall failed"

# --- 4. configuration --------------------------------------------------------
# The worker validates its own settings; the environment file may override some.
if ! (
    [[ -z $env_file ]] || load_env_file "$env_file"
    PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python3" "$release/s3_migration_cluster_worker.py" \
        --check-config --config "$config" >/dev/null
); then
    die "the worker rejected the new ini (message above); the deployed worker and its ini are left as they were"
fi
install -d -m 0750 -g "$group" "$ETC_DIR"
install -m 0640 -g "$group" "$config" "$ETC_DIR/$INI_NAME"
if [[ -n $env_file ]]; then
    install -m 0640 -g "$group" "$env_file" "$ETC_DIR/worker.env"
fi

# --- 5. unit -----------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR" "$UNIT_DIR/$UNIT.d"
install -m 0644 "$release/tools/deploy/$UNIT" "$UNIT_DIR/$UNIT"
cat >"$UNIT_DIR/$UNIT.d/10-deploy.conf" <<EOF
# Written by install-worker.sh on every run; edits here are lost.
[Service]
# ShutdownGrace = ${grace}s in the ini, plus ${STOP_MARGIN_S}s to exit.
TimeoutStopSec=$((grace + STOP_MARGIN_S))s
EOF
chmod 0644 "$UNIT_DIR/$UNIT.d/10-deploy.conf"

# --- 6. switch and (re)start -------------------------------------------------
switch_link "$release" "$PREFIX/app"
switch_link "$venv" "$PREFIX/venv"
prune "$PREFIX/releases" 2 "$PREFIX/app"
prune "$PREFIX/venvs" 2 "$PREFIX/venv"

fingerprint=$(
    {
        readlink -f "$PREFIX/app"
        readlink -f "$PREFIX/venv"
        cat "$ETC_DIR/$INI_NAME" "$UNIT_DIR/$UNIT" "$UNIT_DIR/$UNIT.d/10-deploy.conf"
        cat "$ETC_DIR/worker.env" "$release/s3_migration_ignore_list.txt" 2>/dev/null || true
    } | sha256sum | cut -c1-64
)
previous=$(cat "$PREFIX/.deployed" 2>/dev/null || true)
echo "$fingerprint" >"$PREFIX/.deployed"

if [[ ! -d /run/systemd/system ]]; then
    log "warning: systemd is not running here; $UNIT installed but not started"
else
    systemctl daemon-reload
    systemctl enable --quiet "$UNIT"
    # A unit that gave up (start limit, or exit 2 on an earlier ini) gets a fresh start.
    systemctl reset-failed "$UNIT" 2>/dev/null || true
    if [[ $fingerprint != "$previous" ]]; then
        log "deployment changed: restarting $UNIT (release ${release##*/})"
        systemctl restart "$UNIT"
    else
        systemctl start "$UNIT"
    fi
    systemctl --no-pager --lines=0 status "$UNIT" >&2 || true
fi
log "done: release ${release##*/}, venv ${venv##*/}, TimeoutStopSec=$((grace + STOP_MARGIN_S))s"
