"""Prices as code: ``metergate prices pull | diff | push`` against a real ``metergate serve``.

Method: each command runs as its own process, as an operator's shell or a CI job would run it, on a price file
it pulled and that the test edits as text; what was published is read back with the Python client. Recorded
usage comes from usage events (GPU seconds, scale 3), so the simulated amounts can be worked out by hand:
each event is priced and rounded half-up on its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from metergate_client import Client, IdempotencyConflict
from tests.cli.conftest import EVENT_RULES
from tests.cli.server import MeterServer
from tests.cli.test_commands import env_of, mg, refused
from tests.conftest import ADMIN_KEY, LIVE_ADMIN_KEY, free_port

GPU_RULE = "  gpu_seconds: '1'\n"
BATCH_RULE = ("- id: batch\n  match: {type: api.batch}\n  asset: CALLS\n  rates:\n    quantity: 2\n")


@pytest.fixture
def env(server: MeterServer, tmp_path: Path) -> dict[str, str]:
    return env_of(server, tmp_path)


def versions(client: Client) -> list[str]:
    """Every stored version of the key's mode, drafts included."""
    return [v["id"] for v in client.list_price_versions(limit=200)["data"]]


def in_force(client: Client) -> str:
    return str(client.list_price_versions()["in_force"]["id"])


def pull(env: dict[str, str], path: Path, *args: str) -> str:
    result = mg(env, "prices", "pull", *args)
    assert result.returncode == 0, result.stderr
    path.write_text(result.stdout)
    return result.stdout


def gpu_usage(client: Client, customer: str, *seconds: str) -> None:
    client.create_customer(customer)
    client.create_grant(customer, "100", asset="GPU_SECONDS", idempotency_key=f"pack-{customer}")
    results = client.send_events([{"id": f"{customer}-{i}", "customer_id": customer, "type": "gpu.job",
                                   "quantities": {"gpu_seconds": s}} for i, s in enumerate(seconds)])
    assert [r.raw["status"] for r in results] == ["accepted"] * len(seconds)


def test_pull_edit_diff_push_pull(env: dict[str, str], client: Client, tmp_path: Path) -> None:
    gpu_usage(client, "prices-gpu", "1.5", "0.25")  # 1.500 + 0.250 GPU seconds charged at rate 1
    current = in_force(client)
    prices = tmp_path / "prices.yaml"
    text = pull(env, prices)
    assert text.startswith(f"# metergate prices: version {current} (test mode), in force since ")
    assert [r["id"] for r in yaml.safe_load(text)["rules"]] == [r["id"] for r in EVENT_RULES]
    assert "input_tokens: '0.30'" in text and GPU_RULE in text  # decimals as strings, never floats
    assert pull(env, tmp_path / "again.yaml") == text  # stable: the same version pulls to the same bytes
    same = mg(env, "prices", "diff", str(prices))
    assert (same.returncode, same.stdout.strip()) == (0, f"{prices}: no changes against the version in force, "
                                                         f"{current} (test mode)")

    before = versions(client)
    prices.write_text(text.replace(GPU_RULE, "  gpu_seconds: '1.25'\n") + BATCH_RULE)
    changed = mg(env, "prices", "diff", str(prices))
    assert changed.returncode == 1, changed.stderr
    lines = changed.stdout.splitlines()
    assert '~ gpu.rates.gpu_seconds: "1" -> "1.25"' in lines
    assert "+ batch (added: matches type=api.batch; asset CALLS)" in lines
    # 1.5 x 1.25 = 1.875 and 0.25 x 1.25 = 0.3125 -> 0.313 (each event rounded half-up on its own)
    assert ["prices-gpu", "GPU_SECONDS", "1.750", "2.188", "+0.438"] in [line.split() for line in lines]
    report = json.loads(mg(env, "prices", "diff", str(prices), "--json", "--since", "1d").stdout)
    [row] = [r for r in report["simulation"]["customers"] if r["customer_id"] == "prices-gpu"]
    assert row == {"customer_id": "prices-gpu", "asset": "GPU_SECONDS", "now": "1.750", "draft": "2.188",
                   "difference": "+0.438"}
    assert {"kind": "changed", "rule": "gpu", "path": "rates.gpu_seconds", "old": "1", "new": "1.25"} in \
        report["changes"]
    assert versions(client) == before  # diffing stored nothing

    pushed = mg(env, "prices", "push", str(prices), "--effective-at", "now")
    assert pushed.returncode == 0, pushed.stderr
    published = in_force(client)
    assert published != current and pushed.stdout.startswith(f"published {published} (test mode), effective at ")
    assert len(versions(client)) == len(before) + 1
    again = mg(env, "prices", "push", str(prices), "--effective-at", "now")
    assert (again.returncode, again.stdout.strip()) == (
        0, f"{prices} matches the version in force, {published} (test mode); nothing published")
    assert len(versions(client)) == len(before) + 1

    new_text = pull(env, tmp_path / "new.yaml")
    assert new_text.startswith(f"# metergate prices: version {published} (test mode)")
    assert "gpu_seconds: '1.25'" in new_text and "- id: batch" in new_text and "quantity: '2'" in new_text
    assert mg(env, "prices", "diff", str(tmp_path / "new.yaml")).returncode == 0
    quote = client.quote("prices-gpu", type="gpu.job", quantities={"gpu_seconds": "2"})
    assert (quote.amount, quote.asset) == (Decimal("2.5"), "GPU_SECONDS")  # the pushed rate prices now


def test_a_retried_push_publishes_once(env: dict[str, str], client: Client, tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    text = pull(env, prices)
    prices.write_text(text.replace("  quantity: '1'\n", "  quantity: '3'\n", 1))
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0).isoformat()
    current, before = in_force(client), versions(client)
    first = mg(env, "prices", "push", str(prices), "--effective-at", later, "--json")
    second = mg(env, "prices", "push", str(prices), "--effective-at", later, "--json")
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["published"] == two["published"] and "pushed already" in two["message"]
    assert len(versions(client)) == len(before) + 1  # one draft, published once
    assert in_force(client) == current  # not yet: it takes effect in an hour
    assert client.get_price_version(one["published"])["state"] == "published"
    # The key is the server's: the same key with other rules is a conflict, never a second version.
    key = "prices-push:test-conflict"
    client.create_price_version(EVENT_RULES, idempotency_key=key)
    with pytest.raises(IdempotencyConflict):
        client.create_price_version(EVENT_RULES[:1], idempotency_key=key)
    assert client.create_price_version(EVENT_RULES, idempotency_key=key)["id"] in versions(client)
    assert len(versions(client)) == len(before) + 2


def test_an_invalid_file_is_refused_naming_the_rule_and_nothing_is_stored(env: dict[str, str], client: Client,
                                                                          tmp_path: Path) -> None:
    text = pull(env, tmp_path / "prices.yaml")
    before, current = versions(client), in_force(client)
    negative = tmp_path / "negative.yaml"
    negative.write_text(re.sub(r"gpu_seconds: '[0-9.]+'", "gpu_seconds: '-1'", text))
    refused(mg(env, "prices", "push", str(negative), "--effective-at", "now"), 1, str(negative),
            "rules[2] (id gpu).rates.gpu_seconds", "negative_rate")
    refused(mg(env, "prices", "diff", str(negative)), 2, "rules[2] (id gpu).rates.gpu_seconds", "negative_rate")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("asset: CALLS", "asset: EUR"))
    refused(mg(env, "prices", "push", str(unknown), "--effective-at", "now"), 1, "rules[1] (id calls).asset",
            "unknown_asset")
    twice = tmp_path / "twice.yaml"
    twice.write_text(re.sub(r"^( +gpu_seconds: .*\n)", r"\1\1", text, flags=re.M))
    refused(mg(env, "prices", "push", str(twice), "--effective-at", "now"), 2, str(twice),
            "'gpu_seconds' appears twice")
    refused(mg(env, "prices", "push", str(tmp_path / "prices.yaml"), "--effective-at", "tomorrow"), 2,
            "--effective-at", "ISO 8601")
    refused(mg(env, "prices", "push", str(tmp_path / "nothing.yaml"), "--effective-at", "now"), 2, "cannot read",
            "nothing.yaml")
    refused(mg(env, "prices", "diff", str(tmp_path / "prices.yaml"), "--since", "soon"), 2, "--since")
    assert (versions(client), in_force(client)) == (before, current)  # no draft, nothing published


def test_yaml_numbers_are_read_as_their_text(env: dict[str, str], tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text("rules:\n- id: calls\n  match: {type: api.call, plan: yes}\n  asset: CALLS\n"
                     "  rates: {quantity: 0.30, other: 010}\n")
    result = mg(env, "prices", "validate", str(plain), "--json")
    assert result.returncode == 0, result.stderr
    [rule] = json.loads(result.stdout)["rules"]
    assert rule["rates"] == {"other": "10", "quantity": "0.30"}  # ten, not eight (YAML 1.1 octal); not 0.3, a float
    assert rule["match"] == {"plan": "yes", "type": "api.call"}  # not true


def test_modes_are_isolated(server: MeterServer, client: Client, tmp_path: Path) -> None:
    live = env_of(server, tmp_path, METERGATE_ADMIN_KEY=LIVE_ADMIN_KEY)
    test_before = in_force(client)
    prices = tmp_path / "live.yaml"
    text = pull(live, prices, "--mode", "live")
    assert text.startswith("# metergate prices: version config (the settings file's pricing), in force in live")
    prices.write_text(text.replace("output_tokens: '1.20'", "output_tokens: '1.10'"))
    diffed = mg(live, "prices", "diff", str(prices), "--mode", "live")
    assert diffed.returncode == 1 and '~ config1:gpt-4o-mini.rates.output_tokens: "1.20" -> "1.10"' in diffed.stdout
    pushed = mg(live, "prices", "push", str(prices), "--effective-at", "now", "--mode", "live")
    assert pushed.returncode == 0 and "(live mode)" in pushed.stdout, pushed.stderr
    with Client(server.url, LIVE_ADMIN_KEY) as live_client:
        live_now = in_force(live_client)
        assert live_now.startswith("pv_") and live_now not in versions(client)
    assert in_force(client) == test_before  # the test mode's prices did not move
    assert "(test mode)" in pull(env_of(server, tmp_path), tmp_path / "test.yaml")
    refused(mg(live, "prices", "pull", "--mode", "test"), 2, "--mode test", "mg_test_", "live key")
    refused(mg(env_of(server, tmp_path), "prices", "diff", str(prices), "--mode", "live"), 2, "--mode live")


# ---------------------------------------------------------------------- errors: one line, never a traceback


@contextlib.contextmanager
def not_metergate() -> Iterator[str]:
    """Some other HTTP server on loopback (the standard library's, which answers 501 to every GET)."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_errors_are_one_line_naming_what_is_wrong(server: MeterServer, tmp_path: Path) -> None:
    wrong = env_of(server, tmp_path, METERGATE_ADMIN_KEY="mg_test_" + "w" * 24)
    refused(mg(wrong, "prices", "pull"), 1, "invalid_admin_key")
    (tmp_path / "p.yaml").write_text("rules: []\n")
    refused(mg(wrong, "prices", "diff", str(tmp_path / "p.yaml")), 2, "invalid_admin_key")
    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = env_of(server, tmp_path, METERGATE_URL=dead)
    refused(mg(unreachable, "prices", "pull"), 3, "cannot reach metergate at", dead)
    refused(mg(unreachable, "prices", "push", str(tmp_path / "p.yaml"), "--effective-at", "now"), 3, dead)
    refused(mg(unreachable, "prices", "diff", str(tmp_path / "p.yaml")), 2, dead)
    with not_metergate() as other:  # an HTTP server, but not metergate: its answer is named, not parsed
        elsewhere = env_of(server, tmp_path, METERGATE_URL=other)
        refused(mg(elsewhere, "prices", "pull"), 1, f"{other} answered HTTP 501", "METERGATE_URL")
    empty = env_of(server, tmp_path, METERGATE_ADMIN_KEY=ADMIN_KEY)
    refused(mg(empty, "prices", "push", str(tmp_path / "p.yaml"), "--effective-at", "now"), 1, "rules", "1 to 1000")
    (tmp_path / "broken.yaml").write_text("rules: [\n")
    refused(mg(empty, "prices", "diff", str(tmp_path / "broken.yaml")), 2, "broken.yaml", "not valid YAML")
    refused(mg(empty, "prices", "push", str(tmp_path / "p.yaml")), 2, "--effective-at")
