"""metergate-client: Python client of metergate's admin API, holds for GPU jobs and agents, and usage events.

    from metergate_client import Client

    with Client.from_profile() as mg:                       # or Client(url, admin_key)
        mg.credit("acme", "25.00", idempotency_key="invoice-1042")
        with mg.hold("acme", estimate="30", asset="GPU_SECONDS", ttl_s=120) as job:
            while not job.heartbeat(step()).stop: ...
        mg.events.send("acme", "agent.tool_call", quantity=1)

Sync (:class:`Client`) and async (:class:`AsyncClient`) share every call (:mod:`metergate_client.calls`).
"""

from metergate_client.aio import AsyncClient
from metergate_client.batcher import AsyncEventBatcher, EventBatcher, QueueFull, Tally
from metergate_client.client import Client
from metergate_client.errors import (
    ApiError,
    AuthenticationFailed,
    Conflict,
    ConnectionFailed,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    MetergateError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    error_from_response,
)
from metergate_client.jobs import AsyncJob, Job
from metergate_client.models import (
    ApiKey,
    Asset,
    Balance,
    BudgetAlertRule,
    BudgetLimit,
    BudgetLimitUse,
    BudgetNode,
    BudgetNodeView,
    BudgetTree,
    BudgetWindow,
    Credit,
    Customer,
    Deleted,
    EventResult,
    FiredBudgetAlert,
    Grant,
    Heartbeat,
    Hold,
    KeyAttachment,
    LedgerEntry,
    Link,
    Page,
    Preflight,
    Quote,
    UsageRecord,
)
from metergate_client.profiles import Profile, ProfileError, load_profile
from metergate_client.transport import RetryPolicy

__all__ = [
    "ApiError", "ApiKey", "Asset", "AsyncClient", "AsyncEventBatcher", "AsyncJob", "AuthenticationFailed", "Balance",
    "BudgetAlertRule", "BudgetLimit", "BudgetLimitUse", "BudgetNode", "BudgetNodeView", "BudgetTree", "BudgetWindow",
    "Client", "Conflict", "ConnectionFailed", "Credit", "Customer", "Deleted", "EventBatcher", "EventResult",
    "FiredBudgetAlert", "Grant",
    "Heartbeat", "Hold", "IdempotencyConflict", "InsufficientFunds", "InvalidRequest", "Job", "KeyAttachment",
    "LedgerEntry", "Link",
    "MetergateError", "NotFound", "Page", "PermissionDenied", "Preflight", "Profile", "ProfileError", "QueueFull",
    "Quote", "RateLimited", "RetryPolicy", "ServerError", "Tally", "UsageRecord", "error_from_response",
    "load_profile",
]
