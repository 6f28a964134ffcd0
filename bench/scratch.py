"""Scratch state for the benchmarks that use the shared servers: a PostgreSQL database of their own,
recreated per measurement, and Redis key prefixes, all removed at the end even if the run fails."""

from __future__ import annotations

import uuid
from types import TracebackType

import asyncpg
import redis

PG = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"


class Scratch:
    def __init__(self) -> None:
        self.name = f"mg_bench_{uuid.uuid4().hex[:8]}"
        self.pg_url = PG.rsplit("/", 1)[0] + f"/{self.name}"
        self.prefixes: list[str] = []
        self._admin: asyncpg.Connection | None = None

    async def __aenter__(self) -> Scratch:
        self._admin = await asyncpg.connect(PG)
        return self

    async def fresh_database(self) -> str:
        """Drop and recreate the scratch database; its URL."""
        assert self._admin is not None
        await self._admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await self._admin.execute(f'CREATE DATABASE "{self.name}"')
        return self.pg_url

    def prefix(self) -> str:
        """A new Redis key prefix, deleted at the end."""
        self.prefixes.append(f"mgb{uuid.uuid4().hex[:8]}")
        return self.prefixes[-1]

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        assert self._admin is not None
        await self._admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        await self._admin.close()
        client = redis.Redis.from_url(REDIS)
        for prefix in self.prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)
        client.close()
