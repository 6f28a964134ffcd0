"""The observing middleware counts a refusal by its code: 4xx as a denial, a 503 (storage unreachable or full)
as unavailable, so an alert can tell "the caller is wrong" from "the wallet store is down".

Method: the middleware itself around handlers that raise metergate's own errors, on aiohttp's mocked request;
the registry is read back through ``prometheus_client``'s sample API.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from metergate.errors import MetergateError, PaymentRequired, ServiceUnavailable
from metergate.observability.metrics import Metrics
from metergate.observability.middleware import observe_middleware
from metergate.wallet.redis.store import WalletUnavailable


@pytest.mark.parametrize("error, denied, unavailable", [
    (PaymentRequired("no funds", code="insufficient_funds"), "insufficient_funds", None),
    (ServiceUnavailable("db down"), None, "storage_unavailable"),
    (ServiceUnavailable("ledger behind", code="ledger_backlog"), None, "ledger_backlog"),
    (WalletUnavailable("redis down", code="wallet_unavailable"), None, "wallet_unavailable"),
    (MetergateError("bug"), None, None),  # a 500 is neither: it is in the logs, with its traceback
])
async def test_refusals_are_counted_by_code_in_their_own_family(
        error: MetergateError, denied: str | None, unavailable: str | None) -> None:
    metrics = Metrics()

    async def handler(_request: web.Request) -> web.StreamResponse:
        raise error

    with pytest.raises(MetergateError):
        await observe_middleware(metrics)(make_mocked_request("POST", "/openai/v1/chat/completions"), handler)
    registry = metrics.registry
    for name, reason in (("metergate_denials_total", denied), ("metergate_unavailable_total", unavailable)):
        counted = {s.labels["reason"]: s.value for family in registry.collect() for s in family.samples
                   if s.name == name}
        assert counted == ({reason: 1.0} if reason else {})
