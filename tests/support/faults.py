"""Faults and bookkeeping for the reliability and load tests, on top of ``FaultProxy``.

* ``Gate``: lets the first ``after`` matching requests through, then holds every further one
  inside the proxy until the test opens the gate; a test waits for "n requests held" on a
  condition variable instead of sleeping, so a kill or a signal lands at a known point.
* ``Mix``: a seeded random fault that picks one of several actions per matching request.
* ``destination_writes``: who wrote which key at the destination, from the proxy's records.
* ``JobLog``: the worker's structured ``job start`` / ``job end`` lines as dicts.
* ``drain_bodies`` and ``send_bodies``: a queue's message bodies out, many bodies in (batches).
"""
from __future__ import annotations

import collections
import json
import re
import threading
import time
import urllib.parse
from typing import Callable, Iterable, Optional, Sequence

from tests.support.proxy import Action, RecordedRequest, Reset

Match = Callable[[RecordedRequest], bool]


def part_upload(request: RecordedRequest) -> bool:
    """UploadPart: ``PUT ...?partNumber=N&uploadId=...``."""
    return request.method == "PUT" and "partNumber" in request.query


def write_request(request: RecordedRequest) -> bool:
    """Any request that changes the destination (PUT, POST, DELETE)."""
    return request.method in ("PUT", "POST", "DELETE")


class Gate:
    """Holds matching requests (after the first ``after``) until ``open()``; then answers the
    held ones, and every later one, with ``then`` (default: a reset, so nothing reaches the
    server once the gate has been used to freeze a copy).

    ``wait_held(n)`` returns once ``n`` requests are being held (bounded by ``timeout_s``).
    A held request waits at most ``max_hold_s`` (a safety bound: the proxy must stop).
    """

    def __init__(self, match: Match = part_upload, after: int = 0,
                 then: Optional[Action] = Reset(), max_hold_s: float = 120.0) -> None:
        self.match = match
        self.after = after
        self.then = then
        self.max_hold_s = max_hold_s
        self.passed = 0
        self.held = 0
        self.held_paths: list[str] = []
        self._open = False
        self._changed = threading.Condition()

    def __call__(self, request: RecordedRequest) -> Optional[Action]:
        if not self.match(request):
            return None
        with self._changed:
            if self._open:
                return self.then
            if self.passed < self.after:
                self.passed += 1
                return None
            self.held += 1
            self.held_paths.append(request.path)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._open, timeout=self.max_hold_s)
            self.held -= 1
            return self.then

    def wait_held(self, n: int, timeout_s: float = 30.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.held >= n, timeout=timeout_s):
                raise AssertionError(f"gate: {self.held} requests held after {timeout_s}s, "
                                     f"expected {n} (passed {self.passed})")

    def open(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()


class Mix:
    """Each matching request gets one of ``choices`` (probability, action) or passes; seeded.

    ``applied`` counts the actions taken by type name.
    """

    def __init__(self, choices: Sequence[tuple[float, Action]], match: Match = write_request,
                 seed: int = 0) -> None:
        if sum(p for p, _ in choices) > 1.0:
            raise ValueError("probabilities add up to more than 1")
        import random
        self.choices = list(choices)
        self.match = match
        self.applied: collections.Counter[str] = collections.Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> Optional[Action]:
        if not self.match(request):
            return None
        with self._lock:
            roll = self._random.random()
            for probability, action in self.choices:
                if roll < probability:
                    self.applied[type(action).__name__] += 1
                    return action
                roll -= probability
        return None


def either(*faults: Callable[[RecordedRequest], Optional[Action]]):
    """The first fault (in order) that returns an action decides."""
    def fault(request: RecordedRequest) -> Optional[Action]:
        for one in faults:
            action = one(request)
            if action is not None:
                return action
        return None
    return fault


def object_key(request: RecordedRequest, bucket: str) -> Optional[str]:
    """The object key a path-style request addresses in ``bucket``, or None."""
    prefix = f"/{bucket}/"
    path = request.url_path
    return urllib.parse.unquote(path[len(prefix):]) if path.startswith(prefix) else None


def destination_writes(requests: Iterable[RecordedRequest], bucket: str) -> dict[str, collections.Counter]:
    """Per key: how many PutObject, CreateMultipartUpload, UploadPart and Complete requests
    reached the proxy without a fault (a faulted request never reached the server)."""
    writes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for request in requests:
        key = object_key(request, bucket)
        if key is None or request.fault in ("Respond", "Reset"):
            continue
        query = request.query
        if request.method == "PUT" and "partNumber" in query:
            writes[key]["part"] += 1
        elif request.method == "PUT":
            writes[key]["put"] += 1
        elif request.method == "POST" and "uploads" in query:
            writes[key]["create"] += 1
        elif request.method == "POST" and "uploadId" in query:
            writes[key]["complete"] += 1
    return writes


_FIELD = re.compile(r"(\S+?)=(\S*)")


class JobLog:
    """``job start``/``job end`` lines of one or more workers' output, as dicts of fields."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.starts: list[dict[str, str]] = []
        self.ends: list[dict[str, str]] = []
        for line in lines:
            for marker, into in ((" job start ", self.starts), (" job end ", self.ends)):
                if marker in line:
                    into.append(self._fields(line.split(marker, 1)[1]))

    @staticmethod
    def _fields(text: str) -> dict[str, str]:
        # key=... may hold spaces; it is always first and size= always follows it.
        key, _, rest = text.partition(" size=")
        fields = dict(_FIELD.findall("size=" + rest))
        fields["key"] = key.removeprefix("key=")
        return fields

    def starts_by_key(self) -> collections.Counter:
        return collections.Counter(fields["key"] for fields in self.starts)

    def outcomes(self) -> collections.Counter:
        return collections.Counter(fields.get("outcome", "?") for fields in self.ends)


def worker_counts(lines: Iterable[str]) -> collections.Counter:
    """The ``worker stopped: copied=N, ...`` totals of a worker's output."""
    counts: collections.Counter = collections.Counter()
    for line in lines:
        if "worker stopped: " in line:
            text = line.split("worker stopped: ", 1)[1]
            for item in text.split(", "):
                name, _, value = item.partition("=")
                if value.isdigit():
                    counts[name] += int(value)
    return counts


def send_bodies(sqs, queue_url: str, bodies: Sequence[str | dict]) -> list[str]:
    """Send every body with SendMessageBatch (10 a call, failed entries resent); message ids."""
    ids: list[str] = []
    texts = [b if isinstance(b, str) else json.dumps(b) for b in bodies]
    for start in range(0, len(texts), 10):
        entries = {str(i): text for i, text in enumerate(texts[start:start + 10])}
        for _ in range(5):
            response = sqs.send_message_batch(QueueUrl=queue_url, Entries=[
                {"Id": i, "MessageBody": text} for i, text in entries.items()])
            ids += [ok["MessageId"] for ok in response.get("Successful", [])]
            entries = {f["Id"]: entries[f["Id"]] for f in response.get("Failed", [])}
            if not entries:
                break
        else:
            raise AssertionError(f"SendMessageBatch kept failing for {sorted(entries)}")
    return ids


def drain_bodies(sqs, queue_url: str, expected: int, timeout_s: float = 10.0) -> list[str]:
    """Receive (and delete) messages until ``expected`` bodies were seen or time is up."""
    bodies: list[str] = []
    deadline = time.monotonic() + timeout_s
    for _ in range(1000):
        if len(bodies) >= expected or time.monotonic() > deadline:
            break
        response = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1, VisibilityTimeout=30)
        for message in response.get("Messages", []):
            bodies.append(message["Body"])
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return bodies
