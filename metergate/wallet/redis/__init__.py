"""The Redis real-time wallet over the SQL ledger; see :mod:`metergate.wallet.redis.store`."""

from metergate.wallet.redis.store import RedisWalletStore, WalletUnavailable

__all__ = ["RedisWalletStore", "WalletUnavailable"]
