"""The webhook settings are validated at start-up with the key named: the signing secret is a Standard
Webhooks ``whsec_`` secret, the retry timing is consistent, and a ``notify_url`` is never unsigned.

Method: ``load_settings`` with each bad value, reading the message a deployer would see.
"""

from __future__ import annotations

import base64

import pytest

from metergate.config.settings import SettingsError, load_settings
from tests.webhooks.conftest import SIGNING_SECRET


@pytest.mark.parametrize(("overrides", "key"), [
    # the signing secret
    ({"webhooks": {"signing_secret": "not-a-whsec"}}, "webhooks.signing_secret"),
    ({"webhooks": {"signing_secret": "whsec_not base64!"}}, "webhooks.signing_secret"),
    ({"webhooks": {"signing_secret": "whsec_" + base64.b64encode(b"short").decode()}}, "webhooks.signing_secret"),
    # timing and limits
    ({"webhooks": {"retry_base_s": 60, "retry_max_s": 10}}, "retry_base_s"),
    ({"webhooks": {"timeout_s": 90, "lease_s": 60}}, "timeout_s"),
    ({"webhooks": {"max_attempts": 0}}, "webhooks.max_attempts"),
    ({"webhooks": {"concurrency": 1000}}, "webhooks.concurrency"),
    # a receiver is always sent signed notifications
    ({"notify_url": "http://127.0.0.1:3000/hooks"}, "notify_url"),
])
def test_invalid_webhook_settings_name_the_offending_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(**overrides)
    assert key in str(error.value)


@pytest.mark.parametrize("secrets", [{"webhooks": {"signing_secret": SIGNING_SECRET}},
                                     {"notify_secret": "legacy-" + "x" * 30}])
def test_notify_url_with_either_secret_is_accepted(secrets: dict[str, object]) -> None:
    settings = load_settings(notify_url="http://127.0.0.1:3000/hooks", **secrets)
    assert settings.notify_url and SIGNING_SECRET not in repr(settings)
