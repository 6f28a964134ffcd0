"""Token counting, usage extraction, provider costs and pricing."""
