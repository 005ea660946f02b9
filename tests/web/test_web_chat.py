"""The web chat at / in a real Chromium (Playwright), against a real server on the tiny model and real Redis."""

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis.asyncio

from service.store import redis_keys
from service.store.api_keys import create_key
from service.store.runs import RUNS, update_run
from tests.server import running_server, tiny_server_env

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip; the plain HTTP ones still run
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
CHAT_LIMIT = 5  # chat requests a minute per caller: enough for each test, low enough to reach a 429 quickly
WAIT_MS = 60_000

# Every render of the newest answer while the page streams it: (turn state, text length).
RECORD_RENDERS = """() => {
    window.renders = [];
    new MutationObserver(() => {
        const turn = [...document.querySelectorAll('[data-testid="turn"]')].at(-1);
        const text = turn?.querySelector('[data-testid="answer-text"]')?.textContent ?? '';
        window.renders.push([turn?.dataset.state, text.length]);
    }).observe(document.querySelector('[data-testid="log"]'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_CHAT_REQUESTS_PER_MINUTE": str(CHAT_LIMIT)}
    with running_server(env, data / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    # `make test` installs both; in CI (CI=true) a missing browser is a failure, not a skip.
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    if sync_playwright is None:
        missing("the playwright package is not installed (pip install playwright; `make test` installs it)")
    if not CHROMIUM.exists():
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium; `make test` installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, redis_sync):  # redis_sync flushes the test database first
    context = browser.new_context(base_url=server, viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto("/")
    yield page
    context.close()


def send(page, text: str, max_tokens: int):
    page.get_by_test_id("max-tokens").fill(str(max_tokens))
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("send").click()
    turn = page.get_by_test_id("turn").last
    expect(turn).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    return turn


def completion(redis_sync, completion_id: str) -> dict:
    return json.loads(redis_sync.get(redis_keys.completion(completion_id)))


def events(redis_sync) -> list[dict]:
    return [json.loads(fields["event"]) for _, fields in redis_sync.xrange(redis_keys.EVENTS)]


def test_page_and_static_files(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'data-testid="prompt"' in page.text and "/static/app.js" in page.text
    script = httpx.get(f"{server}/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "/v1/chat/completions" in script.text
    assert httpx.get(f"{server}/static/style.css").headers["content-type"] == "text/css; charset=utf-8"
    for missing in ("nope.js", "..%2Fapp.py", "%2E%2E%2Froutes%2Fweb.py"):
        assert httpx.get(f"{server}/static/{missing}").status_code == 404, missing


def test_status_shows_adapter_feedback_and_latest_run(server, page, redis_sync):
    asked = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 4}).json()
    httpx.post(f"{server}/v1/feedback", json={"completion_id": asked["id"], "rating": "down"}).raise_for_status()
    update_run(redis_sync, "run1", id="run1", status="running", stage="chatloop.train_policy", trigger="admin key:k1",
               progress={"stage": "ppo", "step": 3, "total": 10, "metrics": {"ppo/loss/policy": 0.1}}, error="x")
    redis_sync.lpush(RUNS, "run1")
    status = httpx.get(f"{server}/v1/status").json()
    assert status["status"] == "ready" and status["production_adapter"] == "base"
    assert status["feedback"]["thumbs_down"] == 1 and status["feedback"]["new_since_training"] == 1
    # Only what the panel needs: no trigger (an API key id), no error text, no metrics.
    assert status["training"] == {"id": "run1", "status": "running", "stage": "chatloop.train_policy",
                                  "progress": {"stage": "ppo", "step": 3, "total": 10}}
    page.reload()
    expect(page.get_by_test_id("status-adapter")).to_have_text("base")
    expect(page.get_by_test_id("status-thumbs")).to_contain_text("1 down")
    expect(page.get_by_test_id("status-training")).to_have_text("running · ppo · 3/10")


def test_chat_streams_takes_a_thumb_and_regenerates(page, redis_sync):
    page.evaluate(RECORD_RENDERS)
    turn = send(page, "Tell me a story", max_tokens=200)
    answer = turn.get_by_test_id("answer-text")
    text = answer.text_content()
    renders = page.evaluate("window.renders")
    assert any(state == "streaming" and 0 < length < len(text) for state, length in renders), renders
    expect(turn.get_by_test_id("adapter")).to_have_text("adapter: base")
    completion_id = turn.get_attribute("data-completion-id")
    record = completion(redis_sync, completion_id)
    assert record["messages"] == [{"role": "user", "content": "Tell me a story"}]
    assert record["choices"][0]["text"] == text and record["params"]["max_tokens"] == 200

    turn.get_by_test_id("comment-toggle").click()
    turn.get_by_test_id("comment-input").fill("lovely, but too short")
    turn.get_by_test_id("thumb-up").click()
    expect(turn.get_by_test_id("feedback-state")).to_contain_text("Recorded")
    expect(turn.get_by_test_id("thumb-up")).to_have_attribute("aria-pressed", "true")
    [event] = events(redis_sync)
    assert event["kind"] == "thumb" and event["rating"] == 1 and event["comment"] == "lovely, but too short"
    assert event["answers"][0]["completion_id"] == completion_id
    expect(page.get_by_test_id("status-thumbs")).to_contain_text("1 up")

    turn.get_by_test_id("regenerate").click()
    expect(turn).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    regenerated = turn.get_attribute("data-completion-id")
    assert regenerated != completion_id and page.get_by_test_id("answer").count() == 1
    assert completion(redis_sync, regenerated)["messages"] == record["messages"]
    assert answer.text_content() == completion(redis_sync, regenerated)["choices"][0]["text"] != text
    expect(turn.get_by_test_id("feedback-state")).to_have_text("")
    expect(turn.get_by_test_id("thumb-up")).to_have_attribute("aria-pressed", "false")


def test_compare_pick_b_and_continue_with_b(page, redis_sync):
    page.get_by_test_id("compare-toggle").check()
    turn = send(page, "Pick one", max_tokens=16)
    answers = turn.get_by_test_id("answer")
    expect(answers).to_have_count(2)
    expect(turn.get_by_test_id("answer-label")).to_have_text(["Answer A", "Answer B"])
    completion_id = turn.get_attribute("data-completion-id")
    texts = [c["text"] for c in completion(redis_sync, completion_id)["choices"]]
    assert turn.get_by_test_id("answer-text").all_text_contents() == texts

    turn.get_by_test_id("pick-b").click()
    expect(turn.get_by_test_id("verdict-state")).to_contain_text("Answer B continues")
    expect(answers.nth(1)).to_have_class("answer chosen")
    [event] = events(redis_sync)
    assert event["kind"] == "comparison" and event["preferred"] == 1
    assert [a["completion_id"] for a in event["answers"]] == [completion_id, completion_id]

    page.get_by_test_id("compare-toggle").uncheck()
    follow_up = send(page, "Why?", max_tokens=8)
    assert completion(redis_sync, follow_up.get_attribute("data-completion-id"))["messages"] == [
        {"role": "user", "content": "Pick one"}, {"role": "assistant", "content": texts[1]},
        {"role": "user", "content": "Why?"},
    ]


def test_api_key_and_errors(server, page, redis_sync, redis_url):
    key_field = page.get_by_test_id("api-key")
    key_field.fill("cl-not-a-key")
    key_field.dispatch_event("change")
    page.get_by_test_id("prompt").fill("Hi")
    page.get_by_test_id("send").click()
    turn = page.get_by_test_id("turn").last
    expect(turn).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    expect(turn.get_by_test_id("error")).to_contain_text("Enter a valid API key")

    async def new_key() -> tuple[str, str]:
        async with redis.asyncio.Redis.from_url(redis_url, decode_responses=True) as r:
            return await create_key(r, "user", "web test")

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs an event loop in this thread
        key, key_id = pool.submit(asyncio.run, new_key()).result()
    key_field.fill(key)
    key_field.dispatch_event("change")
    page.reload()  # the key is kept in the browser
    expect(key_field).to_have_value(key)
    turn = send(page, "Hi", max_tokens=4)
    assert completion(redis_sync, turn.get_attribute("data-completion-id"))["owner"] == f"key:{key_id}"

    if time.time() % 60 > 55:  # the limit counts per calendar minute: use up this minute's requests in one
        time.sleep(61 - time.time() % 60)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    # One more than the limit: whether or not the page's request fell in this minute, the last is refused.
    statuses = [httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers).status_code
                for _ in range(CHAT_LIMIT + 1)]
    assert statuses[-1] == 429, statuses
    turn.get_by_test_id("regenerate").click()
    expect(turn).to_have_attribute("data-state", "error", timeout=WAIT_MS)
    expect(turn.get_by_test_id("error")).to_contain_text("Too many requests: please wait")
    expect(turn.get_by_test_id("regenerate")).to_have_text("Try again")
