"""Price versions through the admin API and the proxy: drafts are validated, publishing is once and for good, a
request is priced by the version in force when it started (driven with the official ``openai`` SDK against the
mock upstream), modes are isolated, and a second process on the same database picks a version up without a
restart. Expected prices are recomputed here with ``Decimal`` and half-up rounding."""

from __future__ import annotations

import asyncio
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import DEFAULT_PRICING, LIVE_ADMIN_KEY, Gateway, Upstream, start_gateway
from tests.proxy.test_openai_sdk import MESSAGES, expected_price, record_by_id

NEW_MINI = {"id": "mini-v2", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD",
            "per_units": "1000000", "event_fee": "0.0005", "rates": {"input_tokens": "7", "output_tokens": "11"}}


def micros(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def new_price(input_tokens: int, output_tokens: int) -> int:
    """NEW_MINI's price in micro-dollars: $/M tokens is micro-dollars per token; the fee is $0.0005 = 500."""
    return micros(Decimal(input_tokens * 7 + output_tokens * 11) + 500)


async def draft(gateway: Gateway, rules: list[dict[str, Any]], admin: httpx.AsyncClient | None = None) -> str:
    r = await (admin or gateway.admin).post("/price-versions", json={"rules": rules, "note": "test"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    assert body["state"] == "draft"
    return str(body["id"])


async def publish(gateway: Gateway, version_id: str, effective_at_ms: int | None = None) -> dict[str, Any]:
    body = {} if effective_at_ms is None else {"effective_at": effective_at_ms}
    r = await gateway.admin.post(f"/price-versions/{version_id}/publish", json=body)
    assert r.status_code == 200, r.text
    published: dict[str, Any] = r.json()
    return published


# ------------------------------------------------------------------------------------------ admin API


@pytest.mark.parametrize(("rules", "code", "param"), [
    ([{"id": "a", "asset": "USD", "match": {"model": "x"}}, {"id": "b", "asset": "USD", "match": {"feature": "y"}}],
     "ambiguous_rules", "rules[1].match"),
    ([{"id": "a", "asset": "EUR"}], "unknown_asset", "rules[0].asset"),
    ([{"id": "a", "asset": "USD", "rates": {"output_tokens": "-1"}}], "negative_rate", "rules[0].rates.output_tokens"),
    ([{"id": "a", "asset": "USD", "tiers": [{"quantity": "q", "mode": "graduated",
                                             "steps": [{"up_to": "5", "rate": "1"}]}]}],
     "invalid_tiers", "rules[0].tiers[0].steps[0].up_to"),
    ("not a list", "invalid_price_rules", "rules"),
])
async def test_invalid_drafts_are_refused_and_nothing_is_stored(gateway: Gateway, rules: Any, code: str,
                                                                 param: str) -> None:
    for path in ("/price-versions", "/price-versions/validate"):
        r = await gateway.admin.post(path, json={"rules": rules})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["code"], error["param"]) == (code, param)
    r = await gateway.admin.get("/price-versions")
    assert r.status_code == 200 and r.json()["data"] == []


async def test_draft_publish_list_get(gateway: Gateway) -> None:
    r = await gateway.admin.post("/price-versions/validate", json={"rules": [NEW_MINI]})
    assert r.status_code == 200 and r.json()["valid"] is True
    version_id = await draft(gateway, [NEW_MINI])
    r = await gateway.admin.get(f"/price-versions/{version_id}")
    assert r.status_code == 200
    assert r.json()["rules"][0]["rates"] == {"input_tokens": "7", "output_tokens": "11"}
    listed = (await gateway.admin.get("/price-versions")).json()
    assert [v["id"] for v in listed["data"]] == [version_id]
    assert listed["in_force"]["id"] == "config"  # a draft prices nothing
    config = (await gateway.admin.get("/price-versions/config")).json()
    assert {rule["match"].get("model") for rule in config["rules"]} == set(DEFAULT_PRICING["models"])  # type: ignore[arg-type]

    past = int(time.time() * 1000) - 60_000
    r = await gateway.admin.post(f"/price-versions/{version_id}/publish", json={"effective_at": past})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_effective_at"
    effective = int(time.time() * 1000) + 60_000
    published = await publish(gateway, version_id, effective)
    assert (published["state"], published["effective_at_ms"]) == ("published", effective)
    assert await publish(gateway, version_id, effective) == published  # again: the same, unchanged
    assert await publish(gateway, version_id) == published
    r = await gateway.admin.post(f"/price-versions/{version_id}/publish", json={"effective_at": effective + 1})
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_published"
    assert (await gateway.admin.get("/price-versions")).json()["in_force"]["id"] == "config"  # not yet

    # another mode sees none of it
    async with httpx.AsyncClient(base_url=gateway.admin.base_url,
                                 headers={"Authorization": f"Bearer {LIVE_ADMIN_KEY}"}) as live:
        assert (await live.get(f"/price-versions/{version_id}")).status_code == 404
        assert (await live.get("/price-versions")).json()["data"] == []
        assert (await live.post(f"/price-versions/{version_id}/publish", json={})).status_code == 404


# ------------------------------------------------------------------------------------------ through the proxy


async def test_a_request_is_priced_by_the_version_in_force_when_it_started(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=10_000_000)
    version_id = await draft(gateway, [NEW_MINI])
    effective = int(time.time() * 1000) + 1000
    await publish(gateway, version_id, effective)
    client = gateway.openai()

    # Started before effective_at, answered 2 s later (after it): the configuration's price.
    slow = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=20, extra_headers={"X-Mock-Behavior": "slow:2"})
    assert int(time.time() * 1000) > effective
    # Started after: the new version's.
    fast = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                   max_tokens=20)
    records = await gateway.usage()
    for raw, version, expected in ((slow, "config", expected_price), (fast, version_id, None)):
        usage = raw.parse().usage
        assert usage is not None
        record = record_by_id(records, raw.headers["X-Metergate-Request-Id"])
        assert record["detail"]["price"]["version"] == version
        want = (expected_price("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens) if expected
                else new_price(usage.prompt_tokens, usage.completion_tokens))
        assert record["price_amount"] == want and record["charged_amount"] == want
    # The new version prices only gpt-4o-mini: other models are now refused, as unpriced models always were.
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert refused.value.code == "unknown_model"
    assert await gateway.store.audit() == []


async def test_versions_are_per_mode(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=10_000_000)
    await gateway.customer("acme", funds=10_000_000, mode="live")
    await publish(gateway, await draft(gateway, [NEW_MINI]))  # test mode only, in force now
    for mode, version in (("test", "new"), ("live", "config")):
        raw = await gateway.openai(mode=mode).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
        usage = raw.parse().usage
        assert usage is not None
        want = (new_price(usage.prompt_tokens, usage.completion_tokens) if version == "new"
                else expected_price("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens))
        assert raw.headers["X-Metergate-Charged"] == f"{Decimal(want) / 1_000_000:.6f}"


async def test_another_process_picks_up_a_published_version_without_restart(upstream: Upstream,
                                                                           tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    pricing = {**DEFAULT_PRICING, "refresh_interval_s": 0.2}
    control, control_runner = await start_gateway(upstream, url, pricing=pricing)
    sidecar, sidecar_runner = await start_gateway(upstream, url, pricing=pricing)
    try:
        await control.customer("acme", funds=10_000_000)
        await publish(control, await draft(control, [NEW_MINI]))
        await asyncio.sleep(0.6)  # a few refresh intervals
        raw = await sidecar.openai().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
        usage = raw.parse().usage
        assert usage is not None
        [record] = await sidecar.usage()
        assert record["price_amount"] == new_price(usage.prompt_tokens, usage.completion_tokens)
    finally:
        for gw, runner in ((control, control_runner), (sidecar, sidecar_runner)):
            await gw.close()
            await runner.cleanup()


async def test_graduated_tiers_carry_a_customers_usage_from_request_to_request(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=10_000_000)
    tiered = {"id": "mini-tiered", "match": {"type": "request", "model": "gpt-4o-mini"}, "asset": "USD",
              "per_units": "1000000", "tiers": [{"quantity": "output_tokens", "mode": "graduated", "period": "day",
                                                 "steps": [{"up_to": "10", "rate": "100"},
                                                           {"up_to": None, "rate": "1"}]}]}
    await publish(gateway, await draft(gateway, [tiered]))
    client = gateway.openai()
    so_far = 0
    for max_tokens in (15, 8, 30):
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                     max_tokens=max_tokens)
        usage = raw.parse().usage
        assert usage is not None
        out = usage.completion_tokens
        below = max(0, min(10, so_far + out) - so_far)  # this request's output under the 10-token step
        want = below * 100 + (out - below) * 1  # micro-dollars: $/M tokens is micro-dollars per token
        record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
        assert record["price_amount"] == want, (so_far, out)
        so_far += out
    assert so_far > 10


async def test_a_configured_header_is_a_pricing_attribute_and_never_reaches_the_upstream(upstream: Upstream,
                                                                                       tmp_path: Path) -> None:
    pricing = {**DEFAULT_PRICING, "attribute_headers": {"plan": "X-Metergate-Plan"}}
    gateway, runner = await start_gateway(upstream, f"sqlite:///{tmp_path / 'db.sqlite'}", pricing=pricing)
    try:
        await gateway.customer("acme", funds=10_000_000)
        pro = {**NEW_MINI, "id": "mini-pro", "match": {**NEW_MINI["match"], "plan": "pro"},  # type: ignore[dict-item]
               "event_fee": "0", "rates": {"input_tokens": "1", "output_tokens": "1"}}
        await publish(gateway, await draft(gateway, [NEW_MINI, pro]))
        client = gateway.openai()
        for plan, rule in ((None, "mini-v2"), ("pro", "mini-pro"), ("basic", "mini-v2")):
            headers = {"X-Metergate-Plan": plan} if plan else {}
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=10, extra_headers=headers)
            usage = raw.parse().usage
            assert usage is not None
            record = record_by_id(await gateway.usage(), raw.headers["X-Metergate-Request-Id"])
            assert record["detail"]["price"]["rule"] == rule
            if rule == "mini-pro":  # $1/M tokens = 1 micro-dollar per token
                assert record["price_amount"] == usage.prompt_tokens + usage.completion_tokens
            else:
                assert record["price_amount"] == new_price(usage.prompt_tokens, usage.completion_tokens)
        assert all("x-metergate-plan" not in {k.lower() for k in r["headers"]} for r in upstream.requests)
    finally:
        await gateway.close()
        await runner.cleanup()


@pytest.mark.parametrize("headers", [{"model": "X-Metergate-Model"}, {"plan": "X Plan"}, {"9lives": "X-A"}])
def test_attribute_headers_cannot_shadow_metergates_own_attributes(headers: dict[str, str]) -> None:
    from metergate.config.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="attribute_headers"):
        load_settings(pricing={"asset": "USD", "attribute_headers": headers})
