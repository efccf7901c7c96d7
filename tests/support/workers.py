"""Run a 3GSync worker against a LocalCloud: in this process (real threads, real HTTP) or as a
separate process whose log lines can be awaited."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import s3_migration_cluster_worker as entry
import s3_migration_lib as lib

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "s3_migration_cluster_worker.py"


def run_until_empty(config: Path, timeout_s: float = 60) -> lib.Worker:
    """Build a worker from ``config`` (environment already pointing at the cloud) and run it
    until the queue is empty. Fails if the watchdog had to stop it."""
    settings = lib.Settings.from_ini(config)
    worker = entry.build_worker(settings, until_empty=True)
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        worker.request_stop()

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.start()
    try:
        assert worker.run() == lib.EXIT_OK
    finally:
        watchdog.cancel()
    assert not timed_out.is_set(), f"worker did not empty the queue within {timeout_s}s"
    return worker


class WorkerProcess:
    """``s3_migration_cluster_worker.py`` as a child process; its log lines can be awaited."""

    def __init__(self, config: Path, env: dict[str, str], *args: str):
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "--config", str(config), *args], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
            errors="replace", cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout_s: float = 30) -> str:
        """The first log line matching ``pattern``; AssertionError after ``timeout_s``."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.lines if regex.search(line)), None)

        with self._changed:
            ok = self._changed.wait_for(lambda: found() or self.process.poll() is not None,
                                        timeout=timeout_s)
            line = found()
        assert line, f"no log line matching {pattern!r} (exited={self.process.poll()}, ok={ok}):\n" \
                     + "\n".join(self.lines[-30:])
        return line

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs (test clean-up)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=5)

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def set_cloud_environment(monkeypatch, cloud) -> None:
    """Point this process's AWS settings at ``cloud`` (and nothing else)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in cloud.env().items():
        monkeypatch.setenv(name, value)
