"""API keys for the tests that talk to a real server, made straight in its Redis."""

import asyncio

import redis.asyncio

from service.store.api_keys import create_key


def new_key(redis_url: str, role: str = "user", name: str = "") -> str:
    async def make() -> str:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        key, _ = await create_key(client, role, name)
        await client.aclose()
        return key

    return asyncio.run(make())
