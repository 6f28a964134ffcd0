"""metergate: a sidecar metering proxy that makes any AI API prepaid and real-time.

The request pipeline is identify → estimate → authorize → forward → meter → settle; storage is
reached only through :class:`metergate.wallet.store.WalletStore`.
"""

__version__ = "0.1.0"
