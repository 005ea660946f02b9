"""Feedback as files: export/import round trips on a real Redis, malformed files refused whole, and one ranking
cast through the real API and exported by the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from redis.asyncio import Redis

from common.conversations import conversation_id
from common.records import MalformedFeedback, Pair, parse_record
from service.feedback.events import AnswerRef, FeedbackEvent
from service.store import feedback_store, redis_keys
from service.store.completion_log import CompletionRecord, LoggedChoice, log_completion
from service.store.export import export_feedback, import_feedback
from tests.server import running_server, tiny_server_env

PROMPT = [{"role": "user", "content": "Name a colour"}]
COLOURS = ["red", "green", "blue"]
PROVENANCE = {"chosen_id", "rejected_id", "chosen_adapter", "rejected_adapter", "answer_id", "adapter", "voter",
              "created"}


async def log(redis: Redis, completion_id: str, texts: list[str], messages: list[dict] = PROMPT) -> list[AnswerRef]:
    record = CompletionRecord.build(
        messages, id=completion_id, created=1, model="chatloop", adapter="v1", params={}, owner="anonymous",
        choices=[LoggedChoice(index=i, text=t, finish_reason="stop") for i, t in enumerate(texts)],
    )
    await log_completion(redis, record, ttl_s=3600)
    return [AnswerRef(completion_id=completion_id, choice_index=i, text=t, adapter="v1") for i, t in enumerate(texts)]


async def vote(redis: Redis, answers: list[AnswerRef], voter: str = "key:a", **kwargs) -> None:
    kind = "thumb" if "rating" in kwargs else "comparison"
    await feedback_store.cast_vote(redis, FeedbackEvent(
        kind=kind, created=100, voter=voter, prompt=PROMPT, conversation=conversation_id(PROMPT), answers=answers,
        **kwargs,
    ))


@pytest.fixture
async def voted(aredis: Redis) -> Redis:
    """Every kind of vote, one of them cast twice with a change of mind: 3 + 2 pairs and 2 + 2 thumbs."""
    ranked = await log(aredis, "cmpl-rank", COLOURS)
    picked = await log(aredis, "cmpl-pick", ["cat", "dog", "cow"])
    bad = await log(aredis, "cmpl-bad", ["x", "y"])
    tied = await log(aredis, "cmpl-tie", ["p", "q"])
    thumbed = await log(aredis, "cmpl-thumb", ["yes", "no"], [{"role": "system", "content": "Be brief."}, *PROMPT])
    await vote(aredis, ranked, ranking=[0, 1, 2])
    await vote(aredis, ranked, ranking=[2, 0, 1])
    await vote(aredis, picked, preferred=1)
    await vote(aredis, bad, verdict="both_bad")
    await vote(aredis, tied, verdict="tie")
    await vote(aredis, thumbed[:1], rating=1)
    await vote(aredis, thumbed[1:], voter="key:b", rating=-1)
    return aredis


def texts_of(records: list[dict]) -> list[tuple]:
    """Each record as the trainer reads it: (chosen, rejected) texts, or (completion text, label)."""
    parsed = map(parse_record, records)
    return [(p.chosen, p.rejected) if isinstance(p, Pair) else (p.answer, p.label) for p in parsed]


def read(path: Path, strip: bool = False) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in PROVENANCE} for r in records] if strip else records


async def test_export_counts_and_kinds(voted, tmp_path):
    counts = await export_feedback(voted, tmp_path / "all.jsonl")
    assert counts == {"events": 7, "votes": 6, "pairs": 5, "thumbs": 4}
    assert texts_of(read(tmp_path / "all.jsonl"))[:3] == [("blue", "red"), ("blue", "green"), ("red", "green")]
    assert (await export_feedback(voted, tmp_path / "pairs.jsonl", "pairs"))["thumbs"] == 0
    assert all("chosen" in r for r in read(tmp_path / "pairs.jsonl"))
    assert (await export_feedback(voted, tmp_path / "thumbs.jsonl", "thumbs"))["pairs"] == 0
    assert len(read(tmp_path / "thumbs.jsonl")) == 4 and all("label" in r for r in read(tmp_path / "thumbs.jsonl"))


async def test_export_import_export_round_trip(voted, tmp_path):
    first = tmp_path / "first.jsonl"
    await export_feedback(voted, first)
    await voted.flushdb()
    counts = await import_feedback(voted, first, ttl_s=3600)
    assert counts == {"pairs": 5, "thumbs": 4, "recorded": 9, "replaced": 0, "unchanged": 0}
    second = tmp_path / "second.jsonl"
    await export_feedback(voted, second)
    assert read(second, strip=True) == read(first, strip=True)
    assert [r["created"] for r in read(second)] == [r["created"] for r in read(first)]
    assert {r["voter"] for r in read(second)} == {"import:first.jsonl"}
    # Imported votes made their completions permanent, as API votes do.
    assert all([await voted.ttl(key) == -1 async for key in voted.scan_iter(redis_keys.completion("*"))])


async def test_importing_twice_changes_nothing(voted, tmp_path):
    path = tmp_path / "feedback.jsonl"
    await export_feedback(voted, path)
    await voted.flushdb()
    await import_feedback(voted, path, ttl_s=3600)
    stats, length = await feedback_store.stats(voted), await voted.xlen(redis_keys.EVENTS)
    counts = await import_feedback(voted, path, ttl_s=3600)
    assert counts == {"pairs": 5, "thumbs": 4, "recorded": 0, "replaced": 0, "unchanged": 9}
    assert await feedback_store.stats(voted) == stats == stats | {"completions": 9, "events": 9}
    assert await voted.xlen(redis_keys.EVENTS) == length == 9


def thumb_line(**fields) -> str:
    thumb = {"prompt": PROMPT, "completion": [{"role": "assistant", "content": "red"}], "label": True}
    return json.dumps(thumb | fields)


GOOD = thumb_line()
BAD_LINES = [
    ("{not json", "line 3"),
    ('["a", "list"]', "expected a JSON object"),
    (json.dumps({"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "a"}]}), "rejected: Field required"),
    (thumb_line(completion=[{"role": "user", "content": "a"}]), "completion.0.role"),
    (thumb_line(completion=[]), "completion"),
    (thumb_line(label="yes"), "label"),
    (thumb_line(prompt=[]), "prompt"),
    (json.dumps({"prompt": PROMPT, "text": "a"}), "neither a pair"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
async def test_a_malformed_file_is_refused_whole(aredis, tmp_path, bad, message):
    path = tmp_path / "feedback.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(MalformedFeedback, match="line 3") as refused:
        await import_feedback(aredis, path, ttl_s=3600)
    assert message in str(refused.value)
    assert await aredis.dbsize() == 0


MESSAGES = [{"role": "user", "content": "Hello there"}]


def cli(*args: str, redis_url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHATLOOP_REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "service.cli.main", "feedback", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_ranking_through_the_api_exports_three_pairs(tiny_model_dir, tmp_path, redis_url, redis_sync):
    (tmp_path / "data").mkdir()
    with running_server(tiny_server_env(tiny_model_dir, tmp_path / "data", redis_url), tmp_path / "server.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(
            model="chatloop", messages=MESSAGES, n=3, temperature=1.0, seed=7, max_tokens=12
        )
        texts = [choice.message.content for choice in completion.choices]
        body = {"completion_id": completion.id, "ranking": [2, 0, 1]}
        receipt = httpx.post(f"{url}/v1/comparisons", json=body, timeout=30)
    assert receipt.status_code == 200, receipt.text
    assert receipt.json()["pairs"] == 3

    out = tmp_path / "export" / "pairs.jsonl"
    run = cli("export", "--out", str(out), "--kind", "pairs", redis_url=redis_url)
    assert run.returncode == 0, run.stderr
    assert "exported 3 pairs and 0 thumbs" in run.stdout
    records = read(out)
    assert texts_of(records) == [(texts[2], texts[0]), (texts[2], texts[1]), (texts[0], texts[1])]
    assert all(r["prompt"] == MESSAGES and r["chosen_adapter"] == "base" for r in records)
    assert [r["chosen_id"] for r in records] == [f"{completion.id}:2", f"{completion.id}:2", f"{completion.id}:0"]

    redis_sync.flushdb()
    run = cli("import", str(out), redis_url=redis_url)
    assert run.returncode == 0, run.stderr
    assert "imported 3 pairs and 0 thumbs" in run.stdout and "3 recorded" in run.stdout
    assert redis_sync.hget(redis_keys.STATS, "pairs") == "3"
