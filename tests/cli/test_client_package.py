"""metergate-client stands alone: its distribution needs only httpx2, importing it loads nothing of the server,
and its public surface is deliberate (pinned here, as httpx pins its own).

Method: read the client's pyproject.toml; import the package in a fresh interpreter and list what it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import metergate_client
from tests.cli.server import ROOT


def test_the_distribution_depends_only_on_httpx2() -> None:
    project = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["dependencies"]) == ("metergate-client", ["httpx2>=2.0"])


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    code = "import json, sys, metergate_client; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True, cwd=ROOT).stdout))
    assert "httpx2" in loaded
    assert not loaded & {"metergate", "aiohttp", "sqlalchemy", "pydantic", "openai", "stripe", "redis"}


def test_the_public_surface_is_pinned() -> None:
    assert set(metergate_client.__all__) == {
        "ApiError", "ApiKey", "Asset", "AsyncClient", "AsyncEventBatcher", "AsyncJob", "AuthenticationFailed",
        "Balance", "Client", "Conflict", "ConnectionFailed", "Credit", "Customer", "EventBatcher", "EventResult",
        "Grant", "Heartbeat", "Hold", "IdempotencyConflict", "InsufficientFunds", "InvalidRequest", "Job",
        "LedgerEntry", "Link", "MetergateError", "NotFound", "Page", "PermissionDenied", "Preflight", "Profile",
        "ProfileError", "QueueFull", "Quote", "RateLimited", "RetryPolicy", "ServerError", "Tally", "UsageRecord",
        "error_from_response", "load_profile",
        # budgets
        "BudgetAlertRule", "BudgetLimit", "BudgetLimitUse", "BudgetNode", "BudgetNodeView", "BudgetTree",
        "BudgetWindow", "Deleted", "FiredBudgetAlert", "KeyAttachment"}
    assert all(hasattr(metergate_client, name) for name in metergate_client.__all__)
    assert issubclass(metergate_client.IdempotencyConflict, metergate_client.Conflict)
    assert all(issubclass(getattr(metergate_client, n), metergate_client.MetergateError)
               for n in ("ApiError", "ConnectionFailed", "ProfileError", "QueueFull"))
