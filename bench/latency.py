"""Latency parts of the serving benchmark, each against a running server with nothing else in flight.

- turns: time to first token of a ~1,000-token conversation's second turn against its first (the second
  resends the whole first turn, so prefix reuse decides it).
- join: 8 streams decode; a 1,500-token prompt joins; how long each running stream waits for its next token.
- memory: peak RSS of the server process after loading 4 adapters.
"""

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.sse_client import Sample, stream_chat

FILLER = Path(__file__).with_name("prompts.txt")


def long_text(tokenizer, tokens: int, offset: int = 0) -> str:
    """Lines of bench/prompts.txt, from `offset` on (cycling), until they make about `tokens` tokens."""
    lines = [line for line in FILLER.read_text().splitlines() if line and not line.startswith("#")]
    out, count, i = [], 0, offset
    while count < tokens:
        line = lines[i % len(lines)]
        out.append(line)
        count += len(tokenizer(line + "\n", add_special_tokens=False)["input_ids"])
        i += 1
    return "\n".join(out)


@dataclass
class Turns:
    first_ttft_s: list[float]
    second_ttft_s: list[float]
    prompt_tokens: int  # of the first turn, templated

    @property
    def ratio(self) -> float:
        return statistics.median(self.second_ttft_s) / statistics.median(self.first_ttft_s)


async def second_turn(url: str, tokenizer, tokens: int = 1000, conversations: int = 3) -> Turns:
    first, second = [], []
    prompt_tokens = 0
    for c in range(conversations):
        question = "Here are some questions people asked me today:\n" + long_text(tokenizer, tokens - 60, 37 * c)
        messages = [{"role": "user", "content": question + "\nWhich of them is the hardest? Say why."}]
        prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        body = {"model": "chatloop", "max_tokens": 48, "temperature": 1.0, "seed": c}
        turn1 = await stream_chat(url, {**body, "messages": messages}, keep_text=True)
        messages += [{"role": "assistant", "content": turn1.text}, {"role": "user", "content": "And the easiest?"}]
        turn2 = await stream_chat(url, {**body, "messages": messages})
        first.append(turn1.ttft_s)
        second.append(turn2.ttft_s)
    return Turns(first, second, prompt_tokens)


@dataclass
class Join:
    running: int
    prompt_tokens: int
    gap_before_ms: float  # median gap between a running stream's tokens before the join
    worst_gap_ms: float  # the longest any running stream waited for its next token while the prompt joined
    join_ttft_ms: float  # the joining prompt's time to first token


async def join_delay(url: str, tokenizer, running: int = 8, tokens: int = 1500) -> Join:
    body = {"model": "chatloop", "temperature": 1.0, "max_tokens": 1000}
    samples = [Sample(started=0.0) for _ in range(running)]
    streams = [asyncio.create_task(stream_chat(url, {**body, "seed": i, "messages": [
        {"role": "user", "content": f"Tell me a long story about a lighthouse keeper, number {i}."}]}, sample=s))
        for i, s in enumerate(samples)]
    while min(len(s.stamps) for s in samples) < 10:  # all decoding, for a while
        if ended := [t for t in streams if t.done()]:
            raise RuntimeError(f"a running stream ended early: {ended[0].result()}")
        await asyncio.sleep(0.05)
    prompt = [{"role": "user", "content": "Read this list, then say which is the odd one out:\n"
               + long_text(tokenizer, tokens - 40, 101)}]
    prompt_tokens = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))
    joined = await stream_chat(url, {**body, "max_tokens": 8, "messages": prompt})
    await asyncio.sleep(1.0)  # the joined row decodes beside them: its cost on their steps counts too
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    before, during = [], []
    for sample in samples:
        for a, b in zip(sample.stamps, sample.stamps[1:], strict=False):
            if b < joined.started:
                before.append(b - a)
            elif b > joined.started:
                during.append(b - a)
    if not during:
        raise RuntimeError("the running streams ended before the prompt joined")
    return Join(running, prompt_tokens, 1000 * statistics.median(before), 1000 * max(during),
                1000 * joined.ttft_s)


async def load_adapters(url: str, versions: list[str]) -> None:
    """One short request per version, so the server loads (merges and packs) each of them."""
    async with httpx.AsyncClient(timeout=300) as client:
        for version in versions:
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": version, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
            r.raise_for_status()


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def wait_idle(url: str, timeout_s: float = 60) -> None:
    """Until the server's engine has nothing decoding (what an earlier part left is cancelled or done)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/readyz", timeout=10).json().get("active_sequences", 0):
        if time.monotonic() > deadline:
            raise RuntimeError("the server never went idle")
        time.sleep(0.2)
