"""Rate-limit quota claims in Redis: one Lua script per claim, the rule of :mod:`metergate.wallet.quota`.

Why Redis: windows shared by many replicas are short-lived counters, which is what Redis is for; with
leases (:mod:`metergate.proxy.leases`) a replica calls it once per chunk of requests, not per request.

Keys: ``P:{s}:rl:<mode>:<subject>:<window_start_ms>``, a hash of ``r`` (requests claimed) and ``t`` (tokens
claimed), where ``{s}`` is the shard hash tag of the customer the request belongs to, so that a customer's
window and its API keys' windows share one Redis Cluster slot and one script claims them all or none. Each
expires a few minutes after its window, so nothing needs pruning. The script checks every subject before
it writes any (a Lua script's writes are not rolled back by a later error), and writes with ``HINCRBY``.
Amounts stay below 2**53 (limits are at most 10**13), where Lua's doubles are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from metergate.wallet.models import Mode, RateLimitDenial
from metergate.wallet.quota import TAPER, QuotaClaim, QuotaGrant

if TYPE_CHECKING:
    from metergate.wallet.redis.keyspace import KeySpace


class WindowStore(Protocol):
    """What the claims need of a store: its key space and its registered scripts (``RL_CLAIM``,
    ``RL_RELEASE``): the Redis wallet, or the SQL wallet with its windows in Redis."""

    keys: KeySpace

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any: ...

KEEP_MS = 3 * 60_000  # a window's key outlives its minute by two more

# KEYS: one window hash per subject. ARGV: expire-at ms, taper, then per subject rpm, tpm (-1: no limit),
# need_r, want_r, need_t, want_t. Returns {'ok', granted_r, granted_t, claimed_r, claimed_t, ...} or
# {'deny', subject index (1-based), 'requests'|'tokens', limit, claimed}.
CLAIM = """
local taper = tonumber(ARGV[2])
local function grant(limit, claimed, need, want)
  if limit < 0 then return 0 end
  local remaining = limit - claimed
  if need > remaining then return nil end
  local g = math.floor(remaining / taper)
  if want < g then g = want end
  if need > g then g = need end
  return g
end
local out = {'ok'}
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 6
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local w = redis.call('HMGET', KEYS[i], 'r', 't')
  local cr, ct = tonumber(w[1]) or 0, tonumber(w[2]) or 0
  local gr = grant(rpm, cr, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]))
  if gr == nil then return {'deny', i, 'requests', rpm, cr} end
  local gt = grant(tpm, ct, tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]))
  if gt == nil then return {'deny', i, 'tokens', tpm, ct} end
  table.insert(out, gr); table.insert(out, gt); table.insert(out, cr + gr); table.insert(out, ct + gt)
end
for i = 1, #KEYS do
  local gr, gt = out[2 + (i - 1) * 4], out[3 + (i - 1) * 4]
  if gr > 0 or gt > 0 then
    redis.call('HINCRBY', KEYS[i], 'r', gr)
    redis.call('HINCRBY', KEYS[i], 't', gt)
    redis.call('PEXPIREAT', KEYS[i], ARGV[1])
  end
end
return out
"""

# KEYS: window hashes. ARGV: per key requests, tokens to give back. A window that expired is left alone.
RELEASE = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local w = redis.call('HMGET', KEYS[i], 'r', 't')
    local r = math.min(tonumber(ARGV[2 * i - 1]), tonumber(w[1]) or 0)
    local t = math.min(tonumber(ARGV[2 * i]), tonumber(w[2]) or 0)
    -- 0 - x, not -x: Lua's -0 would reach Redis as "-0", which HINCRBY refuses
    if r > 0 then redis.call('HINCRBY', KEYS[i], 'r', 0 - r) end
    if t > 0 then redis.call('HINCRBY', KEYS[i], 't', 0 - t) end
  end
end
return 1
"""


def window_key(store: WindowStore, mode: Mode, customer_id: str, subject: str, window_start_ms: int) -> str:
    base = store.keys.base(store.keys.shard(mode, customer_id))
    return f"{base}:rl:{mode}:{subject}:{window_start_ms}"


def _limit(value: int | None) -> int:
    return -1 if value is None else value


async def claim(store: WindowStore, mode: Mode, customer_id: str, claims: list[QuotaClaim],
                window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
    ordered = sorted(claims, key=lambda c: c.subject)
    keys = [window_key(store, mode, customer_id, c.subject, window_start_ms) for c in ordered]
    args: list[int] = [window_start_ms + KEEP_MS, TAPER]
    for c in ordered:
        args += [_limit(c.requests_per_minute), _limit(c.tokens_per_minute), c.need_requests, c.want_requests,
                 c.need_tokens, c.want_tokens]
    out = await store.script("RL_CLAIM", keys, args)
    if out[0] == "deny":
        return RateLimitDenial(ordered[int(out[1]) - 1].subject, out[2], int(out[3]), int(out[4]), window_start_ms)
    assert out[0] == "ok" and len(out) == 1 + 4 * len(ordered), f"unexpected claim answer {out!r}"
    grants = [QuotaGrant(c.subject, *(int(v) for v in out[1 + 4 * i:5 + 4 * i])) for i, c in enumerate(ordered)]
    for c, g in zip(ordered, grants, strict=True):
        assert g.requests >= c.need_requests and g.tokens >= c.need_tokens, "a grant covers its need"
    return grants


async def release(store: WindowStore, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]],
                  window_start_ms: int) -> None:
    keys = [window_key(store, mode, customer_id, subject, window_start_ms) for subject, _, _ in releases]
    args = [n for _, requests, tokens in releases for n in (requests, tokens)]
    await store.script("RL_RELEASE", keys, args)


class WindowsInRedis:
    """The rate-limit part of a store whose windows are in Redis (both Redis stores): mixed in before the
    store's own class, so that these claims are the ones that run."""

    keys: KeySpace

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    async def claim_rate_quota(self, mode: Mode, customer_id: str, claims: list[QuotaClaim], *,
                               window_start_ms: int) -> list[QuotaGrant] | RateLimitDenial:
        """In Redis, one script per claim."""
        return await claim(self, mode, customer_id, claims, window_start_ms)

    async def release_rate_quota(self, mode: Mode, customer_id: str, releases: list[tuple[str, int, int]], *,
                                 window_start_ms: int) -> None:
        await release(self, mode, customer_id, releases, window_start_ms)
