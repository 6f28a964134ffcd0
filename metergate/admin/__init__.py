"""The operator's admin API."""
