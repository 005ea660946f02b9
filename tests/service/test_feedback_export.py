"""Feedback as training data: events to TRL records by hand, export/import round trips on a real Redis, and one
ranking cast through the real API and exported by the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from redis.asyncio import Redis

from service import feedback_store, redis_keys
from service.completion_log import CompletionRecord, LoggedChoice, log_completion
from service.feedback_events import AnswerRef, FeedbackEvent
from service.feedback_export import (
    MalformedFeedback,
    export_feedback,
    import_feedback,
    training_records,
    write_jsonl,
)
from service.rankings import conversation_hash
from tests.server import running_server, tiny_server_env

PROMPT = [{"role": "user", "content": "Name a colour"}]
COLOURS = ["red", "green", "blue"]
PROVENANCE = {"chosen_id", "rejected_id", "chosen_adapter", "rejected_adapter", "answer_id", "adapter", "voter",
              "created"}


def event(texts: list[str], voter: str = "key:a", created: int = 100, cid: str = "c1", **vote) -> FeedbackEvent:
    answers = [AnswerRef(completion_id=cid, choice_index=i, text=t, adapter="v1") for i, t in enumerate(texts)]
    kind = "thumb" if "rating" in vote else "comparison"
    return FeedbackEvent(kind=kind, created=created, voter=voter, prompt=PROMPT, conversation=conversation_hash(PROMPT),
                         answers=answers, **vote)


def texts_of(records: list[dict]) -> list[tuple]:
    """Each record as (chosen, rejected) texts, or (completion text, label)."""
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"]) if "chosen" in r
            else (r["completion"][0]["content"], r["label"]) for r in records]


def test_ranking_of_three_gives_its_three_ordered_pairs():
    records = training_records([event(COLOURS, ranking=[2, 0, 1])])
    assert texts_of(records) == [("blue", "red"), ("blue", "green"), ("red", "green")]
    assert records[0] == {
        "prompt": PROMPT, "chosen": [{"role": "assistant", "content": "blue"}],
        "rejected": [{"role": "assistant", "content": "red"}], "chosen_id": "c1:2", "rejected_id": "c1:0",
        "chosen_adapter": "v1", "rejected_adapter": "v1", "voter": "key:a", "created": 100,
    }


def test_one_pick_out_of_three_beats_each_of_the_others():
    assert texts_of(training_records([event(COLOURS, preferred=1)])) == [("green", "red"), ("green", "blue")]


def test_a_revote_replaces_the_earlier_one():
    events = [event(COLOURS[:1], rating=1), event(COLOURS[:1], voter="key:b", rating=1),
              event(COLOURS[:1], rating=-1, created=200)]
    records = training_records(events)
    assert [(r["voter"], r["label"], r["created"]) for r in records] == [("key:b", True, 100), ("key:a", False, 200)]


def test_a_tie_gives_nothing():
    assert training_records([event(COLOURS[:2], verdict="tie")]) == []


def test_both_bad_gives_a_thumbs_down_for_each_answer():
    records = training_records([event(COLOURS[:2], verdict="both_bad")])
    assert texts_of(records) == [("red", False), ("green", False)]
    assert [r["answer_id"] for r in records] == ["c1:0", "c1:1"]


def test_thumbs_become_labels():
    records = training_records([event(["red"], rating=1), event(["green"], cid="c2", rating=-1)])
    assert texts_of(records) == [("red", True), ("green", False)]
    assert set(records[0]) == {"prompt", "completion", "label", "answer_id", "adapter", "voter", "created"}


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    out = tmp_path / "feedback.jsonl"
    out.write_text("old\n")

    def records():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(out, records())
    assert out.read_text() == "old\n" and list(tmp_path.iterdir()) == [out]


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
        kind=kind, created=100, voter=voter, prompt=PROMPT, conversation=conversation_hash(PROMPT), answers=answers,
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
    return subprocess.run([sys.executable, "-m", "service.cli", "feedback", *args], env=env, capture_output=True,
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
