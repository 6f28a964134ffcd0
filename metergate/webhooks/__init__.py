"""Operator notifications as durable, signed Standard Webhooks: the outbox, its delivery loop, its admin API."""
