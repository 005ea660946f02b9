"""A streaming chat client cheap enough that a benchmark on the server's own cores measures the server.

The `openai` client builds a pydantic object per chunk; at 16 streams on two shared cores that cost alone
took a third of the throughput from the server it was measuring (bench/RESULTS.md). This one writes one
HTTP/1.1 request on a fresh connection and reads the raw byte stream: it stamps the arrival of every
content event and parses JSON only once, for the usage at the end.
"""

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CONTENT = b'"delta":{"content":"'


@dataclass
class Sample:
    started: float  # time.perf_counter() when the request was sent
    stamps: list[float] = field(default_factory=list)  # arrival of each event with content, in order
    tokens: int = 0  # completion tokens, from the usage chunk
    label: str = ""  # system_fingerprint: the adapter version that answered
    text: str = ""  # the answer, when asked for

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.started

    @property
    def stream_tok_s(self) -> float | None:
        """Tokens after the first over the time after the first (None when fewer than two events came)."""
        if len(self.stamps) < 2 or self.stamps[-1] <= self.stamps[0]:
            return None
        return (self.tokens - 1) / (self.stamps[-1] - self.stamps[0])


class StreamError(RuntimeError):
    pass


async def stream_chat(
    url: str, body: dict, keep_text: bool = False, api_key: str = "bench", sample: Sample | None = None
) -> Sample:
    """POST a streaming chat completion (stream_options.include_usage is added) and read it to [DONE].

    `sample`, when given, is filled as the stream goes, for a caller that watches it from another task.
    """
    parts = urlsplit(url)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sample = sample or Sample(started=0.0)
    sample.started = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head + payload)
        status = await reader.readline()
        if b" 200 " not in status:
            raise StreamError(f"{status.decode().strip()}: {(await reader.read()).decode(errors='replace')[:300]}")
        while (await reader.readline()) not in (b"\r\n", b""):  # the headers
            pass
        pending, last_event, texts = b"", b"", []
        while chunk := await reader.read(65536):
            now = time.perf_counter()
            events = (pending + chunk).split(b"\n\n")
            pending = events.pop()
            content = False
            for event in events:
                at = event.find(b"data: ")
                data = event[at + 6 :] if at >= 0 else b""
                at = data.find(CONTENT)
                if at >= 0 and data[at + len(CONTENT) : at + len(CONTENT) + 1] != b'"':
                    content = True
                    if keep_text:
                        texts.append(json.loads(data)["choices"][0]["delta"]["content"])
                if data.startswith(b"{") and b'"usage":{' in data:
                    last_event = data
            if content:
                sample.stamps.append(now)
    finally:
        writer.close()
    if not last_event:
        raise StreamError("the stream ended without a usage chunk")
    final = json.loads(last_event)
    sample.tokens, sample.label = final["usage"]["completion_tokens"], final["system_fingerprint"]
    sample.text = "".join(texts)
    if not sample.stamps:
        raise StreamError("the stream had no content")
    return sample
