"""Fixtures of the client and CLI tests: one real ``metergate serve`` per module, a client on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metergate_client import Client
from tests.cli.server import MeterServer
from tests.conftest import ADMIN_KEY

EVENT_RULES = [
    {"id": "mini", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD", "per_units": "1000000",
     "rates": {"input_tokens": "0.30", "cached_input_tokens": "0.15", "output_tokens": "1.20"}},
    {"id": "calls", "match": {"type": "api.call"}, "asset": "CALLS", "rates": {"quantity": "1"}},
    {"id": "gpu", "match": {"type": "gpu.job"}, "asset": "GPU_SECONDS", "rates": {"gpu_seconds": "1"}},
]


def publish_rules(client: Client) -> None:
    draft = client.create_price_version(EVENT_RULES, note="tests")
    client.publish_price_version(draft["id"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeterServer]:
    s = MeterServer(tmp_path_factory.mktemp("metergate"))
    s.start()
    with Client(s.url, ADMIN_KEY) as client:
        publish_rules(client)
    yield s
    s.stop()


@pytest.fixture
def client(server: MeterServer) -> Iterator[Client]:
    with Client(server.url, ADMIN_KEY) as c:
        yield c
