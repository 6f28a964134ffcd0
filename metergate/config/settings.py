"""One settings object, read once at start-up and passed explicitly.

Sources, highest priority first: keyword arguments (tests), ``METERGATE_*`` environment variables
(nested keys joined with ``__``, e.g. ``METERGATE_PRICING__ASSET``), then the YAML file named by
``METERGATE_CONFIG`` or ``--config``, in which ``${NAME}`` references are read from the environment
(:mod:`metergate.config.envrefs`: secrets stay out of the file). Every limit is a bounded field, and
cross-field rules are checked here so that a bad deployment fails at start-up with the offending key
named, never at the first request.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from contextvars import ContextVar
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from metergate.config.envrefs import EnvExpandingYamlSource, UnsetReference
from metergate.config.media import MediaSettings, is_multimodal_path
from metergate.config.realtime import RealtimeSettings
from metergate.config.routes import RouteSettings

Mode = Literal["test", "live"]
Role = Literal["sidecar", "control", "all"]
NonNegativeDecimal = Annotated[Decimal, Field(ge=0, max_digits=24, decimal_places=12)]
_ASSET_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
RESERVED_PREFIXES = ("/admin", "/portal", "/livez", "/readyz", "/metrics", "/webhooks")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# What the OpenAI, Anthropic and Google GenAI SDKs send from a browser (their x-stainless-* and x-goog-api-client
# telemetry included).
CORS_DEFAULT_HEADERS = ("authorization", "content-type", "accept", "x-api-key", "api-key", "anthropic-version",
                        "anthropic-beta", "anthropic-dangerous-direct-browser-access", "x-stainless-*",
                        "x-goog-api-key", "x-goog-api-client", "x-metergate-feature")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EscrowSettings(_Strict):
    """Escrow leases (metergate/wallet/escrow.py): a hot wallet is admitted in memory against a hold this
    process owns on it, so that a request costs the shared store one write (its settlement) instead of two."""

    enabled: bool = Field(True, description="Lease hot wallets (SQL stores; the Redis wallet admits in Redis).")
    hot_per_s: int = Field(20, ge=1, le=1_000_000,
                           description="A wallet is leased once one process sees this many holds on it a second.")
    horizon_s: float = Field(1.0, gt=0, le=60, description="A lease covers about this long of the wallet's "
                                                          "spend through this process.")
    share: int = Field(16, ge=2, le=1_000_000, description="A lease is at most 1/share of what the wallet has "
                                                         "available when it is taken or grown.")
    min_requests: int = Field(8, ge=1, le=1_000_000, description="A lease covering fewer requests than this is "
                              "not taken: such a wallet is served hold by hold.")
    ttl_s: float = Field(30, ge=1, le=3600, description="A lease's TTL, renewed while its process lives: how long "
                                                       "a crashed process's lease holds funds.")
    idle_s: float = Field(2, gt=0, le=3600, description="A lease unused this long is returned.")
    tick_s: float = Field(0.25, gt=0, le=60, description="How often leases are renewed, returned and checked "
                                                        "for recalls.")
    recall_wait_s: float = Field(2, ge=0, le=60, description="How long a request the shared store refused waits "
                                                            "for recalled leases to come back before its 402.")
    cooldown_s: float = Field(5, ge=0, le=3600, description="After a recall or a refused lease, the wallet is "
                                                           "served hold by hold this long.")


class AssetSettings(_Strict):
    code: str = Field(description="Asset code, e.g. USD, TOKENS, GPU_SECONDS.")
    name: str = Field("", description="Human name shown in the portal.")
    scale: int = Field(ge=0, le=12, description="Decimal places of the smallest unit (USD: 6 = micro-dollars).")
    value_per_unit: NonNegativeDecimal | None = Field(
        None, description="What one major unit is worth in value_currency, for margin reports (never for billing).")
    value_currency: str | None = Field(None, pattern=r"^[A-Z]{3}$", description="ISO code of value_per_unit.")

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        if not _ASSET_CODE.match(value):
            raise ValueError("asset code must be 1-32 letters, digits, '_' or '-', starting with a letter")
        return value


class MediaRates(_Strict):
    """Rates of the media endpoints' own units and token kinds (:mod:`metergate.metering.media_units`)."""

    audio_input_per_mtok: NonNegativeDecimal | None = Field(
        None, description="Rate for uncached audio input tokens (gpt-4o-transcribe, the Realtime API); defaults to "
                          "the input rate.")
    image_input_per_mtok: NonNegativeDecimal | None = Field(
        None, description="Rate for image input tokens (gpt-image-1 edits); defaults to the input rate.")
    per_audio_second: NonNegativeDecimal | None = Field(
        None, description="Per second of transcribed or translated audio, rounded up (whisper-1: 0.0001).")
    per_mchar: NonNegativeDecimal | None = Field(
        None, description="Per million characters of speech input (tts-1: 15, tts-1-hd: 30).")
    per_image: dict[str, NonNegativeDecimal] = Field(
        default_factory=dict,
        description="Per image, by 'WIDTHxHEIGHT' or 'WIDTHxHEIGHT/quality' (dall-e-3: {'1024x1024': '0.04', "
                    "'1024x1024/hd': '0.08'}); a size alone is quality 'standard'.")

    @field_validator("per_image")
    @classmethod
    def _image_keys(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        from metergate.metering.media_units import image_key_quantity

        quantities = [image_key_quantity(key) for key in value]
        if len(set(quantities)) != len(quantities):
            raise ValueError("per_image names one size and quality twice ('1024x1024' is '1024x1024/standard')")
        return value

    def media_quantities(self) -> dict[str, Decimal]:
        """The media units these rates price, per unit (quantity name -> rate), per_mchar per character."""
        from metergate.metering.media_units import AUDIO_SECONDS, CHARACTERS, image_key_quantity

        out = {image_key_quantity(key): rate for key, rate in self.per_image.items()}
        if self.per_audio_second is not None:
            out[AUDIO_SECONDS] = self.per_audio_second
        if self.per_mchar is not None:
            out[CHARACTERS] = self.per_mchar / Decimal(1_000_000)
        return out


class ModelRate(MediaRates):
    """Prices in the pricing asset's major unit: per million tokens, plus a per-request fee."""

    input_per_mtok: NonNegativeDecimal = Decimal(0)
    cached_input_per_mtok: NonNegativeDecimal | None = Field(
        None, description="Rate for cached prompt tokens; defaults to the input rate.")
    cache_write_per_mtok: NonNegativeDecimal | None = Field(
        None, description="Rate for prompt tokens written to a provider cache; defaults to the input rate.")
    output_per_mtok: NonNegativeDecimal = Decimal(0)
    request_fee: NonNegativeDecimal = Decimal(0)
    # Realtime API audio tokens (routes with realtime: true; audio input is MediaRates.audio_input_per_mtok);
    # unset, audio is priced as text.
    cached_audio_input_per_mtok: NonNegativeDecimal | None = Field(
        None, description="Rate for cached audio input tokens; defaults to the cached input rate.")
    audio_output_per_mtok: NonNegativeDecimal | None = Field(None, description="Rate for audio output tokens.")


class PricingSettings(_Strict):
    asset: str = Field("USD", description="The asset that proxy requests draw.")
    models: dict[str, ModelRate] = Field(
        default_factory=dict,
        description="Rates by model name; '*' is the fallback. A model matching nothing is refused.")
    refresh_interval_s: float = Field(
        5, gt=0, le=3600, description="How often each process reloads price versions published through the admin "
                                      "API (metergate/pricing); until one is in force, 'models' prices.")
    attribute_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Request headers that become pricing attributes of proxy requests, attribute name -> header "
                    "name (e.g. plan: X-Metergate-Plan). Only the app on a trusted network chooses them, as it does "
                    "the feature header; a proxy key's requests carry the key's own attributes and are refused "
                    "with these headers. Use X-Metergate-* names, which never reach the upstream.")

    @field_validator("attribute_headers")
    @classmethod
    def _attribute_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        reserved = {"type", "model", "endpoint", "route", "provider", "feature", "customer"}
        for name, header in headers.items():
            if name in reserved or not re.match(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$", name):
                raise ValueError(f"attribute_headers: {name!r} is not an attribute name metergate leaves free")
            if not re.match(r"^[A-Za-z0-9-]{1,64}$", header):
                raise ValueError(f"attribute_headers.{name}: {header!r} is not a header name")
        return headers


class CostRate(MediaRates):
    """A provider cost override in US dollars per million tokens (e.g. a self-hosted model), and per media
    unit (seconds, characters, images)."""

    input_per_mtok: NonNegativeDecimal = Decimal(0)
    cached_input_per_mtok: NonNegativeDecimal | None = None
    cache_write_per_mtok: NonNegativeDecimal | None = None
    output_per_mtok: NonNegativeDecimal = Decimal(0)


class RateLimit(_Strict):
    """Limits over fixed one-minute windows; a missing limit is no limit."""

    requests_per_minute: int | None = Field(None, ge=1, le=10**9, description="Requests admitted per minute.")
    tokens_per_minute: int | None = Field(
        None, ge=1, le=10**13,
        description="Tokens admitted per minute, counted at admission as estimated input + maximum output.")


class RateLimitSettings(_Strict):
    customer: RateLimit = Field(default_factory=RateLimit,
                                description="Default limits of every customer; the admin API overrides them "
                                            "per customer.")
    api_key: RateLimit = Field(default_factory=RateLimit, description="Limits of each proxy API key.")
    refresh_interval_s: float = Field(5, gt=0, le=3600,
                                      description="How often each replica reloads per-customer overrides and "
                                                  "prunes old windows.")


class WebhookSettings(_Strict):
    """Operator notifications through the durable outbox, signed as Standard Webhooks (metergate/webhooks)."""

    signing_secret: SecretStr | None = Field(
        None, description="Standard Webhooks signing secret: 'whsec_' and the base64 of 24 to 64 random bytes; "
                          "signs webhook-signature (none: only Metergate-Signature, from notify_secret).")
    retry_base_s: float = Field(5, gt=0, le=3600, description="First retry delay of a failed delivery; doubles.")
    retry_max_s: float = Field(3 * 3600, gt=0, le=86400, description="Longest retry delay of a failed delivery.")
    max_attempts: int = Field(20, ge=1, le=10_000,
                              description="Attempts before a notification is marked failed (defaults: about a day).")
    concurrency: int = Field(8, ge=1, le=64, description="Deliveries in flight at once per replica.")
    batch_size: int = Field(50, ge=1, le=1000, description="Due notifications one replica claims at a time.")
    timeout_s: float = Field(10, gt=0, le=120, description="Longest wait for the receiver's answer to one delivery.")
    lease_s: float = Field(60, gt=0, le=3600, description="How long a claimed notification is this replica's alone.")
    poll_interval_s: float = Field(1, gt=0, le=60, description="How often the delivery loop looks for due rows.")
    retention_days: int = Field(30, ge=1, le=3650, description="Delivered and failed notifications are kept this long.")

    @field_validator("signing_secret")
    @classmethod
    def _whsec(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        if not value.startswith("whsec_"):
            raise ValueError("must start with 'whsec_' (Standard Webhooks format)")
        try:
            key = base64.b64decode(value[6:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("after 'whsec_' must come base64") from None
        if not 24 <= len(key) <= 64:
            raise ValueError("must hold 24 to 64 bytes of key")
        return secret

    @model_validator(mode="after")
    def _timing(self) -> WebhookSettings:
        if self.retry_base_s > self.retry_max_s:
            raise ValueError("retry_base_s must not exceed retry_max_s")
        if self.timeout_s >= self.lease_s:
            raise ValueError("timeout_s must be shorter than lease_s, so that no lease runs out mid-delivery")
        return self


class BillingSettings(_Strict):
    """Invoiced usage to Stripe Billing as meter events (metergate/billing)."""

    meter_event_name: str = Field("metergate_usage", pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
                                  description="Stripe meter event_name of the pricing asset's usage.")
    meter_event_names: dict[str, str] = Field(
        default_factory=dict, description="event_name per other asset; an invoiced asset without one is not "
                                          "reported (shown as 'unmapped' in the reconciliation report).")
    report_interval_s: float = Field(5, gt=0, le=3600, description="How often the control plane sends meter events.")
    batch_size: int = Field(100, ge=1, le=1000, description="Outbox rows one replica leases at a time.")
    concurrency: int = Field(8, ge=1, le=64, description="Meter events in flight to Stripe at once per replica.")
    lease_s: float = Field(60, gt=0, le=3600, description="How long a leased batch is this replica's alone.")
    send_timeout_s: float = Field(20, gt=0, le=300, description="Longest wait for Stripe's answer to one event.")
    retry_base_s: float = Field(1, gt=0, le=3600, description="First retry delay of a failed event; doubles.")
    retry_max_s: float = Field(300, gt=0, le=86400, description="Longest retry delay of a failed event.")

    @field_validator("meter_event_names")
    @classmethod
    def _event_names(cls, names: dict[str, str]) -> dict[str, str]:
        for asset, name in names.items():
            if not re.match(r"^[A-Za-z0-9_.:-]{1,100}$", name):
                raise ValueError(f"meter_event_names[{asset}] must be 1-100 letters, digits or _ . : -")
        return names

    @model_validator(mode="after")
    def _timing(self) -> BillingSettings:
        if self.retry_base_s > self.retry_max_s:
            raise ValueError("retry_base_s must not exceed retry_max_s")
        if self.send_timeout_s >= self.lease_s:
            raise ValueError("send_timeout_s must be shorter than lease_s, so that no lease runs out mid-send")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERGATE_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    # Listener and identity.
    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the proxy listens on (0 = any free port).")
    listen_backlog: int = Field(1024, ge=16, le=65535, description="Pending-connection queue of the listener.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The event loop `metergate serve` runs on: uvloop (libuv; less CPU per request) "
                              "when installed, else asyncio's own, which `asyncio` also selects.")
    public_url: str = Field("", description="Base URL customers use to reach the portal; defaults to the listener.")
    database_url: str = Field("sqlite:///metergate.db",
                              description="sqlite:///path/file.db (embedded default) or postgresql://user@host/db")
    # The Redis real-time wallet over the SQL ledger (metergate/wallet/redis).
    redis_url: str | None = Field(None, description="redis://host:6379/0, redis+cluster://host:port or "
                                                    "redis+sentinel://host:port/service: holds and balances live "
                                                    "in Redis, the SQL database stays the ledger. Unset: SQL only.")
    redis_wallet: bool = Field(False, description="With redis_url: false (the default), wallets stay in the SQL "
                               "store, hot ones served from escrow leases, and Redis keeps only the rate-limit "
                               "windows; true, holds and balances live in Redis (Lua scripts) over the SQL ledger "
                               "(the Redis wallet: no grants, plans, subscriptions or hold API).")
    redis_key_prefix: str = Field("mg", pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
                                  description="Prefix of every Redis key (several deployments on one Redis).")
    redis_shards: int = Field(16, ge=1, le=4096, description="Event streams (hash slots) wallets spread over; "
                              "fixed for a deployment's lifetime.")
    redis_max_backlog: int = Field(200_000, ge=0, le=100_000_000,
                                   description="Events waiting for SQL per shard beyond which new holds get 503 "
                                               "ledger_backlog (bounds Redis memory while SQL is down); 0: no bound.")
    redis_sink_batch: int = Field(256, ge=1, le=10_000, description="Events one replica moves to SQL per batch.")
    redis_reconcile_interval_s: float = Field(30, gt=0, le=86400, description="How often one replica compares "
                                              "every wallet's projection with the ledger and rebuilds drifting ones.")
    redis_fail_open_requests: int = Field(0, ge=0, le=1_000_000,
                                          description="While Redis is unreachable, how many holds per customer (per "
                                                      "process) the SQL ledger may admit instead; 0: fail closed.")

    routes: list[RouteSettings] = Field(default_factory=list, description="Path prefix to upstream mapping.")

    # Who is paying.
    customer_header: str = Field("X-Metergate-Customer", description="Header naming the paying customer.")
    mode_header: str = Field("X-Metergate-Mode",
                             description="Header choosing test or live for header-identified customers.")
    default_mode: Mode = Field("live", description="Mode of header-identified customers without a mode header.")
    attribution_header: str = Field("X-Metergate-Feature",
                                    description="Optional feature/task label recorded with usage.")
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")],
        description="Source networks whose customer header (and feature and attribute headers) are trusted: the "
                    "app in the sidecar's own pod. Not all of 127.0.0.0/8: a service mesh's proxy delivers "
                    "inbound traffic from other loopback addresses (Istio: 127.0.0.6). [] trusts no one: "
                    "every client then needs a proxy key.")

    # Limits.
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
                                description="Largest request body accepted by endpoints that carry no media "
                                            "(completions, embeddings, compute, free endpoints).")
    max_body_bytes_multimodal: int = Field(
        32 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="Largest request body accepted by the endpoints whose prompts may carry base64 images, audio "
                    "and PDFs: chat completions, Responses, Anthropic Messages (and their token counting). "
                    "OpenAI accepts images up to 20 MB; base64 adds a third.")
    media: MediaSettings = Field(default_factory=MediaSettings,
                                 description="How images, audio and PDFs in prompts are estimated.")
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings,
                                       description="Metered Realtime API sessions (routes with realtime: true).")
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024,
                                    description="Largest upstream response relayed.")
    sse_max_event_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024,
                                     description="Largest single SSE event (or AWS event-stream frame) read from an "
                                                 "upstream.")
    upstream_connect_timeout_s: float = Field(10, gt=0, le=120, description="Connect timeout to an upstream.")
    upstream_read_timeout_s: float = Field(120, gt=0, le=3600,
                                           description="Longest silence between two reads from an upstream.")
    upstream_timeout_s: float = Field(600, gt=0, le=86400, description="Longest whole upstream exchange.")
    drain_timeout_s: float = Field(30, ge=0, le=600,
                                   description="After a client disconnects, how long to keep reading for usage.")
    drain_max_bytes: int = Field(16 * 1024 * 1024, ge=0, le=1024 * 1024 * 1024,
                                 description="After a client disconnects, how many bytes to keep reading for usage.")
    # Slow clients and hostile input (metergate/http.py, metergate/admin/validation.py).
    header_read_timeout_s: float = Field(10, gt=0, le=300,
                                         description="Longest a client may take to send a request's line and "
                                                     "headers, from its first byte (from the connection's start for "
                                                     "a new connection); then 408 request_timeout and the "
                                                     "connection is closed.")
    body_read_timeout_s: float = Field(60, gt=0, le=3600,
                                       description="Longest a client may take to send a whole request body, from "
                                                   "the end of its headers; then 408 request_timeout and the "
                                                   "connection is closed.")
    webhook_max_body_bytes: int = Field(256 * 1024, ge=1024, le=4 * 1024 * 1024,
                                        description="Largest webhook body read before its signature is checked "
                                                    "(the sender is not yet authenticated).")
    admin_auth_max_failures: int = Field(20, ge=1, le=1_000_000,
                                         description="Failed admin-key attempts one remote address may make per "
                                                     "admin_auth_window_s; beyond, 429 rate_limited with "
                                                     "Retry-After until the window ends.")
    admin_auth_window_s: float = Field(60, gt=0, le=86400,
                                       description="The window of admin_auth_max_failures.")
    admin_auth_tracked_addresses: int = Field(10_000, ge=16, le=1_000_000,
                                              description="Remote addresses the failed-admin-key throttle remembers "
                                                          "(the oldest are forgotten first; bounds its memory).")
    tokenizer_inline_max_bytes: int = Field(
        16 * 1024, ge=0, le=256 * 1024 * 1024,
        description="Request bodies up to this size have their prompt counted on the event loop. A larger one "
                    "must first be covered at one token per byte of prompt text (a token is at least a byte), "
                    "then is counted in the tokenizer's thread pool.")
    tokenizer_exact_max_bytes: int = Field(
        1024 * 1024, ge=0, le=256 * 1024 * 1024,
        description="Request bodies above this size are never tokenized: their prompt is estimated at one token "
                    "per byte of text (an upper bound; the provider's reported usage is what is billed).")
    request_max_output_tokens: int = Field(
        10_000_000, ge=1, le=1_000_000_000,
        description="Most output tokens one proxy request may ask for (max_tokens times n, or the default); "
                    "more is refused with 400 invalid_request before anything is priced or held.")
    tokenizer_threads: int = Field(2, ge=1, le=64, description="Threads that count large prompts "
                                                               "(tiktoken releases the GIL while encoding).")
    default_max_output_tokens: int = Field(
        4096, ge=1, le=10_000_000,
        description="Output tokens a request without a maximum is assumed to ask for: its rate-limit estimate, "
                    "quotes, and the hold when enforcement is off (stream_extend_tokens: 0) or the upstream "
                    "cannot stream (a route's unary_streaming: false).")
    initial_output_tokens: int = Field(
        256, ge=1, le=10_000_000,
        description="Output tokens the first hold covers when a request names no output limit, or one the "
                    "wallet cannot hold in full; the hold then grows by stream_extend_tokens as output flows "
                    "(non-streaming requests are streamed from the upstream internally). A wallet is refused "
                    "only when it cannot cover the prompt plus this much output.")
    stream_extend_tokens: int = Field(
        256, ge=0, le=10_000_000,
        description="Mid-stream enforcement: when a stream's output outgrows its hold, the hold grows by this "
                    "many output tokens at a time; when the wallet cannot cover more, the stream ends cleanly "
                    "and what was delivered is billed. 0 turns enforcement off (the overrun is captured as far "
                    "as the wallet covers and the rest written off).")
    hold_ttl_s: int = Field(900, ge=10, le=7 * 86400, description="A hold not settled by then expires.")
    escrow: EscrowSettings = Field(default_factory=EscrowSettings,
                                   description="Escrow leases on hot wallets (SQL stores).")
    sweep_interval_s: float = Field(30, gt=0, le=3600, description="How often expired holds are released.")
    settlement_spool_dir: str = Field("", description="A local directory (an emptyDir in Kubernetes) where "
                                      "settlements the store did not take are journaled before they are "
                                      "retried, so that a process killed meanwhile leaves them to the next one; "
                                      "empty: kept in memory only.")
    settlement_backlog_max: int = Field(
        10_000, ge=1, le=1_000_000, description="Settlements a proxy keeps and retries while the wallet store is "
                                                "down; when full, new requests get 503 settlement_backlog.")
    budget_alert_interval_s: float = Field(
        5, gt=0, le=3600, description="How often a proxy judges the budget alert rules of the customers whose "
                                      "requests settled since (metergate/budgets/alerts.py).")
    key_cache_ttl_s: float = Field(2, ge=0, le=300, description="How long a proxy API key lookup is cached.")
    drain_deadline_s: float = Field(25, ge=0, le=3600,
                                    description="On SIGTERM, how long in-flight requests and streams may run on "
                                                "before they are cut and settled.")

    # Deployment.
    role: Role = Field("all", description="sidecar: the proxy only; control: admin API, portal and hold sweeper; "
                                          "all: both (the embedded default).")
    tracing: Literal["auto", "off", "otlp"] = Field(
        "auto", description="OpenTelemetry spans of proxied requests, exported over OTLP/HTTP as the OTEL_* "
                            "variables configure it (needs the metergate[otel] extra). auto: on when "
                            "OTEL_TRACES_EXPORTER names otlp; OTEL_SDK_DISABLED=true turns it off in every mode.")
    tokenizer_preload: bool = Field(
        False, description="Load at start-up the tiktoken encodings of the price table's model families, instead "
                           "of on each family's first request (which then waits about 0.3-0.5 s, once per "
                           "process). Off by default: a sidecar pays for every encoding in every pod, and most "
                           "apps use one family (o200k_base costs about 45 MiB, cl100k_base about 20).")

    # Money.
    assets: list[AssetSettings] = Field(
        default_factory=lambda: [AssetSettings(code="USD", name="US dollar credits", scale=6)],
        description="Assets wallets can hold.")
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    cost_overrides: dict[str, CostRate] = Field(default_factory=dict,
                                                description="Provider cost per model, overriding genai-prices.")

    # Secrets.
    admin_keys: list[SecretStr] = Field(default_factory=list,
                                        description="Admin API bearer keys: mg_test_... or mg_live_...")
    portal_secrets: dict[str, SecretStr] = Field(
        default_factory=dict, description="Portal link HMAC keys by key id; the first signs, all verify.")
    portal_link_ttl_s: int = Field(3600, ge=60, le=30 * 86400, description="Lifetime of a signed portal link.")

    # Rate limits and the operator dashboard (metergate/proxy/ratelimit.py, metergate/reports).
    rate_limits: RateLimitSettings = Field(default_factory=RateLimitSettings,
                                           description="Requests and tokens per minute, per customer and per key.")
    dashboard_link_ttl_s: int = Field(300, ge=30, le=86400,
                                      description="Lifetime of a signed operator-dashboard link.")
    dashboard_session_ttl_s: int = Field(3600, ge=60, le=7 * 86400,
                                         description="Lifetime of the dashboard cookie a link sets.")

    # Payments and self-service (metergate/payments): Stripe per mode, top-ups, notifications.
    stripe_test_key: SecretStr | None = Field(None, description="Stripe secret key for test mode (sk_test_...).")
    stripe_live_key: SecretStr | None = Field(None, description="Stripe secret key for live mode (sk_live_...).")
    stripe_test_webhook_secret: SecretStr | None = Field(
        None, description="Signing secret (whsec_...) of the test-mode endpoint /webhooks/stripe/test.")
    stripe_live_webhook_secret: SecretStr | None = Field(
        None, description="Signing secret (whsec_...) of the live-mode endpoint /webhooks/stripe/live.")
    stripe_api_base: str = Field("", description="Override of Stripe's API address (tests: a local fake).")
    stripe_currency: str = Field("usd", pattern=r"^[a-z]{3}$",
                                 description="Currency of top-ups; credits the pricing asset (scale >= 2).")
    topup_min: Annotated[Decimal, Field(gt=0, le=10**6)] = Field(
        Decimal(5), description="Smallest top-up a customer may choose in the portal, in the major unit.")
    topup_max: Annotated[Decimal, Field(gt=0, le=10**6)] = Field(
        Decimal(1000), description="Largest top-up a customer may choose in the portal, in the major unit.")
    auto_topup_daily_cap: int = Field(3, ge=1, le=100, description="Automatic top-ups per wallet per UTC day.")
    auto_topup_interval_s: float = Field(30, gt=0, le=3600,
                                         description="How often the control plane checks auto top-up thresholds.")
    notify_url: str = Field("", description="Operator URL that receives signed event notifications (none: off).")
    notify_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key signing operator notifications.")
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings,
                                      description="Outbox, retries and Standard Webhooks signing of notifications.")
    portal_brand_name: str = Field("", max_length=80, description="Product name shown in the portal.")
    portal_logo_url: str = Field("", max_length=500, description="https URL of a logo shown in the portal.")
    portal_primary_color: str = Field("#1d2433", pattern=r"^#[0-9a-fA-F]{6}$", description="Portal header colour.")
    portal_accent_color: str = Field("#3558d6", pattern=r"^#[0-9a-fA-F]{6}$", description="Portal button colour.")
    portal_frame_ancestors: str = Field("'self'", max_length=500,
                                        description="CSP frame-ancestors of the portal (who may embed it).")
    billing: BillingSettings = Field(default_factory=BillingSettings,
                                     description="Invoiced customers' usage to Stripe Billing (meter events).")

    # CORS for browser clients of the proxy routes (the gateway case: proxy keys, never cookies).
    cors_allow_origins: list[str] = Field(
        default_factory=list, max_length=100,
        description="Origins (scheme://host[:port]) whose pages may call the proxy routes from a browser, or ['*']; "
                    "empty: no CORS answers, so browsers refuse cross-origin calls.")
    cors_allow_headers: list[str] = Field(
        default_factory=lambda: list(CORS_DEFAULT_HEADERS), max_length=100,
        description="Request headers such pages may send; a trailing '*' matches a prefix (x-stainless-*). Never "
                    "the customer or mode header: those are trusted only from the app's own address.")
    cors_max_age_s: int = Field(600, ge=0, le=86400, description="How long a browser may cache a preflight answer.")

    @field_validator("cors_allow_origins")
    @classmethod
    def _cors_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com (no path, no slash)")
        if "*" in origins and len(origins) > 1:
            raise ValueError("'*' allows every origin: list it alone")
        return origins

    @field_validator("cors_allow_headers")
    @classmethod
    def _cors_headers(cls, headers: list[str]) -> list[str]:
        for header in headers:
            if not re.match(r"^[A-Za-z0-9-]{1,64}\*?$", header):
                raise ValueError(f"{header!r} is not a header name (or a prefix ending in '*')")
        return [header.lower() for header in headers]

    @model_validator(mode="after")
    def _notify_signed(self) -> Settings:
        if self.notify_url and self.notify_secret is None and self.webhooks.signing_secret is None:
            raise ValueError("notify_url needs webhooks.signing_secret (whsec_...) or notify_secret: notifications "
                             "are always signed")
        return self

    @model_validator(mode="after")
    def _cors_credentials(self) -> Settings:
        for name in (self.customer_header, self.mode_header):
            lowered = name.lower()
            if any(lowered == h or (h.endswith("*") and lowered.startswith(h[:-1])) for h in self.cors_allow_headers):
                raise ValueError(f"cors_allow_headers must not allow {name}: browsers would send it from any page")
        return self

    @field_validator("admin_keys")
    @classmethod
    def _admin_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(keys):
            value = key.get_secret_value()
            if not re.match(r"^mg_(test|live)_[A-Za-z0-9_-]{16,}$", value):
                raise ValueError(f"admin_keys[{index}] must look like mg_test_<16+ chars> or mg_live_<16+ chars>")
        return keys

    @model_validator(mode="after")
    def _stripe_keys(self) -> Settings:
        for mode in ("test", "live"):
            key = getattr(self, f"stripe_{mode}_key")
            if key is not None and not re.match(rf"^(sk|rk)_{mode}_[A-Za-z0-9_]{{8,}}$", key.get_secret_value()):
                raise ValueError(f"stripe_{mode}_key must be a {mode}-mode secret key (sk_{mode}_...)")
        if self.topup_min > self.topup_max:
            raise ValueError("topup_min must not exceed topup_max")
        return self

    @field_validator("portal_secrets")
    @classmethod
    def _portal_secrets(cls, secrets: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for kid, secret in secrets.items():
            if not re.match(r"^[A-Za-z0-9_-]{1,32}$", kid):
                raise ValueError(f"portal_secrets key id {kid!r} must be 1-32 letters, digits, '_' or '-'")
            if len(secret.get_secret_value()) < 32:
                raise ValueError(f"portal_secrets[{kid}] must be at least 32 characters")
        return secrets

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        codes = [asset.code for asset in self.assets]
        if len(set(codes)) != len(codes):
            raise ValueError("assets: asset codes must be unique")
        if self.pricing.asset not in codes:
            raise ValueError(f"pricing.asset {self.pricing.asset!r} is not one of assets {codes}")
        for index, route in enumerate(self.routes):
            if route.compute is not None and route.compute.asset not in codes:
                raise ValueError(f"routes.{index}.compute.asset {route.compute.asset!r} is not one of assets {codes}")
        for code in self.billing.meter_event_names:
            if code not in codes:
                raise ValueError(f"billing.meter_event_names: {code!r} is not one of assets {codes}")
        prefixes = [route.prefix for route in self.routes]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("routes: two routes share a prefix")
        for route in self.routes:
            if any(route.prefix == p or route.prefix.startswith(p + "/") for p in RESERVED_PREFIXES):
                raise ValueError(f"routes: prefix {route.prefix!r} collides with metergate's own paths")
        if self.default_max_output_tokens > self.request_max_output_tokens:
            raise ValueError("default_max_output_tokens must not exceed request_max_output_tokens")
        if self.tokenizer_inline_max_bytes > self.tokenizer_exact_max_bytes:
            raise ValueError("tokenizer_inline_max_bytes must not exceed tokenizer_exact_max_bytes")
        drain = self.upstream_timeout_s + self.drain_timeout_s
        if self.hold_ttl_s <= drain:
            raise ValueError(f"hold_ttl_s ({self.hold_ttl_s}) must exceed upstream_timeout_s + drain_timeout_s "
                             f"({drain:g}) so that no live request loses its hold")
        if self.max_body_bytes_multimodal < self.max_body_bytes:
            raise ValueError(f"max_body_bytes_multimodal ({self.max_body_bytes_multimodal}) must be at least "
                             f"max_body_bytes ({self.max_body_bytes})")
        return self

    def max_body_bytes_for(self, path: str) -> int:
        """The body limit of a request to ``path``: ``max_body_bytes_multimodal`` for the endpoints whose
        prompts may carry media, ``max_body_bytes`` for the rest."""
        return self.max_body_bytes_multimodal if is_multimodal_path(path) else self.max_body_bytes

    def asset(self, code: str) -> AssetSettings:
        for asset in self.assets:
            if asset.code == code:
                return asset
        raise KeyError(code)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        import os

        # Precedence, highest first: arguments, METERGATE_* variables, the settings file, then the defaults of
        # the deployment (``serve --default KEY=VALUE``: the image listens on 0.0.0.0 unless told otherwise),
        # then the defaults written here.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get() or os.environ.get("METERGATE_CONFIG")
        if config_file:
            sources.append(EnvExpandingYamlSource(settings_cls, yaml_file=config_file))
        defaults = _DEPLOYMENT_DEFAULTS.get()
        if defaults:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=defaults))
        return tuple(sources)


_CONFIG_FILE: ContextVar[str | None] = ContextVar("metergate_config_file", default=None)
_DEPLOYMENT_DEFAULTS: ContextVar[dict[str, Any] | None] = ContextVar("metergate_deployment_defaults", default=None)


class SettingsError(Exception):
    """Raised when settings are invalid; the message names every offending key."""


def load_settings(config_file: str | Path | None = None, *, defaults: dict[str, Any] | None = None,
                  **overrides: Any) -> Settings:
    """Read and validate settings once, turning validation failures into one readable message.

    ``defaults`` rank below the settings file and the environment: a deployment's own defaults (the image's
    listen address) that any file or variable may still override."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"config file not found: {path}")
    # For this call only (a context variable, not the process environment: a later load must not
    # inherit this file).
    token = _CONFIG_FILE.set(str(config_file) if config_file is not None else None)
    defaults_token = _DEPLOYMENT_DEFAULTS.set(defaults)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "(settings)"
            lines.append(f"  {key}: {error['msg']}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
    except UnsetReference as exc:
        raise SettingsError(f"invalid settings:\n  {exc}") from None
    finally:
        _DEPLOYMENT_DEFAULTS.reset(defaults_token)
        _CONFIG_FILE.reset(token)
