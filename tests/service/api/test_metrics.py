"""GET /metrics and structured logs, from a real server."""

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import running_server, tiny_server_env


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    with running_server(tiny_server_env(tiny_model_dir, data, redis_url), data / "server.log") as url:
        yield url, data / "server.log"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_happens(server, redis_sync):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    before = scrape(url)
    answer = client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8)
    list(client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=8, stream=True))
    httpx.post(f"{url}/v1/feedback", json={"completion_id": answer.id, "rating": 1})
    httpx.post(f"{url}/v1/feedback", json={"completion_id": "chatcmpl-missing", "rating": 1})
    after = scrape(url)

    def grew(name: str, by: float = 1, **labels) -> bool:
        return value(after, name, **labels) - value(before, name, **labels) >= by

    assert grew("chatloop_requests_total", 2, route="/v1/chat/completions", status="200")
    assert grew("chatloop_request_errors_total", route="/v1/feedback")
    assert grew("chatloop_time_to_first_token_seconds_count", 2)
    assert grew("chatloop_tokens_per_second_count", 1)
    assert grew("chatloop_completion_tokens_total", 2)
    assert grew("chatloop_feedback_events_total", kind="thumb", status="recorded")
    assert value(after, "chatloop_production_adapter_info", version="base") == 1
    assert ("chatloop_batch_size", ()) in after and value(after, "chatloop_active_streams") == 0


def test_logs_are_json_with_request_ids(server):
    url, log = server
    response = httpx.get(f"{url}/v1/models", headers={"X-Request-ID": "trace-me-123"})
    assert response.headers["x-request-id"] == "trace-me-123"
    assert len(httpx.get(f"{url}/healthz").headers["x-request-id"]) == 32  # made up when not given
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line.get("request_id") == "trace-me-123" for line in lines)
