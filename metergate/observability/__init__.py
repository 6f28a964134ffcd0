"""What an operator sees of a running metergate: structured logs and Prometheus metrics."""
