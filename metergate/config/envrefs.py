"""Secrets by reference: ``${NAME}`` in the YAML settings file is replaced by the environment variable NAME.

A settings file lives in a ConfigMap or a repository, where secrets must not; the secrets themselves
come from the environment (a Kubernetes ``secretKeyRef``, a vault agent, ...). Only whole references of
the form ``${NAME}`` inside string values are expanded, ``$${`` is a literal ``${``, and nothing else
changes (no defaults, no shell syntax), so that a value can never expand into more than one key. A
reference to an unset variable stops start-up with the key and the variable named — never the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic_settings import YamlConfigSettingsSource

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class UnsetReference(ValueError):
    """A ``${NAME}`` reference whose variable is not set."""


def expand(value: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Return ``value`` with every ``${NAME}`` in its strings replaced from ``environ``."""
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "${"
            if name not in environ:
                raise UnsetReference(f"{path or '(settings)'}: environment variable {name} is not set")
            return environ[name]

        return _REFERENCE.sub(replace, value)
    if isinstance(value, dict):
        return {key: expand(item, environ, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, environ, f"{path}.{index}" if path else str(index)) for index, item in enumerate(value)]
    return value


class EnvExpandingYamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source with ``${NAME}`` references expanded from the process environment."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        import os

        data = super()._read_file(file_path if not isinstance(file_path, str) else Path(file_path))
        expanded: dict[str, Any] = expand(data, os.environ)
        return expanded
