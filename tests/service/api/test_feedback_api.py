"""Feedback routes through a real server and a real Redis: thumbs, comparisons, stats, bad input."""

import json

import httpx
import openai
import pytest

from tests.server import running_server, tiny_server_env

MESSAGES = [{"role": "user", "content": "Which answer is better?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_MAX_COMMENT_CHARS": "50"}
    with running_server(env, data / "server.log") as url:
        yield url


@pytest.fixture
def client(server, redis_sync):  # redis_sync flushes the test database first
    return openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0)


def ask(client, n=1, messages=MESSAGES, **kwargs):
    return client.chat.completions.create(
        model="chatloop", messages=messages, n=n, max_tokens=8, temperature=1.0, **kwargs
    )


def post(server, route, body, **kwargs):
    return httpx.post(f"{server}/v1/{route}", json=body, timeout=30, **kwargs)


def stats(server):
    return httpx.get(f"{server}/v1/feedback/stats").json()


def test_every_answer_is_logged(client, redis_sync):
    completion = ask(client, n=2, user="alice")
    record = json.loads(redis_sync.get(f"chatloop:completion:{completion.id}"))
    assert record["messages"] == MESSAGES and record["adapter"] == "base" and record["user"] == "alice"
    assert [c["text"] for c in record["choices"]] == [c.message.content for c in completion.choices]
    assert record["params"]["n"] == 2 and record["owner"] == "anonymous"
    assert 0 < redis_sync.ttl(f"chatloop:completion:{completion.id}") <= 7 * 24 * 3600


def test_streamed_answers_are_logged_before_done(client, server):
    chunks = list(ask(client, stream=True))
    receipt = post(server, "feedback", {"completion_id": chunks[0].id, "rating": "up"})
    assert receipt.status_code == 200, receipt.text


def test_thumbs_are_idempotent_and_replaceable(client, server, redis_sync):
    completion = ask(client)
    first = post(server, "feedback", {"completion_id": completion.id, "rating": 1, "comment": "nice"}).json()
    assert first["status"] == "recorded"
    again = post(server, "feedback", {"completion_id": completion.id, "rating": "up", "comment": "nice"}).json()
    assert again == first | {"status": "unchanged"}
    assert stats(server)["thumbs_up"] == 1
    changed = post(server, "feedback", {"completion_id": completion.id, "rating": "down"}).json()
    assert changed["status"] == "replaced"
    counts = stats(server)
    assert counts["thumbs_up"] == 0 and counts["thumbs_down"] == 1 and counts["events"] == 2
    assert redis_sync.ttl(f"chatloop:completion:{completion.id}") == -1  # rated answers are kept


def test_naming_another_user_is_still_the_same_voter(client, server):
    completion = ask(client)
    statuses = [post(server, "feedback", {"completion_id": completion.id, "rating": 1, "user": user}).json()["status"]
                for user in ("ann", "bob")]
    assert statuses == ["recorded", "unchanged"]
    assert stats(server)["thumbs_up"] == 1


def test_three_way_ranking_becomes_three_pairs(client, server, redis_sync):
    completion = ask(client, n=3)
    receipt = post(server, "comparisons", {"completion_id": completion.id, "ranking": [2, 0, 1]}).json()
    assert receipt["status"] == "recorded" and receipt["pairs"] == 3
    assert stats(server)["pairs"] == 3 and stats(server)["comparisons"] == 1


def test_preferred_tie_and_both_bad(client, server):
    completion = ask(client, n=2)
    assert post(server, "comparisons", {"completion_id": completion.id, "preferred": 1}).json()["pairs"] == 1
    tie = post(server, "comparisons", {"completion_id": completion.id, "preferred": "tie"}).json()
    assert tie["status"] == "replaced" and tie["pairs"] == 0
    post(server, "comparisons", {"completion_id": completion.id, "preferred": "both bad"})
    counts = stats(server)
    assert counts["comparisons"] == 1 and counts["both_bad"] == 1 and counts.get("ties", 0) == 0


def test_comparison_across_completions_of_one_conversation(client, server):
    a, b = ask(client), ask(client)
    body = {"answers": [{"completion_id": a.id}, {"completion_id": b.id}], "preferred": 0}
    assert post(server, "comparisons", body).json()["pairs"] == 1


def test_stats_count_new_feedback(client, server):
    completion = ask(client)
    post(server, "feedback", {"completion_id": completion.id, "rating": -1})
    counts = stats(server)
    assert counts["events"] == 1 and counts["new_since_training"] == 1 and counts["completions"] >= 1


def test_feedback_events_carry_what_a_trainer_needs(client, server, redis_sync):
    completion = ask(client, n=2)
    post(server, "comparisons", {"completion_id": completion.id, "ranking": [1, 0], "comment": "second is kinder"})
    [(_, fields)] = redis_sync.xrange("chatloop:feedback:events")
    event = json.loads(fields["event"])
    assert event["prompt"] == MESSAGES and event["ranking"] == [1, 0] and event["comment"] == "second is kinder"
    assert [a["text"] for a in event["answers"]] == [c.message.content for c in completion.choices]
    assert all(a["adapter"] == "base" for a in event["answers"])


def test_bad_feedback(client, server):
    one, three = ask(client), ask(client, n=3)
    other = ask(client, messages=[{"role": "user", "content": "Something else"}])
    cases = [
        ("feedback", {"completion_id": "chatcmpl-nope", "rating": 1}, 404, "completion_id"),
        ("feedback", {"completion_id": one.id, "rating": 5}, 422, "rating"),
        ("feedback", {"completion_id": one.id, "rating": "meh"}, 422, "rating"),
        ("feedback", {"completion_id": one.id, "rating": 1, "choice_index": 3}, 422, "choice_index"),
        ("feedback", {"completion_id": one.id, "rating": 1, "comment": "x" * 51}, 422, "comment"),
        ("feedback", {"rating": 1}, 422, "completion_id"),
        ("comparisons", {"completion_id": one.id, "preferred": 0}, 422, "answers"),
        ("comparisons", {"completion_id": three.id, "preferred": 3}, 422, "preferred"),
        ("comparisons", {"completion_id": three.id, "ranking": [0, 1]}, 422, "ranking"),
        ("comparisons", {"completion_id": three.id, "ranking": [0, 0, 1]}, 422, "ranking"),
        ("comparisons", {"completion_id": three.id}, 422, None),
        ("comparisons", {"completion_id": three.id, "preferred": 0, "ranking": [0, 1, 2]}, 422, None),
        ("comparisons", {"answers": [{"completion_id": one.id}, {"completion_id": other.id}], "preferred": 0},
         422, "answers"),
        ("comparisons", {"answers": [{"completion_id": one.id}, {"completion_id": one.id}], "preferred": 0},
         422, "answers"),
        ("comparisons", {"answers": [{"completion_id": one.id}, {"completion_id": "chatcmpl-x"}], "preferred": 0},
         404, "answers.1"),
    ]
    for route, body, status, param in cases:
        response = post(server, route, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if param is not None:
            assert error["param"] == param, (body, error)
    assert stats(server).get("events", 0) == 0  # nothing half-written
