"""Conversations (OpenAI chat messages) and their ids."""

import hashlib
import json

Messages = list[dict]  # [{"role": ..., "content": ...}, ...]


def conversation_id(messages: Messages) -> str:
    """A stable id of a conversation (roles and contents only): answers to the same one can be compared, and
    the trainer splits train from held-out by it."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def is_heldout(messages: Messages, fraction: float) -> bool:
    """Whether a conversation falls on the held-out side of a split of that fraction; stable across runs."""
    return int(conversation_id(messages)[:8], 16) / 16**8 < fraction
