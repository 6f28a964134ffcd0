"""The self-contained demo and its OpenAI-compatible mock upstream."""
