#!/usr/bin/env bash
# EC2 user data for the 3GSync worker in PUT mode (launch template of an Auto
# Scaling group, Debian 12 AMI). cloud-init runs it as root on the first boot;
# it also installs itself as a per-boot script, so every later boot refreshes
# the code and ini the same way. It is idempotent.
#
# Edit the settings below, or leave them empty and set EC2 instance tags of the
# same names (lower case, e.g. tag `3gsync-git-url`); tags are read only when
# the launch template allows tags in instance metadata
# (--metadata-options "HttpTokens=required,InstanceMetadataTags=enabled").
#
# The instance role needs what SETUP.md lists for PUT mode, plus s3:GetObject
# on the objects named in the s3:// URLs below.
# The work itself (user, virtualenv, ini, systemd unit) is done by
# tools/deploy/install-worker.sh from the fetched code.
# Output: /var/log/cloud-init-output.log and the journal.
set -euo pipefail

# ---- settings ----------------------------------------------------------------
# Code: a git URL (and ref), or a .tar.gz of the repository (s3:// or https://).
GSYNC_GIT_URL=""          # tag 3gsync-git-url, e.g. https://github.com/<OWNER>/<REPO>.git
GSYNC_GIT_REF=""          # tag 3gsync-git-ref; empty: main
GSYNC_TARBALL_URL=""      # tag 3gsync-tarball-url, e.g. s3://<BUCKET>/3gsync/3gsync.tar.gz
# The ini (s3:// or https://); empty: the ini inside the fetched code is used.
GSYNC_CONFIG_URL=""       # tag 3gsync-config-url, e.g. s3://<BUCKET>/3gsync/worker.ini
GSYNC_IGNORE_LIST_URL=""  # tag 3gsync-ignore-list-url, optional
# Extra environment for the worker, KEY=value lines (e.g. AWS_ENDPOINT_URL_SQS=...).
GSYNC_ENV=""
# Run this script again on every boot (yes/no).
GSYNC_REFRESH_ON_BOOT=yes
# -------------------------------------------------------------------------------

readonly PREFIX=/opt/3gsync
readonly PACKAGES=(ca-certificates curl git python3 python3-venv python3-pip)
readonly PER_BOOT=/var/lib/cloud/scripts/per-boot/3gsync-refresh.sh
# AWS_EC2_METADATA_SERVICE_ENDPOINT is the AWS SDKs' override of IMDS's address.
IMDS=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
readonly IMDS=${IMDS%/}

log() { printf '3gsync-user-data: %s\n' "$*" >&2; }
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
    for pkg in "$@"; do
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

# IMDSv2: every read carries a session token.
imds_token=""
imds() { # imds PATH FILE: writes the value to FILE; returns 1 when it is not there.
    local code
    if [[ -z $imds_token ]]; then
        imds_token=$(curl -fsS --retry 10 --retry-connrefused --retry-delay 2 --max-time 10 \
            -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 3600' "$IMDS/latest/api/token") ||
            die "EC2 instance metadata (IMDSv2) unreachable"
    fi
    code=$(curl -sS --retry 10 --retry-connrefused --retry-delay 2 --max-time 10 \
        -H "X-aws-ec2-metadata-token: $imds_token" -o "$2" -w '%{http_code}' "$IMDS/latest/$1") ||
        die "EC2 instance metadata unreachable ($1)"
    case $code in
    200) return 0 ;;
    404)
        rm -f -- "$2"
        return 1
        ;;
    *) die "instance metadata $1: HTTP $code" ;;
    esac
}

# setting NAME TAG: keeps $NAME if set, else takes instance tag TAG if present.
setting() {
    local -n value=$1
    [[ -n $value ]] && return 0
    if [[ $tags_enabled == yes ]] && imds "meta-data/tags/instance/$2" "$work/tag"; then
        value=$(tr -d '\r\n' <"$work/tag")
        log "setting $1 from instance tag $2"
    fi
}

# download URL FILE
download() {
    case $1 in
    s3://*)
        command -v aws >/dev/null || install_packages awscli
        aws s3 cp --only-show-errors --region "$region" "$1" "$2"
        ;;
    https://*) curl -fsSL --retry 5 --max-time 600 -o "$2" "$1" ;;
    *) die "unsupported URL $(redact "$1") (use s3:// or https://)" ;;
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

install_packages "${PACKAGES[@]}"
install -d -m 0755 "$PREFIX" "$PREFIX/releases"

imds meta-data/placement/region "$work/region" || die "no region in instance metadata"
region=$(cat "$work/region")
export AWS_DEFAULT_REGION=$region
tags_enabled=no
if imds meta-data/tags/instance "$work/tags"; then
    tags_enabled=yes
fi
setting GSYNC_GIT_URL 3gsync-git-url
setting GSYNC_GIT_REF 3gsync-git-ref
setting GSYNC_TARBALL_URL 3gsync-tarball-url
setting GSYNC_CONFIG_URL 3gsync-config-url
setting GSYNC_IGNORE_LIST_URL 3gsync-ignore-list-url

release=""
if [[ -n $GSYNC_TARBALL_URL ]]; then
    fetch_tarball "$GSYNC_TARBALL_URL"
elif [[ -n $GSYNC_GIT_URL ]]; then
    fetch_git "$GSYNC_GIT_URL" "${GSYNC_GIT_REF:-main}"
else
    die "set GSYNC_GIT_URL or GSYNC_TARBALL_URL at the top of this script (or as instance tags)"
fi

if [[ -n $GSYNC_CONFIG_URL ]]; then
    download "$GSYNC_CONFIG_URL" "$work/config.ini"
    log "config: $(redact "$GSYNC_CONFIG_URL")"
else
    cp "$release/s3_migration_cluster_config.ini" "$work/config.ini"
    log "config: the ini inside the code (GSYNC_CONFIG_URL is empty)"
fi

args=(--release "$release" --config "$work/config.ini" --mode PUT)
if [[ -n $GSYNC_IGNORE_LIST_URL ]]; then
    download "$GSYNC_IGNORE_LIST_URL" "$work/ignore-list.txt"
    args+=(--ignore-list "$work/ignore-list.txt")
fi
# Always passed, so emptying GSYNC_ENV also removes the variables.
printf '%s\n' "$GSYNC_ENV" >"$work/worker.env"
args+=(--env-file "$work/worker.env")

installer=$release/tools/deploy/install-worker.sh
[[ -f $installer ]] || die "the fetched code has no tools/deploy/install-worker.sh"
bash "$installer" "${args[@]}"

# cloud-init runs user data once per instance; scripts in per-boot run on
# every boot, so later boots pick up new code and settings too.
self=$(readlink -f "${BASH_SOURCE[0]}")
if [[ $GSYNC_REFRESH_ON_BOOT == yes && -d /var/lib/cloud && ! $self -ef $PER_BOOT ]]; then
    install -d -m 0755 "$(dirname "$PER_BOOT")"
    install -m 0700 "$self" "$PER_BOOT"
    log "installed $PER_BOOT"
fi
