"""The aiohttp proxy: the metering pipeline, provider adapters and the streaming relay."""
