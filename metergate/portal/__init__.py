"""The customer's billing page, reached through a signed, expiring link."""
