"""The tools as operators run them: ``python3 tools/<tool>.py`` in a child process (the repo
root found from the script's own path), --help, one real run, and a bad config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("jobsender", "triggers", "inventory_to_sqs", "clean_uploads", "status")


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd="/", env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_every_tool_has_help():
    children = {tool: start(str(ROOT / "tools" / f"{tool}.py"), "--help") for tool in TOOLS}
    for tool, child in children.items():
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.startswith(f"usage: {tool} ")
        assert "--config" in out and "exit status: 0 done" in out


@pytest.mark.cloud(notify=False)
def test_tools_run_as_scripts(cloud, tmp_config, tmp_path):
    cloud.clients.src_s3.put_object(Bucket=cloud.src_bucket, Key="a b.txt", Body=b"abc")
    env = cloud.subprocess_env()
    config = str(tmp_config())
    sender = start(str(ROOT / "tools" / "jobsender.py"), "--config", config, "--dry-run", "-q",
                   env=env)
    report = start(str(ROOT / "tools" / "status.py"), "--config", config, "--json", env=env)
    broken = start(str(ROOT / "tools" / "clean_uploads.py"), "--config",
                   str(tmp_path / "missing.ini"), env=env)
    out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err
    assert json.loads(out) == {"Src_bucket": "src-bucket", "Src_key": "a b.txt", "Size": 3,
                               "Des_bucket": "dest-bucket", "Des_key": "a b.txt",
                               "versionId": "null"}
    out, err = report.communicate(timeout=60)
    assert report.returncode == 0, err
    assert json.loads(out)["table"]["records"] == 0
    out, err = broken.communicate(timeout=60)
    assert broken.returncode == 2
    assert err == (f"clean_uploads: error: configuration: cannot read config file "
                   f"{tmp_path / 'missing.ini'}: No such file or directory\n")
