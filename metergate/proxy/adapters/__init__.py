"""Provider adapters: one module per upstream API, each answering the same few questions."""
