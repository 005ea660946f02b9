"""Every answer the API returns, stored in Redis so that feedback can refer to it.

One JSON document per completion, expiring after `completion_ttl_s` unless someone rates it (the
feedback scripts PERSIST it).
"""

from pydantic import BaseModel
from redis.asyncio import Redis

from service import redis_keys
from service.rankings import conversation_hash


class LoggedChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None


class CompletionRecord(BaseModel):
    id: str
    created: int
    model: str
    adapter: str
    messages: list[dict]
    conversation: str  # conversation_hash(messages)
    choices: list[LoggedChoice]
    params: dict
    user: str | None = None  # the OpenAI `user` field
    owner: str  # who asked: "key:<id>" or "anonymous"

    @classmethod
    def build(cls, messages: list[dict], **fields) -> "CompletionRecord":
        return cls(messages=messages, conversation=conversation_hash(messages), **fields)


async def log_completion(redis: Redis, record: CompletionRecord, ttl_s: int) -> None:
    async with redis.pipeline(transaction=True) as tx:
        tx.set(redis_keys.completion(record.id), record.model_dump_json(), ex=ttl_s)
        tx.hincrby(redis_keys.STATS, "completions", 1)
        await tx.execute()


async def get_completion(redis: Redis, completion_id: str) -> CompletionRecord | None:
    raw = await redis.get(redis_keys.completion(completion_id))
    return CompletionRecord.model_validate_json(raw) if raw else None
