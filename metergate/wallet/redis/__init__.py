"""Redis beside the SQL store: the rate-limit windows replicas share (:mod:`metergate.wallet.redis.windows`, the
default with ``redis_url``), and the Redis wallet over the SQL ledger (:mod:`metergate.wallet.redis.store`,
``redis_wallet: true``). Nothing is imported here, so that the windows' topology loads none of the wallet's."""
