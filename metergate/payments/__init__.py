"""Customers serve themselves: Stripe top-ups, incoming webhooks, auto top-up, spend caps, notifications."""
