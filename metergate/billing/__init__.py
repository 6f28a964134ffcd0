"""Prepaid beside invoiced (issue #8): billing mode per customer, usage to Stripe Billing, exports."""
