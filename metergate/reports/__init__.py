"""Operator reports: revenue, provider cost and margin over the usage records, and the dashboard that
draws them (server-rendered SVG, no JavaScript)."""
