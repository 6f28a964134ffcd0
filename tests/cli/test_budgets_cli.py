"""Budget trees through ``metergate budgets`` and the Python client, against a real ``metergate serve``.

Method: a three-level tree with limits is built with the CLI only (each command its own process, as an
operator's shell runs it) and read back with ``budgets tree`` (table and ``--json``); a proxy key attached to
the agent node then sends real proxy requests: the first is admitted (counted, then the closed upstream port
answers 502), the next is refused 429 ``budget_exceeded`` naming the agent's limit. Bad input ends in one line
on stderr and a non-zero exit. The client's budget calls are driven sync and async on customers of their own.
"""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import httpx2 as httpx
import pytest

import metergate_client as mg
from metergate_client import Client
from tests.cli.server import MeterServer
from tests.cli.test_commands import env_of, refused
from tests.cli.test_commands import mg as run
from tests.conftest import ADMIN_KEY

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def env(server: MeterServer, tmp_path: Path) -> dict[str, str]:
    return env_of(server, tmp_path)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def test_a_tree_built_with_the_cli_limits_a_key_attached_to_its_agent(env: dict[str, str], client: Client,
                                                                      server: MeterServer) -> None:
    client.create_customer("bt-acme")
    client.credit("bt-acme", "10", idempotency_key="bt-acme-seed")
    ok(run(env, "budgets", "node", "create", "bt-acme", "eng", "--kind", "team", "--name", "Engineering"))
    ok(run(env, "budgets", "node", "create", "bt-acme", "search", "--parent", "eng", "--kind", "project"))
    created = ok(run(env, "budgets", "node", "create", "bt-acme", "agent-7", "--parent", "search", "--kind", "agent",
                     "--models", "gpt-4o*", "--json"))
    assert json.loads(created)["parent_id"] == "search"
    again = run(env, "budgets", "node", "create", "bt-acme", "agent-7", "--parent", "search", "--kind", "agent",
                "--models", "gpt-4o*")
    assert again.returncode == 0  # the same create again: idempotent by id
    ok(run(env, "budgets", "limit", "set", "bt-acme", "eng", "--dimension", "spend", "--amount", "5.00",
           "--asset", "USD", "--window", "day", "--id", "eng-daily"))
    for tokens in ("100000", "200000"):  # set again (the server chose the buckets): the amount changes
        ok(run(env, "budgets", "limit", "set", "bt-acme", "search", "--dimension", "tokens", "--amount", tokens,
               "--window", "rolling:1h"))
    clash = run(env, "budgets", "limit", "set", "bt-acme", "search", "--dimension", "requests", "--amount", "9",
                "--window", "day", "--id", "search-tokens-rolling:1h")
    refused(clash, 1, "already_exists")  # the same id for another limit: refused, not overwritten
    limit = json.loads(ok(run(env, "budgets", "limit", "set", "bt-acme", "agent-7", "--dimension", "requests",
                              "--amount", "5", "--window", "fixed:1h", "--id", "agent-7-hourly", "--json")))
    assert (limit["amount"], limit["window"], limit["version"]) == (5, {"kind": "fixed", "length_s": 3600}, 1)
    changed = json.loads(ok(run(env, "budgets", "limit", "set", "bt-acme", "agent-7", "--dimension", "requests",
                                "--amount", "1", "--window", "fixed:1h", "--id", "agent-7-hourly", "--json")))
    assert (changed["amount"], changed["version"]) == (1, 2)  # set again: the amount changes in place
    key = client.issue_key("bt-acme")
    assert key.secret is not None
    attached = ok(run(env, "budgets", "attach-key", key.id, "agent-7"))
    assert "agent-7" in attached

    tree = json.loads(ok(run(env, "budgets", "tree", "bt-acme", "--json")))
    by_id = {n["id"]: n for n in tree["data"]}
    assert [by_id[n]["path"] for n in ("eng", "search", "agent-7")] == ["root/eng", "root/eng/search",
                                                                        "root/eng/search/agent-7"]
    assert by_id["eng"]["limits"][0]["amount"] == 5_000_000  # 5.00 USD in its smallest unit (scale 6)
    [tokens] = by_id["search"]["limits"]
    assert (tokens["id"], tokens["amount"], tokens["version"]) == ("search-tokens-rolling:1h", 200_000, 2)
    assert by_id["agent-7"]["api_keys"] == [key.id] and by_id["agent-7"]["allowed_models"] == ["gpt-4o*"]
    rows = [line.split() for line in ok(run(env, "budgets", "tree", "bt-acme")).splitlines()]
    assert rows[0][:4] == ["node", "kind", "name", "limit"]
    assert ["eng", "team", "Engineering", "eng-daily", "spend", "day", "0.000000", "USD", "5.000000", "USD",
            "5.000000", "USD", "-"] in rows
    assert ["agent-7", "agent", "-", "agent-7-hourly", "requests", "fixed:3600s", "0", "1", "1", key.id] in rows
    table = ok(run(env, "budgets", "tree", "bt-acme")).splitlines()
    assert any(line.startswith("      agent-7 ") for line in table)  # indented under search, under eng

    def proxied() -> httpx.Response:
        return httpx.post(f"{server.url}/openai/v1/chat/completions", json=CHAT, timeout=30,
                          headers={"Authorization": f"Bearer {key.secret}"})

    admitted = proxied()  # admitted and counted; then the upstream's port is closed
    assert admitted.status_code == 502 and admitted.json()["error"]["code"] == "upstream_unreachable"
    refusal = proxied()
    assert refusal.status_code == 429, refusal.text
    error = refusal.json()["error"]
    assert (error["code"], error["node"], error["limit"]["id"]) == ("budget_exceeded", "agent-7", "agent-7-hourly")
    used = json.loads(ok(run(env, "budgets", "tree", "bt-acme", "--json")))
    [agent] = [n for n in used["data"] if n["id"] == "agent-7"]
    assert (agent["limits"][0]["used"], agent["limits"][0]["remaining"]) == (1, 0)

    ok(run(env, "budgets", "detach-key", key.id))
    ok(run(env, "budgets", "limit", "delete", "bt-acme", "agent-7-hourly"))
    ok(run(env, "budgets", "node", "delete", "bt-acme", "agent-7"))
    left = json.loads(ok(run(env, "budgets", "tree", "bt-acme", "--json")))
    assert [n["id"] for n in left["data"]] == ["root", "eng", "search"]


def test_bad_budget_input_is_one_line_and_changes_nothing(env: dict[str, str], client: Client) -> None:
    client.create_customer("bt-bad")
    base = ["budgets", "limit", "set", "bt-bad", "root"]
    refused(run(env, *base, "--dimension", "spend", "--amount", "1", "--window", "day"), 2, "--asset")
    refused(run(env, *base, "--dimension", "spend", "--amount", "0.0000001", "--asset", "USD", "--window", "day"),
            2, "decimal places", "USD")
    refused(run(env, *base, "--dimension", "requests", "--amount", "1.5", "--window", "day"), 2, "decimal places")
    refused(run(env, *base, "--dimension", "requests", "--amount", "3", "--window", "weekly"), 2, "not a window")
    refused(run(env, *base, "--dimension", "requests", "--amount", "3", "--window", "rolling:soon"), 2,
            "not a duration")
    refused(run(env, *base, "--dimension", "requests", "--amount", "-3", "--window", "day"), 2, "--amount")
    refused(run(env, *base, "--dimension", "spend", "--amount", "1", "--asset", "NOPE", "--window", "day"), 1,
            "unknown_asset")
    refused(run(env, "budgets", "node", "create", "bt-bad", "a1", "--kind", "robot"), 2, "--kind")
    refused(run(env, "budgets", "node", "create", "bt-bad", "a1", "--kind", "agent", "--parent", "ghost"), 1,
            "ghost")
    refused(run(env, "budgets", "node", "create", "bt-bad", "bad id!", "--kind", "agent"), 1, "invalid_budget_node")
    refused(run(env, "budgets", "node", "update", "bt-bad", "root"), 2, "nothing to change")
    refused(run(env, "budgets", "limit", "delete", "bt-bad", "ghost-limit"), 1, "unknown_budget_limit")
    refused(run(env, "budgets", "attach-key", "key_missing", "root"), 1, "not_found")
    refused(run(env, "budgets", "tree"), 2, "customer")
    assert client.budget_tree("bt-bad").nodes == []  # nothing was created by any of them (not even the root)


def test_the_client_manages_a_budget_tree(client: Client) -> None:
    client.create_customer("bt-client")
    node = client.create_budget_node("bt-client", "proj", "project", name="Project")
    assert (node.id, node.parent_id, node.kind, node.allowed_models) == ("proj", "root", "project", None)
    agent = client.create_budget_node("bt-client", "bot", "agent", parent_id="proj", allowed_models=["gpt-4o-mini"])
    assert agent.allowed_models == ["gpt-4o-mini"]
    with pytest.raises(mg.Conflict) as clash:
        client.create_budget_node("bt-client", "bot", "team")
    assert clash.value.code == "already_exists"
    renamed = client.update_budget_node("bt-client", "bot", name="Bot", allowed_models=None)
    assert (renamed.name, renamed.allowed_models) == ("Bot", None)
    spend = client.create_budget_limit("bt-client", "proj", "proj-spend", dimension="spend", amount=2_500_000,
                                       window="rolling:1h/60", asset="USD")
    assert (spend.window, spend.asset, spend.version) == (mg.BudgetWindow("rolling", 3600, 60), "USD", 1)
    assert client.update_budget_limit("bt-client", "proj-spend", 3_000_000).amount == 3_000_000
    rule = client.set_budget_alert("bt-client", "proj-80", "limit:proj-spend", percents=[80], amounts=[2_000_000])
    assert rule.thresholds == [("percent", 80), ("amount", 2_000_000)]
    assert [r.id for r in client.list_budget_alerts("bt-client")] == ["proj-80"]
    key = client.issue_key("bt-client")
    attached = client.attach_key(key.id, "bot")
    assert (attached.customer_id, attached.node_id) == ("bt-client", "bot")
    view = client.get_budget_node("bt-client", "bot")
    assert (view.path, view.api_keys) == ("root/proj/bot", [key.id])
    [proj] = [v for v in client.budget_tree("bt-client").nodes if v.node.id == "proj"]
    [use] = proj.limits
    assert (use.limit.amount, use.used, use.remaining) == (3_000_000, 0, 3_000_000)
    with pytest.raises(TypeError):
        client.create_budget_limit("bt-client", "proj", "x", dimension="spend", amount=Decimal("1.5"),  # type: ignore[arg-type]
                                   window="day")
    with pytest.raises(ValueError, match="not a window"):
        client.create_budget_limit("bt-client", "proj", "x", dimension="requests", amount=1, window="hourly")
    assert client.delete_budget_alert("bt-client", "proj-80").id == "proj-80"
    assert client.delete_budget_limit("bt-client", "proj-spend").id == "proj-spend"
    assert client.delete_budget_node("bt-client", "bot").id == "bot"
    with pytest.raises(mg.NotFound):
        client.get_budget_node("bt-client", "bot")


async def test_the_async_client_manages_a_budget_tree(server: MeterServer, client: Client) -> None:
    client.create_customer("bt-async")
    async with mg.AsyncClient(server.url, ADMIN_KEY) as aclient:
        await aclient.create_budget_node("bt-async", "team", "team")
        await aclient.create_budget_node("bt-async", "user-1", "end_user", parent_id="team")
        limit = await aclient.create_budget_limit("bt-async", "user-1", "user-1-day", dimension="requests",
                                                  amount=100, window=mg.BudgetWindow("day"))
        assert (limit.node_id, limit.window.kind, limit.asset) == ("user-1", "day", None)
        assert (await aclient.update_budget_limit("bt-async", "user-1-day", 50)).version == 2
        key = await aclient.issue_key("bt-async")
        assert (await aclient.attach_key(key.id, "user-1")).node_id == "user-1"
        assert (await aclient.attach_key(key.id, None)).node_id is None
        tree = await aclient.budget_tree("bt-async")
        assert [v.path for v in tree.nodes] == ["root", "root/team", "root/team/user-1"]
        assert (await aclient.get_budget_node("bt-async", "user-1")).limits[0].remaining == 50
        assert (await aclient.update_budget_node("bt-async", "team", name="Team")).name == "Team"
        rule = await aclient.set_budget_alert("bt-async", "low", "balance:USD", amounts=[1000])
        assert [r.target for r in await aclient.list_budget_alerts("bt-async")] == [rule.target]
        assert (await aclient.delete_budget_alert("bt-async", "low")).id == "low"
        assert (await aclient.delete_budget_limit("bt-async", "user-1-day")).id == "user-1-day"
        assert (await aclient.delete_budget_node("bt-async", "user-1")).id == "user-1"


def test_alert_rules_are_set_listed_and_deleted_with_the_cli(env: dict[str, str], client: Client) -> None:
    client.create_customer("bt-alerts")
    ok(run(env, "budgets", "limit", "set", "bt-alerts", "root", "--dimension", "spend", "--amount", "20",
           "--asset", "USD", "--window", "month", "--id", "monthly"))
    rule = json.loads(ok(run(env, "budgets", "alert", "set", "bt-alerts", "spend-watch", "--on", "limit:monthly",
                             "--percent", "50", "80", "--amount", "19.50", "--json")))
    assert rule == {"id": "spend-watch", "target": "limit:monthly",
                    "thresholds": [{"percent": 50}, {"percent": 80}, {"amount": 19_500_000}]}  # 19.50 USD, scale 6
    low = ok(run(env, "budgets", "alert", "set", "bt-alerts", "low-balance", "--on", "balance:USD", "--amount", "2"))
    assert "low-balance" in low and "1 threshold" in low
    again = ok(run(env, "budgets", "alert", "set", "bt-alerts", "low-balance", "--on", "balance:USD", "--amount", "2"))
    assert again == low  # idempotent by the rule's id
    rows = [line.split() for line in ok(run(env, "budgets", "alert", "list", "bt-alerts")).splitlines()]
    assert rows[0] == ["rule", "on", "thresholds"]
    assert ["low-balance", "balance:USD", "2000000"] in rows and ["spend-watch", "limit:monthly", "50%,", "80%,",
                                                                  "19500000"] in rows
    assert json.loads(ok(run(env, "budgets", "alert", "fired", "bt-alerts", "--json"))) == []  # nothing spent
    assert ok(run(env, "budgets", "alert", "fired", "bt-alerts")).split() == [
        "state", "rule", "on", "threshold", "fired", "(UTC)", "recovered", "(UTC)"]

    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "limit:monthly"), 2, "threshold")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "limit:monthly", "--percent", "0"), 2,
            "1 to 100")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "wallet:USD", "--percent", "5"), 2,
            "--on")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "limit:ghost", "--amount", "3"), 2,
            "ghost")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "balance:USD", "--amount", "0.0000001"),
            2, "decimal places")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "limit:ghost", "--percent", "5"), 1,
            "unknown_budget_limit")
    refused(run(env, "budgets", "alert", "set", "bt-alerts", "r", "--on", "balance:NOPE", "--percent", "5"), 1,
            "unknown_asset")
    assert [r.id for r in client.list_budget_alerts("bt-alerts")] == ["low-balance", "spend-watch"]  # unchanged

    assert "deleted alert low-balance" in ok(run(env, "budgets", "alert", "delete", "bt-alerts", "low-balance"))
    refused(run(env, "budgets", "alert", "delete", "bt-alerts", "low-balance"), 1, "not_found")
    assert [r.id for r in client.list_budget_alerts("bt-alerts")] == ["spend-watch"]
