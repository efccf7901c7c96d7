#!/usr/bin/env bash
# GCE startup script for the 3GSync worker in GET mode (instance template of a
# managed instance group). GCE runs it as root on every boot; it is idempotent.
#
#   gcloud compute instance-templates create ... \
#     --metadata-from-file=startup-script=tools/deploy/gce-startup.sh,3gsync-config=my.ini \
#     --metadata=3gsync-git-url=https://github.com/<OWNER>/<REPO>.git,3gsync-git-ref=main
#
# Metadata attributes (instance attributes first, then project attributes):
#   3gsync-git-url      git URL of the code (a private repository: put a
#                       read-only token in the URL or use a tarball instead)
#   3gsync-git-ref      branch, tag or commit to deploy (default: main)
#   3gsync-tarball-url  instead of git: gs://BUCKET/OBJECT, https://... or
#                       s3://... (needs a configured AWS CLI) of a .tar.gz of the repo
#   3gsync-config       the text of s3_migration_cluster_config.ini, or
#   3gsync-config-url   gs://, https:// or s3:// URL of it; with neither, the ini
#                       inside the fetched code is used
#   3gsync-ignore-list  optional text of s3_migration_ignore_list.txt
#   3gsync-env          optional extra environment for the worker, KEY=value lines
#
# gs:// URLs are read with the VM's service account (it needs
# roles/storage.objectViewer on that bucket); no gcloud needed.
# The work itself (user, virtualenv, ini, systemd unit) is done by
# tools/deploy/install-worker.sh from the fetched code.
# Output goes to the serial console and to `journalctl -u google-startup-scripts`.
set -euo pipefail

readonly PREFIX=/opt/3gsync
readonly PACKAGES=(ca-certificates curl git python3 python3-venv python3-pip)
# GCE_METADATA_HOST is google-auth's override of the metadata server's address.
readonly METADATA=http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1

log() { printf '3gsync-startup: %s\n' "$*" >&2; }
# A URL as it may be logged: without user:password@.
redact() { sed -E 's#^([a-z0-9+]+://)[^/@]*@#\1#' <<<"$1"; }
die() {
    log "error: $*"
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The image's own unattended-upgrades may hold the dpkg lock at boot.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
}

# metadata PATH FILE: writes the value to FILE; returns 1 when it is not set.
metadata() {
    local code
    code=$(curl -sS --retry 10 --retry-connrefused --retry-delay 2 --max-time 20 \
        -H 'Metadata-Flavor: Google' -o "$2" -w '%{http_code}' "$METADATA/$1") ||
        die "metadata server unreachable ($1)"
    case $code in
    200) return 0 ;;
    404)
        rm -f -- "$2"
        return 1
        ;;
    *) die "metadata $1: HTTP $code" ;;
    esac
}

# attribute NAME FILE: an instance attribute, else a project attribute.
attribute() {
    metadata "instance/attributes/$1" "$2" || metadata "project/attributes/$1" "$2"
}

# attribute_value NAME DEFAULT: prints a one-line attribute.
attribute_value() {
    if attribute "$1" "$work/value"; then
        tr -d '\r\n' <"$work/value"
    else
        printf '%s' "$2"
    fi
}

gcs_download() {
    local path=${1#gs://} bucket object
    bucket=${path%%/*}
    object=${path#*/}
    [[ -n $bucket && -n $object && $object != "$path" ]] || die "bad GCS URL $1"
    metadata instance/service-accounts/default/token "$work/token.json" ||
        die "this VM has no service account to read $1"
    # The token goes to curl in a file, never on a command line.
    "$PYTHON" - "$work/token.json" >"$work/auth-header" <<'PY'
import json, sys
print("Authorization: Bearer " + json.load(open(sys.argv[1]))["access_token"])
PY
    object=$("$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$object")
    curl -fsS --retry 5 --max-time 600 -H @"$work/auth-header" -o "$2" \
        "https://storage.googleapis.com/storage/v1/b/$bucket/o/$object?alt=media"
    rm -f -- "$work/auth-header" "$work/token.json"
}

# download URL FILE
download() {
    case $1 in
    gs://*) gcs_download "$1" "$2" ;;
    s3://*)
        command -v aws >/dev/null || die "$1 needs the AWS CLI with credentials on this VM"
        aws s3 cp --only-show-errors "$1" "$2"
        ;;
    https://*) curl -fsSL --retry 5 --max-time 600 -o "$2" "$1" ;;
    *) die "unsupported URL $1 (use gs://, s3:// or https://)" ;;
    esac
}

# Sets $release to /opt/3gsync/releases/git-<commit>.
fetch_git() {
    local url=$1 ref=$2 mirror=$PREFIX/src.git sha tmp
    if [[ -d $mirror ]]; then
        git --git-dir="$mirror" remote set-url origin "$url"
        git --git-dir="$mirror" fetch --quiet --prune --tags origin
    else
        git clone --quiet --mirror "$url" "$mirror"
    fi
    # The remote URL may carry a token: root only.
    chmod 0700 "$mirror"
    sha=$(git --git-dir="$mirror" rev-parse --verify --quiet "$ref^{commit}") ||
        die "git ref '$ref' not found in $(redact "$url")"
    release=$PREFIX/releases/git-${sha:0:12}
    if [[ ! -d $release ]]; then
        tmp=$(mktemp -d "$PREFIX/releases/.new-XXXXXX")
        git --git-dir="$mirror" archive "$sha" | tar -C "$tmp" --no-same-owner -xf -
        chmod 0755 "$tmp"
        mv -T "$tmp" "$release"
    fi
    log "code: $(redact "$url") at $ref ($sha)"
}

# Sets $release to /opt/3gsync/releases/tar-<sha256>. The archive may hold the
# repository at its top or inside one folder (as GitHub's archives do).
fetch_tarball() {
    local url=$1 digest tmp top
    download "$url" "$work/code.tar.gz"
    digest=$(sha256sum "$work/code.tar.gz" | cut -c1-12)
    release=$PREFIX/releases/tar-$digest
    if [[ ! -d $release ]]; then
        tmp=$(mktemp -d "$PREFIX/releases/.new-XXXXXX")
        tar -C "$tmp" --no-same-owner --no-same-permissions -xf "$work/code.tar.gz"
        top=$(find "$tmp" -maxdepth 2 -name s3_migration_cluster_worker.py -printf '%h\n' | head -n 1)
        [[ -n $top ]] || die "$(redact "$url") holds no s3_migration_cluster_worker.py"
        chmod 0755 "$top"
        mv -T "$top" "$release"
        rm -rf -- "$tmp"
    fi
    log "code: $(redact "$url") (sha256 $digest...)"
}

install_packages
PYTHON=/usr/bin/python3
install -d -m 0755 "$PREFIX" "$PREFIX/releases"

tarball_url=$(attribute_value 3gsync-tarball-url "")
git_url=$(attribute_value 3gsync-git-url "")
git_ref=$(attribute_value 3gsync-git-ref main)
config_url=$(attribute_value 3gsync-config-url "")
release=""
if [[ -n $tarball_url ]]; then
    fetch_tarball "$tarball_url"
elif [[ -n $git_url ]]; then
    fetch_git "$git_url" "$git_ref"
else
    die "set the metadata attribute 3gsync-git-url or 3gsync-tarball-url"
fi

if attribute 3gsync-config "$work/config.ini"; then
    log "config: metadata attribute 3gsync-config"
elif [[ -n $config_url ]]; then
    download "$config_url" "$work/config.ini"
    log "config: $(redact "$config_url")"
else
    cp "$release/s3_migration_cluster_config.ini" "$work/config.ini"
    log "config: the ini inside the code (no 3gsync-config or 3gsync-config-url attribute)"
fi

args=(--release "$release" --config "$work/config.ini" --mode GET)
if attribute 3gsync-ignore-list "$work/ignore-list.txt"; then
    args+=(--ignore-list "$work/ignore-list.txt")
fi
# Always passed, so removing the attribute also removes the variables.
attribute 3gsync-env "$work/worker.env" || : >"$work/worker.env"
args+=(--env-file "$work/worker.env")

installer=$release/tools/deploy/install-worker.sh
[[ -f $installer ]] || die "the fetched code has no tools/deploy/install-worker.sh"
bash "$installer" "${args[@]}"
