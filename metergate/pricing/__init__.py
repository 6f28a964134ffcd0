"""Pricing: rules and the engine (``rules``, ``engine``), price versions (``versions``, ``store``, ``schema``),
what the proxy and the admin API price with (``service``), the dry-run simulator (``simulate``), usage events
(``events``), and their admin API (``admin``, documented in ``openapi``)."""
