"""Settings are validated once at start-up, from YAML and METERGATE_* variables, with errors naming the key.

Method: write real YAML files and environment variables, load them through ``load_settings`` and the
``metergate serve`` command, and read the messages a deployer would see.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from metergate.config.settings import SettingsError, load_settings

YAML = """
port: 9100
database_url: sqlite:///{db}
routes:
  - prefix: /openai
    upstream: https://api.openai.com
    api_key: sk-from-yaml
pricing:
  asset: USD
  models:
    gpt-4o-mini: {{input_per_mtok: "0.30", output_per_mtok: "1.20"}}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERGATE_CONFIG", raising=False)


def test_yaml_file_is_read_and_environment_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "metergate.yaml"
    config.write_text(YAML.format(db=tmp_path / "m.db"))
    monkeypatch.setenv("METERGATE_PORT", "9200")
    monkeypatch.setenv("METERGATE_PRICING__ASSET", "USD")
    settings = load_settings(config)
    assert settings.port == 9200
    assert settings.routes[0].api_key is not None
    assert settings.routes[0].api_key.get_secret_value() == "sk-from-yaml"
    assert "sk-from-yaml" not in repr(settings)
    assert str(settings.pricing.models["gpt-4o-mini"].output_per_mtok) == "1.20"


@pytest.mark.parametrize(("overrides", "key"), [
    # limits
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"port": 70000}, "port"),
    # routes
    ({"routes": [{"prefix": "openai", "upstream": "https://x"}]}, "routes.0.prefix"),
    ({"routes": [{"prefix": "/o", "upstream": "ftp://x"}]}, "routes.0.upstream"),
    ({"routes": [{"prefix": "/admin", "upstream": "https://x"}]}, "collides"),
    ({"routes": [{"prefix": "/o", "upstream": "https://x"}, {"prefix": "/o", "upstream": "https://y"}]},
     "share a prefix"),
    # money
    ({"pricing": {"asset": "EUR"}}, "pricing.asset"),
    ({"pricing": {"models": {"m": {"input_per_mtok": "-1"}}}}, "pricing.models.m.input_per_mtok"),
    ({"assets": [{"code": "USD", "scale": 6}, {"code": "USD", "scale": 2}]}, "unique"),
    # cross-field and secrets
    ({"hold_ttl_s": 60, "upstream_timeout_s": 600}, "hold_ttl_s"),
    ({"admin_keys": ["short"]}, "admin_keys"),
    ({"portal_secrets": {"k1": "too-short"}}, "portal_secrets"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_invalid_settings_name_the_offending_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(**overrides)
    assert key in str(error.value)


def test_serve_refuses_a_bad_config_file_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("port: not-a-number\nroutes: []\n")
    result = subprocess.run([sys.executable, "-m", "metergate", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port" in result.stderr and "Traceback" not in result.stderr
