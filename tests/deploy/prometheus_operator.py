"""Schemas for the two Prometheus Operator kinds the chart renders (``monitoring.coreos.com/v1``), cut down to
the fields the chart uses and closed (``additionalProperties: false``) like ``kubernetes-validate --strict``:
kubernetes-validate knows only core kinds, not CRDs.

Field names, types and the duration pattern are those of the operator's CRDs (``ServiceMonitor``'s
``spec.endpoints[]``, ``PrometheusRule``'s ``spec.groups[].rules[]``, ``monitoringv1.Duration``).
"""

from __future__ import annotations

from typing import Any

import jsonschema

# monitoringv1.Duration, as the CRDs declare it.
DURATION = {"type": "string",
            "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_DNS_NAME = {"type": "string", "maxLength": 253,
             "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "additionalProperties": False, "required": ["name"],
             "properties": {"name": _DNS_NAME, "namespace": _DNS_NAME, "labels": _STRING_MAP,
                            "annotations": _STRING_MAP}}


def _kind(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


SERVICE_MONITOR = _kind("ServiceMonitor", {
    "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
    "properties": {
        "selector": {"type": "object", "additionalProperties": False,
                     "properties": {"matchLabels": _STRING_MAP}, "required": ["matchLabels"]},
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"},
                                             "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["port"],
            "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                           "scheme": {"enum": ["http", "https"]}, "interval": DURATION,
                           "scrapeTimeout": DURATION}}}}})

PROMETHEUS_RULE = _kind("PrometheusRule", {
    "type": "object", "additionalProperties": False, "required": ["groups"],
    "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "rules"],
        "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": DURATION,
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                               "expr": {"type": "string", "minLength": 1}, "for": DURATION,
                               "labels": _STRING_MAP, "annotations": _STRING_MAP}}}}}}}})

SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


def is_operator_kind(obj: dict[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith("monitoring.coreos.com/")


def validate(obj: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` fits the fields this chart uses of its kind."""
    jsonschema.validate(obj, SCHEMAS[obj["kind"]])
