"""The Lua scripts of the Redis wallet: each mutation is one script, atomic on one hash slot.

Why Lua: Redis runs a script to its end before any other command, so check-and-hold is one step and no
two replicas can both take the last unit. Every script names all of its keys in ``KEYS`` and they all
carry the same ``{shard}`` hash tag, so the scripts run unchanged on Redis Cluster.

Keys (``P`` is the configured prefix, ``s`` the wallet's shard, see :mod:`metergate.wallet.redis.store`):

* ``P:{s}:w:<mode>:<customer>:<asset>`` — the wallet projection, a hash of integers: ``c`` credits
  posted, ``p`` debits posted, ``q`` debits pending, ``o`` overdraft limit. Its existence means "loaded";
  every mutation refuses (``not_loaded``) until a rebuild from the ledger has created it.
* ``P:{s}:k:<mode>:<customer>:<asset>`` — the set of credit idempotency keys already in the projection.
* ``P:{s}:u:<mode>:<customer>:<asset>`` — how many of this wallet's events are in the stream and not yet
  committed to SQL; a rebuild waits for 0 (see ``rebuild``).
* ``P:{s}:h:<hold_id>`` — one hold: ``m cu a`` wallet, ``amt`` amount, ``st`` state, ``cap`` captured,
  ``wo`` written off, ``exp`` expiry, ``cr`` created, ``rh`` reserve content hash, ``sh`` settle content hash,
  ``x:<step>`` applied extension steps, ``e`` the wallet epoch it belongs to. Kept ``retention`` ms after it
  resolves, for idempotent replays.
* Epochs: every rebuild stamps the wallet (``e`` in its hash) with a fresh token, and the holds it loads from
  the ledger with the same token; a hold placed later takes the wallet's. A pending hold with another epoch is
  *stale*: it outlived a loss of Redis data that reverted it (a failover that lost its settle, say) and the
  ledger did not list it as pending at the rebuild, so the wallet's ``q`` does not count it. A stale hold
  never moves the wallet: its expiry only tells the ledger, and its settle is answered by the ledger.
* ``P:{s}:x`` — the shard's pending holds by expiry (a sorted set), for the sweeper.
* ``P:{s}:s`` — the shard's event stream, drained into SQL by :mod:`metergate.wallet.redis.sink`.

Numbers: Lua numbers are doubles, exact for integers below 2**53; the store refuses larger amounts before a
script runs, and every balance column is updated with ``HINCRBY`` (64-bit integers). Scripts return arrays
whose first element is a status string.
"""

from __future__ import annotations

# Shared Lua prelude: read the wallet's four columns as numbers.
_WALLET = """
local function wallet(key)
  local w = redis.call('HMGET', key, 'c', 'p', 'q', 'o')
  return tonumber(w[1]) or 0, tonumber(w[2]) or 0, tonumber(w[3]) or 0, tonumber(w[4]) or 0
end
local function mark(ukey)
  redis.call('INCR', ukey)
end
"""

# KEYS: wallet, hold, expiry zset, stream, unapplied counter[, hold index]
# ARGV: hold_id, mode, customer, asset, amount, ttl_ms, now_ms, content hash, max backlog (0: none), retention
#       [, index value, index ttl ms]
# The hold index (``P:hold:<id>``, outside the shard's slot) is written here, first, when the store talks to one
# server: one round trip per hold instead of two. On Redis Cluster the store writes it before the script.
RESERVE = _WALLET + """
if KEYS[6] then
  if not redis.call('SET', KEYS[6], ARGV[11], 'NX', 'PX', ARGV[12]) then
    local owner = redis.call('GET', KEYS[6])
    if owner and owner ~= ARGV[11] then return {'conflict'} end
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local h = redis.call('HMGET', KEYS[2], 'rh', 'amt', 'st', 'exp', 'cr', 'cap')
  if h[1] ~= '' and h[1] ~= ARGV[8] then return {'conflict'} end  -- '' : rebuilt from the ledger
  local c, p, q, o = wallet(KEYS[1])
  return {'replay', h[2], h[3], h[4], h[5], h[6], c, p, q, o}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_loaded'} end
local backlog = tonumber(ARGV[9])
if backlog > 0 and redis.call('XLEN', KEYS[4]) >= backlog then return {'backlog'} end
local amount = tonumber(ARGV[5])
local c, p, q, o = wallet(KEYS[1])
local available = c + o - p - q
if available < amount then return {'insufficient', available} end
local now = tonumber(ARGV[7])
local expires = now + tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[1], 'q', amount)
redis.call('HSET', KEYS[2], 'm', ARGV[2], 'cu', ARGV[3], 'a', ARGV[4], 'amt', amount, 'st', 'pending',
           'cap', 0, 'wo', 0, 'exp', expires, 'cr', now, 'rh', ARGV[8],
           'e', redis.call('HGET', KEYS[1], 'e') or '')
redis.call('ZADD', KEYS[3], expires, ARGV[1])
redis.call('XADD', KEYS[4], '*', 't', 'hold', 'h', ARGV[1], 'm', ARGV[2], 'cu', ARGV[3], 'a', ARGV[4],
           'amt', amount, 'ttl', ARGV[6])
mark(KEYS[5])
return {'ok', amount, 'pending', expires, now, 0, c, p, q + amount, o}
"""

# KEYS: wallet, hold, expiry zset, stream, unapplied counter
# ARGV: hold_id, amount, step, ttl_ms, now_ms
EXTEND = _WALLET + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'not_found'} end
local field = 'x:' .. ARGV[3]
local function hold(status)
  local h = redis.call('HMGET', KEYS[2], 'amt', 'st', 'exp', 'cr', 'cap')
  return {status, h[1], h[2], h[3], h[4], h[5]}
end
if redis.call('HEXISTS', KEYS[2], field) == 1 then return hold('replay') end
if redis.call('HGET', KEYS[2], 'st') ~= 'pending' then return {'not_found'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_loaded'} end
if (redis.call('HGET', KEYS[2], 'e') or '') ~= (redis.call('HGET', KEYS[1], 'e') or '') then
  return {'stale'}
end
local amount = tonumber(ARGV[2])
local c, p, q, o = wallet(KEYS[1])
local available = c + o - p - q
if available < amount then return {'insufficient', available} end
local expires = math.max(tonumber(redis.call('HGET', KEYS[2], 'exp')), tonumber(ARGV[5]) + tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[1], 'q', amount)
redis.call('HINCRBY', KEYS[2], 'amt', amount)
redis.call('HSET', KEYS[2], 'exp', expires, field, amount)
redis.call('ZADD', KEYS[3], expires, ARGV[1])
local w = redis.call('HMGET', KEYS[2], 'm', 'cu', 'a')
redis.call('XADD', KEYS[4], '*', 't', 'extend', 'h', ARGV[1], 'm', w[1], 'cu', w[2], 'a', w[3], 'amt', amount,
           'step', ARGV[3], 'ttl', ARGV[4])
mark(KEYS[5])
return hold('ok')
"""

# KEYS: wallet, hold, expiry zset, stream, unapplied counter
# ARGV: hold_id, amount, content hash, now_ms, usage JSON ('' for none), retention_ms
SETTLE = _WALLET + """
if redis.call('EXISTS', KEYS[2]) == 0 then return {'not_found'} end
local h = redis.call('HMGET', KEYS[2], 'st', 'amt', 'cap', 'wo', 'sh')
if h[1] == 'captured' or h[1] == 'voided' then
  if h[5] ~= ARGV[3] then return {'conflict'} end
  local c, p, q, o = wallet(KEYS[1])
  return {'replay', h[3], h[4], c, p, q, o}
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_loaded'} end
if h[1] == 'pending' and (redis.call('HGET', KEYS[2], 'e') or '') ~= (redis.call('HGET', KEYS[1], 'e') or '') then
  return {'stale'}
end
local amount = tonumber(ARGV[2])
local released = 0
if h[1] == 'pending' then released = tonumber(h[2]) end  -- an expired hold released its amount already
local c, p, q, o = wallet(KEYS[1])
local coverable = math.max(0, c + o - p - q + released)
local charged = math.min(amount, coverable)
local written_off = amount - charged
local state = 'voided'
if charged > 0 then state = 'captured' end
-- (never pass -0: Lua prints it as "-0", which HINCRBY refuses)
if released > 0 then redis.call('HINCRBY', KEYS[1], 'q', -released) end
if charged > 0 then redis.call('HINCRBY', KEYS[1], 'p', charged) end
redis.call('HSET', KEYS[2], 'st', state, 'cap', charged, 'wo', written_off, 'sh', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZREM', KEYS[3], ARGV[1])
local w = redis.call('HMGET', KEYS[2], 'm', 'cu', 'a')
redis.call('XADD', KEYS[4], '*', 't', 'settle', 'h', ARGV[1], 'm', w[1], 'cu', w[2], 'a', w[3], 'amt', charged,
           'wo', written_off, 'usage', ARGV[5])
mark(KEYS[5])
return {'ok', charged, written_off, c, p + charged, q - released, o}
"""

# KEYS: wallet, hold, expiry zset, stream, unapplied counter
# ARGV: hold_id, now_ms, retention_ms
EXPIRE = """
local h = redis.call('HMGET', KEYS[2], 'st', 'amt', 'exp', 'm', 'cu', 'a')
if h[1] ~= 'pending' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
if tonumber(h[3]) >= tonumber(ARGV[2]) then return 0 end  -- extended meanwhile
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end  -- not loaded: the rebuild takes the hold as it is
if (redis.call('HGET', KEYS[2], 'e') or '') == (redis.call('HGET', KEYS[1], 'e') or '') then
  redis.call('HINCRBY', KEYS[1], 'q', -tonumber(h[2]))
end  -- else stale: the wallet never counted it; the ledger expires it if it still holds it
redis.call('HSET', KEYS[2], 'st', 'expired')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 't', 'expire', 'h', ARGV[1], 'm', h[4], 'cu', h[5], 'a', h[6], 'at', ARGV[2])
redis.call('INCR', KEYS[5])
return 1
"""

# KEYS: wallet, credit key set
# ARGV: credit idempotency key, amount
CREDIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'not_loaded' end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 'replay' end
redis.call('HINCRBY', KEYS[1], 'c', tonumber(ARGV[2]))
return 'ok'
"""

# KEYS: wallet, credit key set, expiry zset, then one key per pending hold
# ARGV: credits, posted, pending, overdraft, number of credit keys, the credit keys...,
#       then per pending hold: id, mode, customer, asset, amount, expires, created; last, the new epoch
# Creates the projection only if it does not exist: of many replicas rebuilding at once, the first wins.
LOAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
local epoch = ARGV[#ARGV]
redis.call('HSET', KEYS[1], 'c', ARGV[1], 'p', ARGV[2], 'q', ARGV[3], 'o', ARGV[4], 'e', epoch)
local n = tonumber(ARGV[5])
redis.call('DEL', KEYS[2])
for i = 1, n do redis.call('SADD', KEYS[2], ARGV[5 + i]) end
local base = 5 + n
local k = 4
while base < #ARGV - 1 do
  local id = ARGV[base + 1]
  if redis.call('EXISTS', KEYS[k]) == 0 then
    redis.call('HSET', KEYS[k], 'm', ARGV[base + 2], 'cu', ARGV[base + 3], 'a', ARGV[base + 4],
               'amt', ARGV[base + 5], 'st', 'pending', 'cap', 0, 'wo', 0, 'exp', ARGV[base + 6],
               'cr', ARGV[base + 7], 'rh', '', 'e', epoch)
  else
    redis.call('HSET', KEYS[k], 'e', epoch)  -- pending in the ledger: counted in q, part of this epoch
  end
  redis.call('ZADD', KEYS[3], ARGV[base + 6], id)
  base = base + 7
  k = k + 1
end
return 'loaded'
"""

# KEYS: wallet, unapplied counter
# Drops the projection for a rebuild, but only once every event of the wallet has reached SQL.
# KEYS: wallet; ARGV: overdraft limit
# A credit line changed in the ledger (billing): the limit is absolute, so it is set in place, whatever the
# wallet's traffic; a wallet not loaded takes it from the ledger when it is.
SET_OVERDRAFT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'not_loaded' end
redis.call('HSET', KEYS[1], 'o', ARGV[1])
return 'ok'
"""

INVALIDATE = """
if (tonumber(redis.call('GET', KEYS[2])) or 0) > 0 then return 'busy' end
redis.call('DEL', KEYS[1])
return 'dropped'
"""

# KEYS: wallet, hold, expiry zset, stream, unapplied counter
# ARGV: hold_id, mode, customer, asset, amount, expires, created, emit ('1': the ledger lacks the hold)
# Re-admits a hold the projection lost (a flush before the hold reached SQL) without an availability
# check: the hold was admitted before the loss and its request has run. Never replaces an existing hold.
ADOPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'exists' end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'not_loaded' end
local amount = tonumber(ARGV[5])
redis.call('HINCRBY', KEYS[1], 'q', amount)
redis.call('HSET', KEYS[2], 'm', ARGV[2], 'cu', ARGV[3], 'a', ARGV[4], 'amt', amount, 'st', 'pending',
           'cap', 0, 'wo', 0, 'exp', ARGV[6], 'cr', ARGV[7], 'rh', '', 'e', redis.call('HGET', KEYS[1], 'e') or '')
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
if ARGV[8] == '1' then
  redis.call('XADD', KEYS[4], '*', 't', 'hold', 'h', ARGV[1], 'm', ARGV[2], 'cu', ARGV[3], 'a', ARGV[4],
             'amt', amount, 'ttl', math.max(1, tonumber(ARGV[6]) - tonumber(ARGV[7])))
  redis.call('INCR', KEYS[5])
end
return 'adopted'
"""

# KEYS: stream, then one unapplied counter per entry; ARGV: group, then the entry ids
# Acknowledges entries after their SQL commit, deletes them (the stream holds only what SQL lacks) and
# counts them off their wallets, in one step so that a redelivery never counts an entry off twice.
ACK = """
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    local left = redis.call('DECR', KEYS[i])
    if left <= 0 then redis.call('DEL', KEYS[i]) end
  end
end
return #ARGV - 1
"""

# KEYS: lease; ARGV: owner, lease ms. Take the lease if free, renew it if ours.
LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
