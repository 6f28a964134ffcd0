"""Budgets down a tree under each customer: nodes, limits per window, admission along a request's path.

Modules: :mod:`~metergate.budgets.model` (nodes, limits, trees), :mod:`~metergate.budgets.windows` (fixed and
rolling windows), :mod:`~metergate.budgets.claims` and :mod:`~metergate.budgets.leases` (quota leases shared
by replicas), :mod:`~metergate.budgets.admission` (what the proxy calls), :mod:`metergate.wallet.sqlbudgets`
(the SQL tables), :mod:`~metergate.budgets.admin` (the admin API), :mod:`~metergate.budgets.alerts`.
"""
