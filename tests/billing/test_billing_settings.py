"""The billing settings block is validated at start-up like every other: each bad value names its key.

Method: ``load_settings`` with one bad value at a time (table-driven), and a good block read back.
"""

from __future__ import annotations

from typing import Any

import pytest

from metergate.config.settings import SettingsError, load_settings


@pytest.mark.parametrize(("billing", "named"), [
    ({"meter_event_names": {"EUR": "eur_usage"}}, "'EUR' is not one of assets"),  # unknown asset
    ({"meter_event_names": {"USD": "has spaces"}}, "billing.meter_event_names"),
    ({"meter_event_name": ""}, "billing.meter_event_name"),
    ({"retry_base_s": 0}, "billing.retry_base_s"),
    ({"retry_base_s": 10, "retry_max_s": 5}, "retry_base_s must not exceed retry_max_s"),
    ({"send_timeout_s": 30, "lease_s": 30}, "send_timeout_s must be shorter than lease_s"),
    ({"batch_size": 0}, "billing.batch_size"),
    ({"surprise": 1}, "billing.surprise"),
])
def test_bad_billing_settings_stop_start_up_naming_the_key(billing: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(billing=billing)
    assert named in str(caught.value)


def test_billing_settings_are_read() -> None:
    settings = load_settings(assets=[{"code": "USD", "scale": 6}, {"code": "GPU_SECONDS", "scale": 3}],
                             billing={"meter_event_name": "usd_usage", "meter_event_names": {"GPU_SECONDS": "gpu"},
                                      "report_interval_s": 2})
    assert settings.billing.meter_event_name == "usd_usage"
    assert settings.billing.meter_event_names == {"GPU_SECONDS": "gpu"} and settings.billing.report_interval_s == 2
