"""Secrets by reference: ``${NAME}`` in the settings file is read from the environment, and nothing else changes.

Method: expand hand-made structures directly, then load real YAML files through ``load_settings`` with the
variables set and unset, as a Kubernetes pod with ``secretKeyRef`` variables would.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metergate.config.envrefs import UnsetReference, expand
from metergate.config.settings import SettingsError, load_settings

ENV = {"KEY": "sk-value", "EMPTY": ""}


@pytest.mark.parametrize("value, expected", [
    ("${KEY}", "sk-value"),
    ("Bearer ${KEY}!", "Bearer sk-value!"),
    ("${EMPTY}", ""),
    ("$${KEY}", "${KEY}"),  # escaped
    ("$KEY and ${ KEY } and ${1X}", "$KEY and ${ KEY } and ${1X}"),  # not references: left alone
    ({"a": ["${KEY}", 3, None, True]}, {"a": ["sk-value", 3, None, True]}),
])
def test_expand(value: object, expected: object) -> None:
    assert expand(value, ENV) == expected


def test_an_unset_variable_names_the_key_and_the_variable() -> None:
    with pytest.raises(UnsetReference, match=r"^routes\.1\.api_key: environment variable NOPE is not set$"):
        expand({"routes": [{}, {"api_key": "${NOPE}"}]}, ENV)


YAML = """
routes:
  - prefix: /openai
    upstream: https://api.openai.com
    api_key: ${TEST_ENVREFS_PROVIDER_KEY}
admin_keys: ["${TEST_ENVREFS_ADMIN_KEY}"]
portal_secrets: {k1: "${TEST_ENVREFS_PORTAL}"}
"""


def test_settings_file_reads_secrets_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "metergate.yaml"
    config.write_text(YAML)
    monkeypatch.setenv("METERGATE_CONFIG", str(config))
    monkeypatch.setenv("TEST_ENVREFS_PROVIDER_KEY", "sk-from-a-secret-0123456789")
    monkeypatch.setenv("TEST_ENVREFS_ADMIN_KEY", "mg_live_" + "a" * 20)
    monkeypatch.setenv("TEST_ENVREFS_PORTAL", "p" * 40)
    settings = load_settings(config)
    assert settings.routes[0].api_key is not None
    assert settings.routes[0].api_key.get_secret_value() == "sk-from-a-secret-0123456789"
    assert settings.admin_keys[0].get_secret_value() == "mg_live_" + "a" * 20
    assert settings.portal_secrets["k1"].get_secret_value() == "p" * 40

    monkeypatch.delenv("TEST_ENVREFS_PORTAL")
    with pytest.raises(SettingsError) as caught:
        load_settings(config)
    assert "portal_secrets.k1: environment variable TEST_ENVREFS_PORTAL is not set" in str(caught.value)
    assert "sk-from-a-secret" not in str(caught.value)
