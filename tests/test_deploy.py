"""The deployment folder (tools/deploy) and the architecture diagrams.

* The systemd unit passes ``systemd-analyze verify`` with every warning treated as an error,
  keeps its exposure score low, and stops the way the worker needs (SIGTERM to the main process,
  more time than ShutdownGrace, no restart loop on a bad config).
* The shell scripts pass shellcheck.
* gce-startup.sh and ec2-user-data.sh run for real, as root, inside a private mount and network
  namespace (so nothing they do reaches this machine's /opt, /etc or network): a fake metadata
  server on the namespace's loopback answers like GCE's and like EC2's IMDSv2, the code comes from
  a local git repository, and the tests check what they installed, that a second run changes
  nothing, and that a rejected ini leaves the deployed worker alone.
* SETUP.md's shell blocks pass shellcheck and run top to bottom with the clouds' CLIs stubbed;
  every JSON document they write (policies, queue attributes, the secret, the launch template)
  is valid and says what it should.
* tools/draw_diagrams.py --check passes (the committed DOT sources are current).

Needs root (for the namespaces, as CI has) and these Debian packages, which .ci/run installs:
shellcheck, systemd (systemd-analyze), graphviz (dot), and what the boot scripts would install
themselves: ca-certificates curl git python3 python3-venv python3-pip.
"""
from __future__ import annotations

import base64
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "tools" / "deploy"
UNIT = DEPLOY / "3gsync-worker.service"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
SETUP = DEPLOY / "SETUP.md"
SYSTEM_PYTHON = "/usr/bin/python3"
# The worker's ShutdownGrace default (s3_migration_lib.py); the ini may say more.
SHUTDOWN_GRACE_DEFAULT_S = 25


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def require_tool(path: str, package: str) -> str:
    """Fails (never skips) when a tool the checks need is missing."""
    found = shutil.which(path)
    assert found, f"{path} is missing: apt-get install {package} (.ci/run does)"
    return found


# --- the unit ----------------------------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` of a unit file (keys may repeat, so not configparser)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A systemd time span such as ``35s``, ``1min 5s`` or ``35`` in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def verify_problems(unit_text: str, directory: Path, name: str = "3gsync-worker.service") -> list[str]:
    """Runs ``systemd-analyze verify`` on a copy whose ExecStart python exists on this machine.

    verify exits 0 on unknown keys and unparsable values (it only logs them), so every line it
    prints about the unit counts as a problem, and so does a non-zero exit.
    """
    require_tool("systemd-analyze", "systemd")
    unit_text = unit_text.replace("/opt/3gsync/venv/bin/python3", SYSTEM_PYTHON)
    path = directory / name
    path.write_text(unit_text)
    result = run(["systemd-analyze", "verify", "--man=no", str(path)])
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if name in line or str(directory) in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_problems(UNIT.read_text(), tmp_path) == []


@pytest.mark.parametrize("breakage", [
    ("KillMode=mixed", "KillMode=mixd"),                  # a bad value: verify only warns
    ("TimeoutStopSec=35s", "TimeoutStopSecs=35s"),        # an unknown key: verify only warns
    ("ExecStart=/opt/3gsync/venv/bin/python3", "ExecStart=/nonexistent/python3"),
])
def test_verify_check_catches_a_broken_unit(tmp_path: Path, breakage: tuple[str, str]) -> None:
    old, new = breakage
    text = UNIT.read_text()
    assert old in text
    assert verify_problems(text.replace(old, new), tmp_path), f"{new!r} went unnoticed"


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    require_tool("systemd-analyze", "systemd")
    path = tmp_path / "3gsync-worker.service"
    path.write_text(UNIT.read_text().replace("/opt/3gsync/venv/bin/python3", SYSTEM_PYTHON))
    # The threshold is the exposure score x 10: at most 2.0 of 10 ("OK").
    result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                  "--no-pager", str(path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def ini_shutdown_grace() -> int:
    """ShutdownGrace of the repository's ini when it sets one, else the worker's default."""
    ini = ROOT / "s3_migration_cluster_config.ini"
    parser = configparser.RawConfigParser(inline_comment_prefixes=("#", ";"))
    if ini.exists():
        parser.read(ini, encoding="utf-8")
    return parser.getint("Mode", "ShutdownGrace", fallback=SHUTDOWN_GRACE_DEFAULT_S)


def test_unit_stops_the_way_the_worker_needs() -> None:
    unit = unit_settings(UNIT.read_text())
    grace = max(SHUTDOWN_GRACE_DEFAULT_S, ini_shutdown_grace())
    stop_timeout = seconds(unit["Service.TimeoutStopSec"][-1])
    assert stop_timeout > SHUTDOWN_GRACE_DEFAULT_S
    assert stop_timeout >= grace + 5, "leave the worker time to hand messages back after the grace"
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    assert unit["Service.KillMode"] == ["mixed"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert "2" in unit["Service.RestartPreventExitStatus"][-1].split()
    assert seconds(unit["Service.RestartSec"][-1]) >= 5
    assert int(unit["Unit.StartLimitBurst"][-1]) > 0


def test_unit_runs_unprivileged_and_read_only() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["Service.User"] == ["gsync"]
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")]:
        assert unit[f"Service.{key}"] == [value], key
    assert unit["Service.CapabilityBoundingSet"] == [""]
    assert "PYTHONUNBUFFERED=1" in unit["Service.Environment"][0].split()
    assert unit["Service.StandardOutput"] == ["journal"]
    # The worker writes nothing: no writable path is granted anywhere.
    assert not any(key.startswith("Service.ReadWritePaths") or key.endswith("Directory")
                   and key != "Service.WorkingDirectory" for key in unit)


def test_unit_matches_the_installer_layout() -> None:
    """The paths in ExecStart are the ones install-worker.sh creates."""
    unit = unit_settings(UNIT.read_text())
    installer = (DEPLOY / "install-worker.sh").read_text()
    exec_start = unit["Service.ExecStart"][0].split()
    assert exec_start[0] == "/opt/3gsync/venv/bin/python3"
    assert exec_start[1] == "/opt/3gsync/app/s3_migration_cluster_worker.py"
    assert exec_start[2:] == ["--config", "/etc/3gsync/s3_migration_cluster_config.ini"]
    assert unit["Service.WorkingDirectory"] == ["/opt/3gsync/app"]
    assert "readonly PREFIX=/opt/3gsync\n" in installer
    assert "readonly ETC_DIR=/etc/3gsync\n" in installer
    assert "readonly INI_NAME=s3_migration_cluster_config.ini\n" in installer


# --- the scripts -------------------------------------------------------------------------------

def test_deploy_scripts_exist() -> None:
    names = {path.name for path in SCRIPTS}
    assert {"gce-startup.sh", "ec2-user-data.sh", "install-worker.sh"} <= names
    for name in ("gce-startup.sh", "ec2-user-data.sh"):
        packages = re.search(r"^readonly PACKAGES=\((.*)\)$", (DEPLOY / name).read_text(), re.M)
        assert packages and tuple(packages.group(1).split()) == BOOT_PACKAGES, name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = require_tool("shellcheck", "shellcheck")
    result = run([shellcheck, "--severity=style", "--shell=bash", str(script)])
    assert result.returncode == 0, result.stdout + result.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


# --- the scripts, run for real in a namespace --------------------------------------------------

FAKE_METADATA_SERVER = r'''
"""GCE's metadata server and EC2's IMDSv2, served from a folder tree; logs every request."""
import http.server, json, sys
from pathlib import Path

ROOT = Path(sys.argv[2])
LOG = open(sys.argv[3], "a", buffering=1)
TOKEN = "imds-token-123"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        LOG.write(json.dumps({"method": "PUT", "path": self.path, "ttl": ttl}) + "\n")
        if self.path == "/latest/api/token" and ttl:
            return self.reply(200, TOKEN.encode())
        self.reply(400)

    def do_GET(self):
        LOG.write(json.dumps({"method": "GET", "path": self.path,
                              "flavor": self.headers.get("Metadata-Flavor"),
                              "token": self.headers.get("X-aws-ec2-metadata-token")}) + "\n")
        if self.path.startswith("/computeMetadata/v1/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.reply(403)
            target = ROOT / "gce" / self.path[len("/computeMetadata/v1/"):]
        elif self.path.startswith("/latest/"):
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                return self.reply(401)
            target = ROOT / "ec2" / self.path[len("/latest/"):]
        else:
            return self.reply(404)
        if target.is_dir():
            return self.reply(200, "\n".join(sorted(p.name for p in target.iterdir())).encode())
        if target.is_file():
            return self.reply(200, target.read_bytes())
        self.reply(404)


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

# A stand-in for the worker: it accepts --check-config like the real one and rejects an ini
# whose queue is called "reject-me" with exit code 2.
STUB_WORKER = '''\
import argparse, configparser, sys
parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--check-config", action="store_true")
args = parser.parse_args()
ini = configparser.RawConfigParser()
ini.read(args.config)
if ini.get("Basic", "sqs_queue_name", fallback="") == "reject-me":
    print("3gsync: configuration error: config key sqs_queue_name: rejected", file=sys.stderr)
    sys.exit(2)
'''

# Runs inside `unshare --mount --net --pid`: private /opt, /etc (a copy), /var/log, loopback only,
# and every process it starts ends with it.
NAMESPACE_PRELUDE = r'''
set -euo pipefail
ip link set lo up
mount --make-rprivate /
mount -t tmpfs tmpfs /opt
mount -t tmpfs tmpfs /var/log
cp -a /etc "$SANDBOX/etc"
mount --bind "$SANDBOX/etc" /etc
"$TEST_PYTHON" "$SANDBOX/metadata.py" 8080 "$SANDBOX/metadata" "$SANDBOX/requests.log" \
    </dev/null >"$SANDBOX/metadata-server.log" 2>&1 &
trap 'kill $! 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break
    sleep 0.05
done
'''


def ini_text(job_type: str, queue: str = "s3_migration_file_list", grace: int = 40) -> str:
    return textwrap.dedent(f"""\
        [Basic]
        JobType = {job_type}
        table_queue_name = s3_migration_file_list
        sqs_queue_name = {queue}
        ssm_parameter_credentials = projects/123/secrets/3gsync/versions/1
        Des_bucket_default = my-gcs-bucket
        [Mode]
        ShutdownGrace = {grace}
        MaxThread = 2
        MaxParallelFile = 2
        [Debug]
        ChunkSize = 5
        """)


# What gce-startup.sh and ec2-user-data.sh install when it is missing.
BOOT_PACKAGES = ("ca-certificates", "curl", "git", "python3", "python3-venv", "python3-pip")


class Sandbox:
    """A fake release in a local git repository, a metadata tree and a namespace to run in."""

    def __init__(self, base: Path) -> None:
        for tool in ("unshare", "git", "mount", "ip"):
            require_tool(tool, "util-linux git iproute2")
        assert os.geteuid() == 0, "these tests run the boot scripts as root in a namespace"
        # The boot scripts apt-get what is missing, which cannot work without a network.
        missing = [package for package in BOOT_PACKAGES if "install ok installed" not in run(
            ["dpkg-query", "-W", "-f=${Status}", package]).stdout]
        assert not missing, f"apt-get install {' '.join(missing)} (.ci/run does)"
        self.base = base
        self.repo = base / "repo"
        self.metadata = base / "metadata"
        (base / "metadata.py").write_text(FAKE_METADATA_SERVER)
        (self.repo / "tools").mkdir(parents=True)
        shutil.copytree(DEPLOY, self.repo / "tools" / "deploy")
        (self.repo / "s3_migration_cluster_worker.py").write_text(STUB_WORKER)
        (self.repo / "s3_migration_ignore_list.txt").write_text("# nothing ignored\n")
        (self.repo / "s3_migration_cluster_config.ini").write_text(ini_text("PUT"))
        # No packages, so the virtualenv builds without a network.
        (self.repo / "requirements.txt").write_text("# none for the test\n")
        git = ["git", "-C", str(self.repo), "-c", "user.name=t", "-c", "user.email=t@t"]
        for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "release"]):
            subprocess.run(git + args, check=True)
        self.commit = run(git + ["rev-parse", "HEAD"]).stdout.strip()

    def set_metadata(self, path: str, value: str) -> None:
        target = self.metadata / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value)

    def requests(self) -> list[dict]:
        log = self.base / "requests.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def run(self, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """Runs the shell `script` after the prelude, in a fresh mount+network namespace.

        /opt, /etc and /var/log live only as long as the namespace: each call starts from this
        machine's own state, so a second run of a boot script goes in the same call.
        """
        full_env = {**os.environ, **env, "SANDBOX": str(self.base), "TEST_PYTHON": sys.executable,
                    "DEPLOY": str(self.repo / "tools" / "deploy")}
        return run(["unshare", "--mount", "--net", "--pid", "--fork", "bash", "-c",
                    NAMESPACE_PRELUDE + script], env=full_env)


# Printed by the namespace script after the boot script ran, for the test to check.
REPORT = r'''
report() {
    echo "== $1"
    readlink /opt/3gsync/app; readlink /opt/3gsync/venv
    stat -c '%U:%G %a' /etc/3gsync/s3_migration_cluster_config.ini
    getent passwd gsync | cut -d: -f6,7
    cat /etc/systemd/system/3gsync-worker.service.d/10-deploy.conf
    cmp /etc/systemd/system/3gsync-worker.service "$DEPLOY/3gsync-worker.service" && echo "unit: same"
    /opt/3gsync/venv/bin/python3 -c 'import sys; print("venv:", sys.prefix != sys.base_prefix)'
    echo "== end"
}
'''


def section(output: str, name: str) -> str:
    match = re.search(rf"^== {name}\n(.*?)(?=^== |\Z)", output, re.S | re.M)
    assert match, f"no report {name!r} in:\n{output}"
    return match.group(1)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def test_gce_startup_installs_and_is_idempotent(sandbox: Sandbox) -> None:
    attributes = "gce/instance/attributes/"
    sandbox.set_metadata(attributes + "3gsync-git-url", f"file://{sandbox.repo}")
    sandbox.set_metadata(attributes + "3gsync-config", ini_text("GET", grace=40))
    sandbox.set_metadata(attributes + "3gsync-ignore-list", "*.tmp\n")
    # A project attribute applies when the instance has none of that name.
    sandbox.set_metadata("gce/project/attributes/3gsync-env", "AWS_MAX_ATTEMPTS=7\n")
    script = REPORT + r'''
    startup=$DEPLOY/gce-startup.sh
    bash "$startup" 2>"$SANDBOX/first.log"; report first
    cat /etc/3gsync/s3_migration_cluster_config.ini; cat /etc/3gsync/worker.env
    cat /opt/3gsync/app/s3_migration_ignore_list.txt
    bash "$startup" 2>"$SANDBOX/second.log"; report second
    # Systemd itself checks the unit as installed, drop-in and real paths included.
    rc=0
    systemd-analyze verify --man=no /etc/systemd/system/3gsync-worker.service \
        >"$SANDBOX/verify.log" 2>&1 || rc=$?
    echo "verify: rc $rc"
    # A rejected ini: the installer stops and the deployed one stays.
    sed -i 's/^sqs_queue_name = .*/sqs_queue_name = reject-me/' \
        "$SANDBOX/metadata/gce/instance/attributes/3gsync-config"
    if bash "$startup" 2>"$SANDBOX/third.log"; then echo "third: rc 0"; else echo "third: failed"; fi
    report third
    grep -c '^sqs_queue_name = s3_migration_file_list' /etc/3gsync/s3_migration_cluster_config.ini
    '''
    result = sandbox.run(script, {"GCE_METADATA_HOST": "127.0.0.1:8080"})
    logs = {name: (sandbox.base / f"{name}.log").read_text()
            for name in ("first", "second", "third") if (sandbox.base / f"{name}.log").exists()}
    assert result.returncode == 0, result.stdout + result.stderr + str(logs)
    first, second, third = (section(result.stdout, name) for name in ("first", "second", "third"))

    release = f"/opt/3gsync/releases/git-{sandbox.commit[:12]}"
    assert first.splitlines()[0] == release
    assert first.splitlines()[1].startswith("/opt/3gsync/venvs/py3.")
    assert "root:gsync 640" in first
    assert "/nonexistent:/usr/sbin/nologin" in first
    assert "TimeoutStopSec=50s" in first           # ShutdownGrace 40 + 10
    assert "unit: same" in first and "venv: True" in first
    assert "JobType = GET" in result.stdout
    assert "AWS_MAX_ATTEMPTS=7" in result.stdout
    assert "*.tmp" in result.stdout
    assert "building virtualenv" in logs["first"]
    assert "systemd is not running here" in logs["first"]

    # The second boot: same release, same venv, nothing rebuilt.
    assert second == first
    assert "building virtualenv" not in logs["second"]
    assert "verify: rc 0" in result.stdout
    assert (sandbox.base / "verify.log").read_text() == ""

    assert "third: failed" in result.stdout
    assert "rejected" in logs["third"]
    assert third == first
    assert result.stdout.rstrip().endswith("1")    # the old ini is still installed

    gets = [r for r in sandbox.requests() if r["method"] == "GET"]
    assert gets and all(r["flavor"] == "Google" for r in gets)


def test_gce_startup_takes_a_github_style_tarball(sandbox: Sandbox) -> None:
    """A .tar.gz with the repository inside one folder, fetched through the AWS CLI (a stub)."""
    tarball = sandbox.base / "code.tar.gz"
    subprocess.run(["git", "-C", str(sandbox.repo), "archive", "--format=tar.gz",
                    "--prefix=3gsync-main/", "-o", str(tarball), "HEAD"], check=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:12]
    stub = sandbox.base / "bin" / "aws"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\n[ "$1 $2 $4" = "s3 cp s3://code/3gsync.tar.gz" ] &&\n'
                    '    cp "$SANDBOX/code.tar.gz" "$5"\n')
    stub.chmod(0o755)
    attributes = "gce/instance/attributes/"
    sandbox.set_metadata(attributes + "3gsync-tarball-url", "s3://code/3gsync.tar.gz")
    sandbox.set_metadata(attributes + "3gsync-config", ini_text("GET"))
    script = 'bash "$DEPLOY/gce-startup.sh"; readlink /opt/3gsync/app; ls /opt/3gsync/app'
    result = sandbox.run(script, {"GCE_METADATA_HOST": "127.0.0.1:8080",
                                  "PATH": f"{stub.parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"/opt/3gsync/releases/tar-{digest}"
    assert "s3_migration_cluster_worker.py" in lines and "tools" in lines


def test_gce_startup_refuses_a_put_mode_ini(sandbox: Sandbox) -> None:
    attributes = "gce/instance/attributes/"
    sandbox.set_metadata(attributes + "3gsync-git-url", f"file://{sandbox.repo}")
    sandbox.set_metadata(attributes + "3gsync-config", ini_text("PUT"))
    script = 'bash "$DEPLOY/gce-startup.sh"; test ! -e /etc/3gsync/s3_migration_cluster_config.ini'
    result = sandbox.run(script, {"GCE_METADATA_HOST": "127.0.0.1:8080"})
    assert result.returncode != 0
    assert "JobType = PUT but this machine runs GET mode" in result.stderr
    assert "building virtualenv" not in result.stderr, "the ini is checked before anything changes"


def test_gce_startup_without_a_code_source_says_so(sandbox: Sandbox) -> None:
    result = sandbox.run('bash "$DEPLOY/gce-startup.sh"', {"GCE_METADATA_HOST": "127.0.0.1:8080"})
    assert result.returncode != 0
    assert "3gsync-git-url or 3gsync-tarball-url" in result.stderr


def test_ec2_user_data_installs_put_mode_from_tags(sandbox: Sandbox) -> None:
    sandbox.set_metadata("ec2/meta-data/placement/region", "eu-central-1")
    # The code URL comes from an instance tag; the ini from the release itself (JobType = PUT).
    sandbox.set_metadata("ec2/meta-data/tags/instance/3gsync-git-url", f"file://{sandbox.repo}")
    sandbox.set_metadata("ec2/meta-data/tags/instance/Name", "3gsync-worker")
    script = REPORT + r'''
    bash "$DEPLOY/ec2-user-data.sh" 2>"$SANDBOX/first.log"; report first
    bash "$DEPLOY/ec2-user-data.sh" 2>"$SANDBOX/second.log"; report second
    '''
    result = sandbox.run(script, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8080/"})
    logs = {name: (sandbox.base / f"{name}.log").read_text()
            for name in ("first", "second") if (sandbox.base / f"{name}.log").exists()}
    assert result.returncode == 0, result.stdout + result.stderr + str(logs)
    first, second = section(result.stdout, "first"), section(result.stdout, "second")
    assert first.splitlines()[0] == f"/opt/3gsync/releases/git-{sandbox.commit[:12]}"
    assert "TimeoutStopSec=50s" in first and "unit: same" in first and "root:gsync 640" in first
    assert second == first
    assert "building virtualenv" not in logs["second"]
    assert "setting GSYNC_GIT_URL from instance tag 3gsync-git-url" in logs["first"]

    requests = sandbox.requests()
    puts = [r for r in requests if r["method"] == "PUT"]
    gets = [r for r in requests if r["method"] == "GET"]
    assert puts and all(r["path"] == "/latest/api/token" and r["ttl"] for r in puts)
    assert gets and all(r["token"] == "imds-token-123" for r in gets), "every read uses IMDSv2"


def test_ec2_user_data_refuses_a_get_mode_ini(sandbox: Sandbox) -> None:
    sandbox.set_metadata("ec2/meta-data/placement/region", "eu-central-1")
    (sandbox.repo / "s3_migration_cluster_config.ini").write_text(ini_text("GET"))
    git = ["git", "-C", str(sandbox.repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["commit", "-q", "-am", "GET ini"], check=True)
    script = r'''
    sed "s#^GSYNC_GIT_URL=\"\"#GSYNC_GIT_URL=\"file://$SANDBOX/repo\"#" "$DEPLOY/ec2-user-data.sh" \
        >"$SANDBOX/user-data.sh"
    bash "$SANDBOX/user-data.sh"
    '''
    result = sandbox.run(script, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:8080"})
    assert result.returncode != 0
    assert "JobType = GET but this machine runs PUT mode" in result.stderr
    assert "building virtualenv" not in result.stderr


# --- SETUP.md ----------------------------------------------------------------------------------

def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_setup_guide_shell_blocks_pass_shellcheck(tmp_path: Path) -> None:
    blocks = fenced_blocks(SETUP.read_text(), "bash")
    assert len(blocks) >= 10
    script = tmp_path / "setup.sh"
    script.write_text("#!/usr/bin/env bash\n" + "\n".join(blocks))
    shellcheck = require_tool("shellcheck", "shellcheck")
    result = run([shellcheck, "--shell=bash", str(script)])
    assert result.returncode == 0, result.stdout


# Stand-ins for the clouds' CLIs: they log each call and print what the guide reads back.
CLI_STUBS = r'''
aws() {
    printf 'aws %s\n' "$*" >>calls.log
    case "$1 $2" in
    "sqs get-queue-url") echo "https://sqs.example/000000000000/queue" ;;
    "ec2 describe-images") echo "ami-0123456789abcdef0" ;;
    esac
}
gcloud() {
    printf 'gcloud %s\n' "$*" >>calls.log
    if [[ " $* " == *" --data-file=- "* ]]; then cat >"gcloud-stdin-$((++stdin_count)).json"; fi
    case "$1 $2" in
    "projects describe") echo 123456789012 ;;
    esac
}
stdin_count=0
set -euo pipefail
'''


def test_setup_guide_commands_run_and_write_valid_json(tmp_path: Path) -> None:
    """Every bash block, top to bottom, with placeholders filled and the CLIs stubbed."""
    text = SETUP.read_text()
    script = "\n".join(fenced_blocks(text, "bash"))
    for placeholder in sorted(set(re.findall(r"<[A-Z0-9_]+>", script))):
        script = script.replace(placeholder, placeholder.strip("<>").lower().replace("_", "-"))
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    (tmp_path / "worker-get.ini").write_text(ini_text("GET"))
    result = run(["bash", "-c", CLI_STUBS + script], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    calls = (tmp_path / "calls.log").read_text()
    for command in ["aws sqs create-queue --queue-name s3_migration_file_list_deadletter",
                    "aws sqs set-queue-attributes", "aws s3api put-bucket-notification-configuration",
                    "aws dynamodb update-time-to-live",
                    "aws iam create-policy --policy-name 3gsync-worker ",
                    "aws ssm put-parameter", "aws ec2 create-launch-template",
                    "gcloud secrets create 3gsync-credentials", "gcloud storage hmac create",
                    "gcloud compute instance-templates create 3gsync-worker-v2",
                    "gcloud compute instance-groups managed set-autoscaling"]:
        assert command in calls, command

    documents = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert {"queue-attributes.json", "sqs-policy.json", "notification.json", "iam-worker-policy.json",
            "iam-operator-policy.json", "launch-template.json", "gcloud-stdin-1.json"} <= set(documents)
    redrive = json.loads(documents["queue-attributes.json"]["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"].endswith(":s3_migration_file_list_deadletter")
    assert int(redrive["maxReceiveCount"]) > 1
    policy = json.loads(documents["sqs-policy-attribute.json"]["Policy"])
    assert policy["Statement"][0]["Principal"] == {"Service": "s3.amazonaws.com"}
    secret = documents["gcloud-stdin-1.json"]
    assert set(secret) == {"source", "destination"}
    for side in secret.values():
        assert set(side) == {"aws_access_key_id", "aws_secret_access_key", "region"}
    parameter = re.search(r"aws ssm put-parameter .*--value (\{.*\})$", calls, re.M)
    assert parameter and set(json.loads(parameter.group(1))) == {
        "aws_access_key_id", "aws_secret_access_key", "region"}
    template = documents["launch-template.json"]
    assert base64.b64decode(template["UserData"]) == (DEPLOY / "ec2-user-data.sh").read_bytes()
    assert template["MetadataOptions"]["HttpTokens"] == "required"
    worker_actions = {action for statement in documents["iam-worker-policy.json"]["Statement"]
                      for action in ([statement["Action"]] if isinstance(statement["Action"], str)
                                     else statement["Action"])}
    assert worker_actions == {
        "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "sqs:GetQueueUrl",
        "sqs:GetQueueAttributes", "sqs:ReceiveMessage", "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility", "dynamodb:DescribeTable", "dynamodb:GetItem",
        "dynamodb:PutItem", "dynamodb:UpdateItem"}
    assert not any("*" in json.dumps(s["Resource"]).replace("/*", "")
                   for s in documents["iam-worker-policy.json"]["Statement"])


def test_setup_guide_ini_sets_the_keys_each_mode_needs() -> None:
    blocks = fenced_blocks(SETUP.read_text(), "ini")
    assert blocks
    parser = configparser.RawConfigParser()
    parser.read_string(blocks[0])
    assert parser.get("Basic", "JobType") == "GET"
    assert parser.get("Basic", "ssm_parameter_credentials").startswith("projects/")
    assert parser.get("Debug", "MetricsPort") == "9101"


def test_setup_guide_covers_both_clouds() -> None:
    text = SETUP.read_text()
    for needle in ["aws sqs create-queue", "RedrivePolicy", "maxReceiveCount",
                   "aws dynamodb create-table", "update-time-to-live", "endTime",
                   "put-bucket-notification-configuration", "aws iam create-policy",
                   "aws ssm put-parameter", "SecureString",
                   "gcloud storage buckets create", "gcloud storage hmac create",
                   "gcloud secrets create", "roles/secretmanager.secretAccessor",
                   "gcloud compute instance-templates create", "startup-script=",
                   "gcloud compute instance-groups managed create",
                   "set-autoscaling", "3gsync-config", "health-check"]:
        assert needle in text, needle


# --- diagrams ----------------------------------------------------------------------------------

def test_architecture_diagrams_are_current() -> None:
    require_tool("dot", "graphviz")
    result = run([sys.executable, str(ROOT / "tools" / "draw_diagrams.py"), "--check"])
    assert result.returncode == 0, result.stdout + result.stderr
    for mode in ("get", "put"):
        png = ROOT / "img" / f"architecture-{mode}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 20_000


def test_diagram_check_notices_a_stale_diagram(tmp_path: Path) -> None:
    require_tool("dot", "graphviz")
    draw = [sys.executable, str(ROOT / "tools" / "draw_diagrams.py"), "--out", str(tmp_path)]
    assert run(draw).returncode == 0
    assert run(draw + ["--check"]).returncode == 0
    dot = tmp_path / "architecture-put.dot"
    dot.write_text(dot.read_text().replace("SQS", "SNS", 1))
    result = run(draw + ["--check"])
    assert result.returncode == 1
    assert "architecture-put" in result.stdout + result.stderr
