"""Prepaid beside invoiced: billing mode per customer, usage to Stripe Billing, exports."""
