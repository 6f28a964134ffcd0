"""Wallets: balances per asset, holds, and the append-only ledger, behind :class:`WalletStore`."""

from metergate.wallet.models import ApiKey, Balance, Customer, Hold, LedgerEntry, Settlement, UsageRecord
from metergate.wallet.sql import SqlWalletStore
from metergate.wallet.store import WalletStore

__all__ = ["ApiKey", "Balance", "Customer", "Hold", "LedgerEntry", "Settlement", "SqlWalletStore",
           "UsageRecord", "WalletStore"]
