"""Every answer the API returns, stored in Redis so that feedback can refer to it.

One JSON document per completion, expiring after `completion_ttl_s` unless someone rates it: the vote script
(feedback_store.py) PERSISTs it and deletes it when the last feedback event that holds it leaves the stream.
"""

from pydantic import BaseModel
from redis.asyncio import Redis

from common.conversations import conversation_id
from service.store import redis_keys


class LoggedChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    adapter: str | None = None  # set when choices came from different versions (the arena)
    logprobs: list[float] | None = None  # the sampled tokens' log-probabilities, when the request asked for them


class CompletionRecord(BaseModel):
    id: str
    created: int
    model: str
    adapter: str
    messages: list[dict]
    conversation: str  # conversation_id(messages)
    choices: list[LoggedChoice]
    params: dict
    user: str | None = None  # the OpenAI `user` field
    owner: str  # who asked: "key:<id>" or "anonymous"
    blind: bool = False  # its choices came from different versions, not shown to the caller (arena, A/B test)

    @classmethod
    def build(cls, messages: list[dict], **fields) -> "CompletionRecord":
        return cls(messages=messages, conversation=conversation_id(messages), **fields)


# Write-once: logging the same completion again (an import run twice) neither counts it twice nor puts
# an expiry back on a completion a vote has made permanent.
_LOG_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], 'completions', 1)
  return 1
end
return 0
"""


async def log_completion(redis: Redis, record: CompletionRecord, ttl_s: int) -> bool:
    """Store a completion unless one with its id exists; True if it was new."""
    keys = [redis_keys.completion(record.id), redis_keys.STATS]
    return bool(await redis.eval(_LOG_ONCE, len(keys), *keys, record.model_dump_json(), ttl_s))


async def get_completion(redis: Redis, completion_id: str) -> CompletionRecord | None:
    raw = await redis.get(redis_keys.completion(completion_id))
    return CompletionRecord.model_validate_json(raw) if raw else None
