"""Margin reports and usage exports group by budget node: each usage record carries the path it was charged
along, the margin report's ``group_by=budget_node`` sums per "<customer>:<path>", and exports carry the path.

Method: a real gateway (SQLite) and the mock upstream; requests from the app name their nodes; the report
and the export are read over the admin API and compared with the usage records.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from typing import Any

from tests.conftest import Gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


async def test_the_margin_report_and_the_export_group_by_node(gateway: Gateway) -> None:
    await gateway.customer("acme", funds=1_000_000)
    for node in ({"id": "p", "kind": "project"}, {"id": "a1", "kind": "agent", "parent_id": "p"}):
        assert (await gateway.admin.post("/customers/acme/budget-nodes", json=node)).status_code == 201
    client = gateway.openai()
    for name in ("a1", "a1", "p", None):
        headers = {"X-Metergate-Budget-Node": name} if name else {}
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5,
                                             extra_headers=headers)
    records = await gateway.usage()
    charged: Counter[str] = Counter()
    for record in records:
        charged[f"acme:{record['budget_path']}"] += record["charged_amount"]
    assert set(charged) == {"acme:root/p/a1", "acme:root/p", "acme:root"}
    r = await gateway.admin.get("/reports/margin", params={"group_by": "budget_node", "from": "2000-01-01"})
    assert r.status_code == 200, r.text
    rows = {row["key"]: row for row in r.json()["data"]}
    assert {key: row["charged"] for key, row in rows.items()} == dict(charged)
    assert rows["acme:root/p/a1"]["requests"] == 2
    export = await gateway.admin.get("/exports/usage", params={"from": "2000-01-01", "format": "csv"})
    assert export.status_code == 200, export.text
    exported = list(csv.DictReader(io.StringIO(export.text)))
    assert Counter(row["budget_path"] for row in exported) == Counter(
        {"root/p/a1": 2, "root/p": 1, "root": 1})
