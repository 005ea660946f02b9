"""Conversation ids and the train/held-out split."""

from common.conversations import conversation_id, is_heldout

PROMPT = [{"role": "user", "content": "hi"}]


def test_the_id_reads_roles_and_contents_only():
    assert conversation_id(PROMPT) == conversation_id([{"role": "user", "content": "hi", "name": "x"}])
    assert conversation_id(PROMPT) != conversation_id([{"role": "system", "content": "hi"}])
    assert conversation_id(PROMPT) != conversation_id([{"role": "user", "content": "hi "}])


def test_split_is_stable():
    assert is_heldout(PROMPT, 0.5) == is_heldout([{"role": "user", "content": "hi"}], 0.5)
    assert not is_heldout(PROMPT, 0.0) and is_heldout(PROMPT, 1.0)
