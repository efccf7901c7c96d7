"""Shared fixtures: local moto servers, a fresh LocalCloud per test, configs and proxies.

Why the servers are session-scoped (measured on this machine, moto 5.2):

* starting one moto server takes about 0.8 s (two side by side about 0.95 s) and stopping it
  0.3-0.5 s, so a fresh pair per test would cost ~1.5 s each;
* ``POST /moto-api/reset`` empties a server in ~3 ms, and provisioning a LocalCloud on running
  servers (buckets, queues, table, parameters, notification) takes ~0.15 s.

So ``moto_servers`` starts the ``aws`` and ``dest`` servers once per session, and ``cloud``
resets both and provisions them again for every test: each test sees fresh, default-named
resources and nothing left over from an earlier test (the first test pays ~1.8 s once while
moto imports its services). A test must stop every process it started before it ends (the
servers are shared). A test that needs servers of its own (to kill one, say) uses
``LocalCloud()`` directly.

Options for one test's cloud: ``@pytest.mark.cloud(versioned=True, max_receive_count=2)``
(any ``LocalCloud`` keyword).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.proxy import FaultProxy  # noqa: E402
from tools.local_cloud import LocalCloud, ServerPair, start_server_pair, stop_servers  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cloud(**kwargs): LocalCloud options for the cloud fixture")


@pytest.fixture(scope="session")
def moto_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPair]:
    """The ``aws`` and ``dest`` moto servers, shared by the whole session (logs in a tmp dir)."""
    pair = start_server_pair(tmp_path_factory.mktemp("moto-logs"))
    try:
        yield pair
    finally:
        stop_servers(pair)


@pytest.fixture
def cloud(moto_servers: ServerPair, request: pytest.FixtureRequest) -> Iterator[LocalCloud]:
    """A freshly reset and provisioned LocalCloud on the shared servers."""
    marker = request.node.get_closest_marker("cloud")
    options = marker.kwargs if marker else {}
    with LocalCloud(servers=moto_servers, **options) as local_cloud:
        yield local_cloud


@pytest.fixture
def tmp_config(cloud: LocalCloud, tmp_path: Path) -> Callable[..., Path]:
    """``tmp_config(**overrides) -> Path``: a worker ini for ``cloud``, a new file per call."""
    numbers = itertools.count(1)

    def write(**overrides: object) -> Path:
        return cloud.write_config(tmp_path / f"worker-{next(numbers)}.ini", **overrides)

    return write


@pytest.fixture
def dest_proxy(cloud: LocalCloud) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the destination server (use its ``endpoint_url`` as the
    worker's DestEndPointURL via ``tmp_config(DestEndPointURL=dest_proxy.endpoint_url)``)."""
    with FaultProxy(cloud.dest_url) as proxy:
        yield proxy
