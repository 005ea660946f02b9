"""Hostile input against a real server and Redis (issue 15): each abuse gets a 4xx in OpenAI's error shape, never
a 5xx, leaves nothing behind, and does not get in the way of a good request sent at the same moment."""

import asyncio
import json

import httpx
import pytest

from service.api.hosts import host_allowed, parse_allowed_hosts
from service.feedback.events import FeedbackEvent
from service.feedback.records import training_records
from tests.server import running_server, tiny_server_env
from tests.service.api.keys import new_key

MAX_N = 3
MESSAGES = [{"role": "user", "content": "Tell me something"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_MAX_N": str(MAX_N)}
    with running_server(env, data / "server.log") as url:
        yield url


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(server: str, headers: dict | None = None, **body) -> httpx.Response:
    body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 4} | body
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60)


def at_once(server: str, *calls: tuple[str, dict, dict]) -> list[httpx.Response]:
    """POST every (route, body, headers) at the same moment."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post(r, json=b, headers=h) for r, b, h in calls))

    return asyncio.run(run())


def refused(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def stats(redis_sync) -> dict[str, int]:
    return {k: int(v) for k, v in redis_sync.hgetall("chatloop:feedback:stats").items()}


def events(redis_sync) -> list[dict]:
    return [json.loads(fields["event"]) for _, fields in redis_sync.xrange("chatloop:feedback:events")]


def completion(server: str, n: int = 1, **kwargs) -> dict:
    response = chat(server, n=n, temperature=1.0, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


# 1. Comparisons: at most CHATLOOP_MAX_N answers, so one vote is at most MAX_N(MAX_N-1)/2 pairs.
def test_comparisons_take_at_most_max_n_answers(server, redis_sync):
    a, b = completion(server, n=2), completion(server, n=2)
    four = [{"completion_id": c["id"], "choice_index": i} for c in (a, b) for i in range(2)]
    good = completion(server, n=MAX_N)
    bad, ok = at_once(
        server,
        ("/v1/comparisons", {"answers": four, "ranking": [3, 2, 1, 0]}, {}),
        ("/v1/comparisons", {"completion_id": good["id"], "ranking": [2, 0, 1]}, {}),
    )
    refused(bad, 422, "answers")
    assert ok.status_code == 200 and ok.json()["pairs"] == 3, ok.text
    thousand = {"answers": [{"completion_id": f"chatcmpl-{i}"} for i in range(1000)], "preferred": 0}
    refused(httpx.post(f"{server}/v1/comparisons", json=thousand), 422, "answers")
    longer = {"completion_id": good["id"], "ranking": [0, 1, 2, 3]}
    refused(httpx.post(f"{server}/v1/comparisons", json=longer), 422, "ranking")
    # Only the good vote is there: one event, its three pairs.
    assert [len(e["answers"]) for e in events(redis_sync)] == [3]
    counts = stats(redis_sync)
    assert (counts["comparisons"], counts["pairs"], counts["events"]) == (1, 3, 1)


# 2. Stop strings: each at most CHATLOOP_MAX_STOP_CHARS, and not kept in the completion log.
def test_long_stop_strings_are_refused_and_none_is_logged(server, redis_sync):
    bad, ok = at_once(
        server,
        ("/v1/chat/completions", {"model": "chatloop", "messages": MESSAGES, "stop": ["ok", "x" * 100_000]}, {}),
        ("/v1/chat/completions", {"model": "chatloop", "messages": MESSAGES, "max_tokens": 4}, {}),
    )
    refused(bad, 400, "stop")
    assert ok.status_code == 200, ok.text
    refused(chat(server, stop="y" * 257), 400, "stop")
    longest = "z" * 256
    answer = completion(server, stop=[longest, "\n\n"])
    raw = redis_sync.get(f"chatloop:completion:{answer['id']}")
    assert longest not in raw
    assert json.loads(raw)["params"]["stop_strings"] == 2
    assert stats(redis_sync)["completions"] == 2  # the refused requests logged nothing


# 3. A seed past 64 signed bits is a 400 at the door; it never reaches the engine, so it cannot fail the other
# requests of its prefill.
def test_seed_out_of_range_is_a_400_and_harms_no_one(server, redis_sync):
    good = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": 7}
    responses = at_once(
        server,
        ("/v1/chat/completions", good | {"seed": 18446744073709551615}, {}),
        ("/v1/chat/completions", good, {}),
        ("/v1/chat/completions", good | {"seed": 2**63}, {}),
        ("/v1/chat/completions", good | {"seed": 1}, {}),
    )
    for bad in responses[0::2]:
        refused(bad, 400, "seed")
    for ok in responses[1::2]:
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2, ok.text
    for edge in (2**63 - 1, -(2**63)):  # the range's ends work, with n choices seeded edge + i
        assert chat(server, n=MAX_N, seed=edge).status_code == 200
    assert stats(redis_sync)["completions"] == 4


# 5. One key, one counted vote per answer, whatever `user` it names.
def test_the_user_field_does_not_multiply_a_callers_votes(server, redis_sync, redis_url):
    key = new_key(redis_url)
    answer = completion(server, headers=auth(key), n=2, user="ann")
    thumbs = [("ann", 1), ("bob", 1), ("eve", 1), ("mallory", -1)]
    receipts = [
        httpx.post(f"{server}/v1/feedback", json={"completion_id": answer["id"], "rating": rating, "user": user},
                   headers=auth(key)).json()["status"]
        for user, rating in thumbs
    ]
    assert receipts == ["recorded", "unchanged", "unchanged", "replaced"]
    for user in ("ann", "bob"):
        body = {"completion_id": answer["id"], "preferred": 0, "user": user}
        assert httpx.post(f"{server}/v1/comparisons", json=body, headers=auth(key)).status_code == 200
    counts = stats(redis_sync)
    assert (counts["thumbs_up"], counts["thumbs_down"], counts["comparisons"], counts["pairs"]) == (0, 1, 1, 1)
    records = training_records(FeedbackEvent.model_validate(e) for e in events(redis_sync))
    assert len(records) == 2  # one thumb and one pair, however many users the key named
    # The end user stays on each event, a record of who behind the key said it; the voter is the key alone.
    assert [e["user"] for e in events(redis_sync)] == ["ann", "mallory", "ann"]
    assert len({e["voter"] for e in events(redis_sync)}) == 1


# 6. Loopback anonymity only for requests straight from this machine: not through a proxy, not under another name.
@pytest.mark.parametrize("header", [
    {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "203.0.113.5"}, {"Forwarded": "for=127.0.0.1;proto=http"},
])
def test_no_anonymous_access_through_a_proxy(server, redis_sync, redis_url, header):
    refused(chat(server, headers=header), 401, code="missing_api_key")
    answer = completion(server)
    thumb = httpx.post(f"{server}/v1/feedback", json={"completion_id": answer["id"], "rating": 1}, headers=header)
    refused(thumb, 401, code="missing_api_key")
    assert "events" not in stats(redis_sync)
    assert chat(server, headers=header | auth(new_key(redis_url))).status_code == 200  # keys work behind proxies


def test_loopback_names_are_served_and_others_refused(server, redis_sync, redis_url):
    port = server.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.0.0.1"):
        assert chat(server, headers={"Host": host}).status_code == 200, host
    key = auth(new_key(redis_url))
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::1"):
        refused(chat(server, headers={"Host": host} | key), 400, "host", "invalid_host")
        refused(httpx.get(f"{server}/v1/models", headers={"Host": host}), 400, "host", "invalid_host")
        assert httpx.get(f"{server}/", headers={"Host": host}).status_code == 400  # the web chat too
    assert stats(redis_sync)["completions"] == 4


def test_allowed_hosts_setting(tiny_model_dir, tmp_path, redis_url, redis_sync):
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url) | {
        "CHATLOOP_ALLOWED_HOSTS": "chat.example.com, 127.0.0.1"
    }
    with running_server(env, tmp_path / "server.log") as url:
        key = auth(new_key(redis_url))
        assert chat(url, headers={"Host": "chat.example.com"} | key).status_code == 200
        # Listed, but not a loopback name: a proxy's public name, so no anonymous access under it.
        refused(chat(url, headers={"Host": "chat.example.com"}), 401, code="missing_api_key")
        refused(chat(url, headers={"Host": "localhost"} | key), 400, "host", "invalid_host")


def test_host_rule():
    default, listed = parse_allowed_hosts(""), parse_allowed_hosts("Chat.Example.com.,*.bad")
    assert default is None and listed == {"chat.example.com", "*.bad"}
    assert host_allowed("[::1]:8000", default, "::1") and not host_allowed(None, default, "127.0.0.1")
    assert host_allowed("anything.example", default, "10.0.0.5")  # reached on a public interface
    assert host_allowed("chat.example.com:443", listed, "127.0.0.1")
    assert not host_allowed("x.bad", listed, "10.0.0.5")  # names, not patterns
    assert host_allowed("x.example", parse_allowed_hosts("*"), "127.0.0.1")
