"""The shipped dashboard and alert rules query only what metergate exports, parse as PromQL, and render from the chart.

Method: what metergate exports is read from :class:`metergate.observability.metrics.Metrics` itself (each
collector's name, type and label names), never listed here. Every PromQL expression — the dashboard's targets
with Grafana's variables substituted, and the PrometheusRule's ``expr`` as the chart renders it — is parsed by
``promql-parser`` (Prometheus's grammar, in Rust) and walked: each selector must name an exported series, each
label it matches must be one the metric carries (or one Prometheus adds when scraping), each literal label value
must occur in metergate's source, and each ``by`` label must exist below it. The dashboard is checked against a
JSON schema of the Grafana dashboard model's required fields, and must show every metric metergate exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import metergate
from metergate.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "metergate"
DASHBOARD = CHART / "dashboards" / "metergate.json"
RELEASE, NAMESPACE = "billing", "payments"
# Labels Prometheus (and the Prometheus Operator's relabelling) adds to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count")}


@dataclass(frozen=True, slots=True)
class Series:
    family: str
    labels: frozenset[str]


def exported() -> dict[str, Series]:
    """Every series name metergate's registry can expose, with the labels it carries."""
    series: dict[str, Series] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        [family] = collector.describe()
        labels = frozenset(collector._labelnames)
        for suffix in _SUFFIXES[family.type]:
            series[family.name + suffix] = Series(family.name, labels | ({"le"} if suffix == "_bucket" else set()))
    return series


EXPORTED = exported()
# Label values are literals in metergate's code (error codes, outcomes, reasons); a typo'd one matches nothing.
SOURCE_LITERALS = {m for path in Path(metergate.__file__).parent.rglob("*.py")
                   for m in re.findall(r'"([a-z0-9_]+)"', path.read_text())}


def selectors(node: promql_parser.Expr) -> Iterator[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
    yield from found


def check_promql(expr: str) -> set[str]:
    """Parse ``expr`` and check it against what metergate exports; return the metric families it reads."""
    tree = promql_parser.parse(expr)
    families: set[str] = set()
    for node in selectors(tree):
        assert node.name in EXPORTED, f"{node.name} is not a series metergate exports: {expr}"
        series = EXPORTED[node.name]
        families.add(series.family)
        for matcher in node.matchers.matchers:
            assert matcher.name in series.labels | TARGET_LABELS, f"{node.name} has no label {matcher.name}"
            if matcher.name in series.labels and matcher.name != "le":
                values = matcher.value.split("|") if matcher.op == promql_parser.MatchOp.Re else [matcher.value]
                for value in values:
                    known = re.fullmatch("[1-5]xx", value) if matcher.name == "status_class" \
                        else value in SOURCE_LITERALS
                    assert known, f"{matcher.name}={value!r} never occurs in metergate: {expr}"

    def grouping(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            below = set().union(*(EXPORTED[s.name].labels for s in selectors(node.expr))) | TARGET_LABELS
            assert set(node.modifier.labels) <= below, f"grouping by a label no series below has: {expr}"

    promql_parser.walk(tree, grouping)
    assert families, f"queries no metergate metric: {expr}"
    return families


@pytest.mark.parametrize("expr, complaint", [
    ("sum(rate(metergate_request_total[5m]))", "not a series metergate exports"),  # misspelt
    ("metergate_open_holds_total", "not a series metergate exports"),  # a gauge has no _total
    ('sum(rate(metergate_requests_total{status="5xx"}[5m]))', "has no label status"),
    ('sum(rate(metergate_requests_total{outcome="settlement_fail"}[5m]))', "never occurs in metergate"),
    ('sum(rate(metergate_unavailable_total{reason=~"ledger_backlog|wallet_down"}[5m]))', "never occurs"),
    ("sum by (asset) (rate(metergate_requests_total[5m]))", "grouping by a label"),
    ("vector(1)", "queries no metergate metric"),
    ("sum(rate(metergate_requests_total[5m])", "expected|unclosed|parenthes|EOF|unexpected"),
])
def test_the_promql_check_has_teeth(expr: str, complaint: str) -> None:
    with pytest.raises((AssertionError, ValueError), match=complaint):
        check_promql(expr)


# The Grafana dashboard model (https://grafana.com/docs/grafana/latest/dashboards/build-dashboards/
# view-dashboard-json-model/): the fields a dashboard and its panels need to import and lay out.
_GRID = {"type": "object", "required": ["h", "w", "x", "y"],
         "properties": {"h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                        "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}}
_DATASOURCE = {"type": "object", "required": ["type", "uid"],
               "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}}}
_TARGET = {"type": "object", "required": ["refId", "expr"],
           "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "expr": {"type": "string", "minLength": 1},
                          "datasource": _DATASOURCE, "legendFormat": {"type": "string"}}}
_PANEL = {"type": "object", "required": ["id", "type", "title", "gridPos"],
          "properties": {"id": {"type": "integer", "minimum": 1}, "title": {"type": "string", "minLength": 1},
                         "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "text"]},
                         "gridPos": _GRID, "datasource": _DATASOURCE, "description": {"type": "string"},
                         "targets": {"type": "array", "items": _TARGET}},
          "if": {"properties": {"type": {"not": {"const": "row"}}}},
          "then": {"required": ["datasource", "targets", "description"],
                   "properties": {"targets": {"minItems": 1}}}}
DASHBOARD_SCHEMA = {
    "type": "object", "required": ["title", "uid", "schemaVersion", "panels", "time", "templating"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},  # Grafana 9+: datasources by uid
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z_]+$"},
                           "type": {"enum": ["query", "datasource", "custom", "interval", "constant"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL}}}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str, variables: set[str]) -> str:
    """Grafana's variables as Prometheus would receive them; an undefined one fails the test."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables | GRAFANA_BUILTINS, f"undefined dashboard variable ${name}: {expr}"
        return "5m" if name in GRAFANA_BUILTINS else ".*"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def test_dashboard_fits_the_grafana_dashboard_model() -> None:
    dashboard = load_dashboard()
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_parse_and_show_every_metric_metergate_exports() -> None:
    dashboard = load_dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    shown: set[str] = set()
    for expr in dashboard_exprs(dashboard):
        expr = substitute(expr, variables)
        if expr.startswith("label_values("):  # Grafana's variable query: label_values(<selector>, <label>)
            selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", expr).groups()  # type: ignore[union-attr]
            assert label in TARGET_LABELS
            expr = selector
        shown |= check_promql(expr)
    assert shown == {s.family for s in EXPORTED.values()}  # a new metric needs a panel too


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    loaded = helm_python.Chart.load(CHART)
    yield loaded
    loaded.close()


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(rendered.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def test_chart_ships_the_dashboard_for_grafanas_sidecar(chart: helm_python.Chart) -> None:
    objects = render(chart, {"metrics": {"dashboard": {"enabled": True}}})
    [config_map] = [o for o in objects if o["metadata"]["name"] == f"{RELEASE}-metergate-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["metergate.json"]) == load_dashboard()
    assert not [o for o in render(chart, {}) if o["metadata"]["name"].endswith("-dashboard")]


ALERTS = {"MetergateWalletStoreUnavailable", "MetergateLedgerBacklog", "MetergateHoldsExpiring",
          "MetergateWriteOffs", "MetergateServerErrors", "MetergateUpstreamLatencyHigh", "MetergateSettlementsUnbilled",
          "MetergateSettlementBacklog"}


def rules(chart: helm_python.Chart, **rule_values: Any) -> list[dict[str, Any]]:
    objects = render(chart, {"metrics": {"prometheusRule": {"enabled": True, **rule_values}}})
    [rule] = [o for o in objects if o["kind"] == "PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def grouping_labels(tree: promql_parser.Expr) -> set[str]:
    kept: set[str] = set()
    promql_parser.walk(tree, lambda n: kept.update(n.modifier.labels) if isinstance(
        n, promql_parser.AggregateExpr) and n.modifier is not None else None)
    return kept


@pytest.mark.parametrize("selector, matcher", [
    ("", ("namespace", promql_parser.MatchOp.Equal, NAMESPACE)),
    ('job=~"billing-metergate-.*"', ("job", promql_parser.MatchOp.Re, "billing-metergate-.*")),
])
def test_alert_rules_parse_query_what_metergate_exports_and_stay_in_their_installation(
        chart: helm_python.Chart, selector: str, matcher: tuple[str, promql_parser.MatchOp, str]) -> None:
    rendered = rules(chart, selector=selector)
    assert {r["alert"] for r in rendered} == ALERTS and len(rendered) == len(ALERTS)
    for rule in rendered:
        check_promql(rule["expr"])
        tree = promql_parser.parse(rule["expr"])
        for found in selectors(tree):  # every selector is scoped: one release's alerts never see another's
            assert matcher in [(m.name, m.op, m.value) for m in found.matchers.matchers], rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"]
        # The runbook is the README paragraph whose heading is the alert's name (GitHub's anchor for it).
        assert annotations["runbook_url"] == (
            "https://github.com/metergate/metergate/blob/main/README.md#" + rule["alert"].lower())
        # A label an annotation prints must survive the expression's aggregation.
        kept = grouping_labels(tree)
        printed = set(re.findall(r"\$labels\.(\w+)", annotations["summary"] + annotations["description"]))
        assert printed <= kept - {"le"}, rule["alert"]


def test_alert_thresholds_come_from_values(chart: helm_python.Chart) -> None:
    by_name = {r["alert"]: r for r in rules(chart, serverErrorRatio=0.2, upstreamLatencyP99Seconds=90,
                                           runbookBaseUrl="https://wiki.example.com/metergate")}
    for alert, threshold in (("MetergateServerErrors", 0.2), ("MetergateUpstreamLatencyHigh", 90)):
        tree = promql_parser.parse(by_name[alert]["expr"])
        assert isinstance(tree, promql_parser.BinaryExpr) and isinstance(tree.rhs, promql_parser.NumberLiteral)
        assert tree.rhs.val == threshold
    assert by_name["MetergateWriteOffs"]["annotations"]["runbook_url"] == (
        "https://wiki.example.com/metergate#metergatewriteoffs")
