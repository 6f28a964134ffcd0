"""The admin commands of ``metergate`` against a real ``metergate serve``: what they print for people and for
scripts, their exit codes, and errors of one line that name what is wrong (never a traceback).

Method: each command runs as its own process (``python -m metergate ...``) with the server and key from the
environment or a profile file, as an operator's shell or script would run it; the effects are read back with
the Python client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metergate_client import Client
from tests.cli.server import ROOT, MeterServer, config
from tests.conftest import ADMIN_KEY, free_port

COMMAND_TIMEOUT_S = 120  # a bound on a hung command, not a speed assertion


def env_of(server: MeterServer | None, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env.update(HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "config"))
    if server is not None:
        env.update(METERGATE_URL=server.url, METERGATE_ADMIN_KEY=ADMIN_KEY)
    env.update(extra)
    return env


def mg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metergate", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The command failed with ``code`` and one line on stderr naming each of ``words``; no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metergate"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def env(server: MeterServer, tmp_path: Path) -> dict[str, str]:
    return env_of(server, tmp_path)


def test_customers_credits_keys_grants_ledger_and_links(env: dict[str, str], client: Client) -> None:
    created = mg(env, "customers", "create", "cli-acme", "--name", "Acme")
    assert created.stdout.startswith("created customer cli-acme")
    credit = ["credit", "cli-acme", "12.50", "--idempotency-key", "inv-cli-1", "--json"]
    first, again = json.loads(mg(env, *credit).stdout), json.loads(mg(env, *credit).stdout)
    assert first["entry"]["seq"] == again["entry"]["seq"]  # idempotent: credited once
    assert first["entry"]["amount_decimal"] == "12.500000"
    shown = mg(env, "customers", "show", "cli-acme")
    assert shown.returncode == 0 and "Acme" in shown.stdout
    assert [line.split()[:2] for line in shown.stdout.splitlines() if line.startswith("USD")] == \
        [["USD", "12.500000"]]
    listed = json.loads(mg(env, "customers", "list", "--json").stdout)
    assert "cli-acme" in [c["id"] for c in listed["data"]]

    issued = json.loads(mg(env, "keys", "issue", "cli-acme", "--json").stdout)
    assert issued["key"].startswith("mgk_test_")
    keys = mg(env, "keys", "list", "cli-acme")
    assert issued["id"] in keys.stdout and issued["key"] not in keys.stdout  # the secret is shown once only
    assert mg(env, "keys", "revoke", issued["id"]).returncode == 0
    [key] = json.loads(mg(env, "keys", "list", "cli-acme", "--json").stdout)["data"]
    assert key["revoked_at_ms"] is not None

    grant = json.loads(mg(env, "grants", "create", "cli-acme", "3", "--asset", "GPU_SECONDS", "--purpose", "trial",
                          "--idempotency-key", "trial-cli-acme", "--json").stdout)
    assert (grant["amount_decimal"], grant["purpose"]) == ("3.000", "trial")
    assert grant["id"] in mg(env, "grants", "list", "cli-acme").stdout
    ledger = json.loads(mg(env, "ledger", "cli-acme", "--json").stdout)
    assert [(e["kind"], e["amount_decimal"]) for e in ledger["data"]][-1] == ("credit", "12.500000")
    assert mg(env, "portal-link", "cli-acme").stdout.startswith("http://127.0.0.1")
    assert "/admin/dashboard" in mg(env, "dashboard-link").stdout


def test_holds_list_shows_open_holds_and_void_releases_one(env: dict[str, str], client: Client) -> None:
    client.create_customer("cli-gpu")
    client.create_grant("cli-gpu", "10", asset="GPU_SECONDS", idempotency_key="pack-cli-gpu")
    hold = client.create_hold("cli-gpu", "4", asset="GPU_SECONDS", ttl_s=600)
    listed = json.loads(mg(env, "holds", "list", "--customer", "cli-gpu", "--json").stdout)
    assert [(h["id"], h["pending"]) for h in listed["data"]] == [(hold.id, 4_000)]
    voided = mg(env, "holds", "void", hold.id)
    assert voided.returncode == 0 and "voided" in voided.stdout
    assert json.loads(mg(env, "holds", "list", "--customer", "cli-gpu", "--json").stdout)["data"] == []
    [gpu] = [b for b in client.balances("cli-gpu") if b.asset == "GPU_SECONDS"]
    assert (gpu.available_minor, gpu.pending_minor) == (10_000, 0)


def test_usage_tail_follows_new_usage_records(env: dict[str, str], client: Client) -> None:
    client.create_customer("cli-tail")
    client.credit("cli-tail", 100, asset="CALLS", idempotency_key="seed-cli-tail")

    def events(*ids: str) -> list[str]:
        results = client.send_events([{"id": i, "customer_id": "cli-tail", "type": "api.call", "quantity": "1"}
                                      for i in ids])
        return [str(r.raw["usage_record_id"]) for r in results]

    before = events("tail-a", "tail-b", "tail-c")
    with subprocess.Popen([sys.executable, "-m", "metergate", "usage", "tail", "cli-tail", "--lines", "1",
                           "--follow", "--json", "--count", "3", "--interval-s", "0.2"], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as tail:
        assert tail.stdout is not None
        try:
            first = json.loads(tail.stdout.readline())  # the latest record that was there before
            after = events("tail-d", "tail-e")
            later = [json.loads(tail.stdout.readline()) for _ in range(2)]  # printed as they arrive
            assert tail.wait(timeout=COMMAND_TIMEOUT_S) == 0
        finally:
            tail.kill()
    assert [r["id"] for r in [first, *later]] == [before[-1], *after]  # the older two are never printed
    assert [r["charged_decimal"] for r in later] == ["1", "1"]
    people = mg(env, "usage", "tail", "cli-tail", "-n", "2")
    assert people.returncode == 0 and len(people.stdout.strip().splitlines()) == 3  # header and two records


# ---------------------------------------------------------------------- errors: one line, exit codes


def test_a_bad_admin_key_is_refused_in_one_line(server: MeterServer, tmp_path: Path) -> None:
    wrong = env_of(server, tmp_path, METERGATE_ADMIN_KEY="mg_test_" + "w" * 24)
    refused(mg(wrong, "customers", "list"), 1, "invalid_admin_key")
    malformed = env_of(server, tmp_path, METERGATE_ADMIN_KEY="not-a-key")
    refused(mg(malformed, "customers", "list"), 2, "admin key", "mg_test_")
    none = env_of(None, tmp_path)
    refused(mg(none, "customers", "list"), 2, "no admin key", "METERGATE_ADMIN_KEY")


def test_an_unreachable_server_is_exit_3_in_one_line(server: MeterServer, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = mg(env_of(server, tmp_path, METERGATE_URL=dead), "customers", "show", "acme")
    refused(result, 3, "cannot reach metergate at", dead)


def test_a_refusal_names_the_code_and_the_field(env: dict[str, str]) -> None:
    refused(mg(env, "credit", "nobody", "1", "--idempotency-key", "k-nobody"), 1, "customer_not_found", "nobody")
    mg(env, "customers", "create", "cli-fine")
    refused(mg(env, "credit", "cli-fine", "0.0000001", "--idempotency-key", "k-fine"), 1, "invalid_amount",
            "amount_decimal")
    refused(mg(env, "credit", "cli-fine", "12.5.0", "--idempotency-key", "k"), 2, "metergate credit", "12.5.0")
    refused(mg(env, "credit", "cli-fine", "1"), 2, "--idempotency-key")
    refused(mg(env, "keys"), 2, "metergate keys", "required")


def test_invalid_price_files_are_refused_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    good = tmp_path / "prices.json"
    good.write_text(json.dumps({"rules": [{"id": "calls", "match": {"type": "api.call"}, "asset": "CALLS",
                                           "rates": {"quantity": "2"}}]}))
    assert mg(env, "prices", "validate", str(good)).stdout.strip() == f"{good}: valid, 1 rules"
    unknown_asset = tmp_path / "unknown.json"
    unknown_asset.write_text(json.dumps({"rules": [{"id": "x", "match": {"type": "api.call"}, "asset": "EUR",
                                                    "rates": {"quantity": "1"}}]}))
    result = mg(env, "prices", "validate", str(unknown_asset))
    refused(result, 1, "rules")
    broken = tmp_path / "broken.json"
    broken.write_text('{"rules": [')
    refused(mg(env, "prices", "validate", str(broken)), 2, "broken.json", "not valid JSON")
    refused(mg(env, "prices", "validate", str(tmp_path / "missing.json")), 2, "cannot read", "missing.json")


def test_check_refuses_an_invalid_price_table_naming_the_key(tmp_path: Path) -> None:
    settings = config(tmp_path, free_port())
    settings["pricing"] = {"asset": "USD", "models": {"gpt-4o-mini": {"input_per_mtok": "-1"}}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(settings))
    env = env_of(None, tmp_path, METERGATE_TEST_UPSTREAM_KEY="sk-x")
    refused(mg(env, "check", str(bad)), 2, "pricing.models.gpt-4o-mini.input_per_mtok")
    unset = env_of(None, tmp_path)
    refused(mg(unset, "check", str(tmp_path / "bad.yaml")), 2, "METERGATE_TEST_UPSTREAM_KEY", "not set")
    refused(mg(env, "check", str(tmp_path / "nothing.yaml")), 2, "config file not found")
    (tmp_path / "tabs.yaml").write_text("routes: [\n")
    refused(mg(env, "check", str(tmp_path / "tabs.yaml")), 2, "not valid YAML")


def test_check_reports_routes_assets_prices_and_secret_references(server: MeterServer, tmp_path: Path) -> None:
    settings = config(tmp_path, free_port())
    dead = f"http://127.0.0.1:{free_port()}"
    settings["routes"] = [{"prefix": "/openai", "upstream": server.url, "api_key": "${CLI_OPENAI_KEY}"},
                          {"prefix": "/vllm", "upstream": dead}]
    path = tmp_path / "metergate.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = env_of(None, tmp_path, CLI_OPENAI_KEY="sk-secret-value-" + "v" * 20)
    result = mg(env, "check", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{path}: valid" in out
    assert [line.split() for line in out.splitlines() if line.startswith(("/openai", "/vllm"))] == [
        ["/openai", server.url, "openai", "reference"], ["/vllm", dead, "openai", "none"]]
    assert all(code in out for code in ("USD", "GPU_SECONDS", "CALLS", "gpt-4o-mini", "text-embedding-3-small"))
    assert ["routes.0.api_key", "CLI_OPENAI_KEY", "yes"] in [line.split() for line in out.splitlines()]
    assert "warning: secrets written in the file, not referenced: admin_keys.0, admin_keys.1" in out
    assert "sk-secret-value" not in out and ADMIN_KEY not in out
    probed = mg(env, "check", str(path), "--probe")
    assert probed.returncode == 3
    rows = {line.split()[0]: line for line in probed.stdout.splitlines()[-2:]}
    assert rows["/openai"].endswith("answers") and "DOES NOT ANSWER" in rows["/vllm"]


def test_a_profile_gives_the_url_and_key_and_guards_the_mode(server: MeterServer, tmp_path: Path) -> None:
    profiles = tmp_path / "config" / "metergate" / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text(f'[staging]\nurl = "{server.url}"\nadmin_key = "{ADMIN_KEY}"\nmode = "test"\n\n'
                        f'[prod]\nurl = "{server.url}"\nadmin_key = "{ADMIN_KEY}"\nmode = "live"\n')
    env = env_of(None, tmp_path)
    assert json.loads(mg(env, "customers", "list", "--profile", "staging", "--json").stdout)["data"] is not None
    env_profile = env_of(None, tmp_path, METERGATE_PROFILE="staging")
    assert mg(env_profile, "customers", "list").returncode == 0
    refused(mg(env, "customers", "list", "--profile", "prod"), 2, "prod", "live mode", "test key")
    refused(mg(env, "customers", "list", "--profile", "nope"), 2, "no admin key", "nope")
    profiles.write_text("[staging\n")
    refused(mg(env, "customers", "list", "--profile", "staging"), 2, "not valid TOML", str(profiles))
