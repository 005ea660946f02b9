"""The embeddable feedback widget (/widget.js) in a real Chromium, on a page served from another origin than the
API (a static server on another port), against a real server on the tiny model and real Redis."""

import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from service.cli.launcher import free_port
from service.store import redis_keys
from tests.server import running_server, tiny_server_env
from tests.service.api.keys import new_key
from tests.web.test_web_chat import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>.chatloop-feedback__thumb {{ color: rgb(1, 2, 3); }}</style></head>
<body>{answers}
<script src="{api}/widget.js"></script>
<script>{attach}</script>
</body></html>"""


@pytest.fixture(scope="module")
def page_site(tmp_path_factory):
    """A static server for the embedding pages: another port, so another origin than the API's."""
    root = tmp_path_factory.mktemp("site")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url, page_site):
    data = tmp_path_factory.mktemp("data")
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {"CHATLOOP_WIDGET_ORIGINS": page_site[1] + "/"}
    with running_server(env, data / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    missing = pytest.fail if os.environ.get("CI") else pytest.skip
    if sync_playwright is None or not CHROMIUM.exists():
        missing("the browser tests need playwright and /usr/bin/chromium (`make test` installs both)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def make_key(redis_url: str, role: str = "user") -> str:
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API may be running an event loop in this thread
        return pool.submit(new_key, redis_url, role, "widget test").result()


def embed(page_site, server: str, name: str, completion_id: str, key: str, choices: int = 1) -> str:
    """Write a page showing the answer's choices, each with the widget attached; return its URL."""
    root, origin = page_site
    answers = "".join(f'<p id="answer-{i}">answer {i}</p>' for i in range(choices))
    attach = "".join(
        f'ChatloopFeedback.attach(document.getElementById("answer-{i}"), {{completionId: "{completion_id}", '
        f'choiceIndex: {i}, choices: {choices}, apiKey: "{key}"}});' for i in range(choices))
    (Path(root) / name).write_text(PAGE.format(answers=answers, api=server, attach=attach))
    return f"{origin}/{name}"


def events(redis_sync) -> list[dict]:
    return [json.loads(fields["event"]) for _, fields in redis_sync.xrange(redis_keys.EVENTS)]


def test_thumbs_and_a_comment_from_another_origin(server, browser, page_site, redis_sync, redis_url):
    key = make_key(redis_url)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4)
    page = browser.new_page()
    try:
        page.goto(embed(page_site, server, "thumbs.html", answer.id, key))
        widget = page.locator("#answer-0 .chatloop-feedback")
        up = widget.get_by_role("button", name="Good answer")
        up.click()
        expect(widget.get_by_role("status")).to_have_text("Thanks, recorded", timeout=WAIT_MS)
        expect(up).to_have_attribute("aria-pressed", "true")
        [vote] = events(redis_sync)
        assert vote["kind"] == "thumb" and vote["rating"] == 1 and vote["answers"][0]["completion_id"] == answer.id

        # The keyboard alone: the comment toggle opens the box and focuses it; Ctrl+Enter sends it with the thumb.
        widget.get_by_role("button", name="Add a comment").focus()
        page.keyboard.press("Enter")
        comment = widget.get_by_role("textbox", name="Comment on this answer")
        expect(comment).to_be_focused()
        page.keyboard.type("short and kind")
        page.keyboard.press("Control+Enter")
        expect(widget).to_have_attribute("data-state", "recorded", timeout=WAIT_MS)
        newest = events(redis_sync)[-1]
        assert newest["rating"] == 1 and newest["comment"] == "short and kind"
        page.keyboard.press("Escape")
        expect(widget.get_by_role("button", name="Add a comment")).to_be_focused()
        # Styleable: no inline styles, and the page's own rule beats the widget's defaults.
        assert page.locator(".chatloop-feedback [style]").count() == 0
        assert up.evaluate("b => getComputedStyle(b).color") == "rgb(1, 2, 3)"
    finally:
        page.close()


def test_prefer_one_of_several_choices(server, browser, page_site, redis_sync, redis_url):
    key = make_key(redis_url)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="chatloop", messages=[{"role": "user", "content": "Pick"}],
                                            max_tokens=4, n=2)
    page = browser.new_page()
    try:
        page.goto(embed(page_site, server, "compare.html", answer.id, key, choices=2))
        second = page.locator("#answer-1 .chatloop-feedback")
        second.get_by_role("button", name="Prefer this answer").click()
        expect(second.get_by_role("status")).to_have_text("Thanks, preference recorded", timeout=WAIT_MS)
        [event] = events(redis_sync)
        assert event["kind"] == "comparison" and event["preferred"] == 1
        assert [a["completion_id"] for a in event["answers"]] == [answer.id, answer.id]
        # An error is shown, not swallowed: a thumb on a choice the answer does not have.
        page.evaluate(f'ChatloopFeedback.attach(document.body, {{completionId: "{answer.id}", choiceIndex: 5, '
                      f'apiKey: "{key}"}})')
        stray = page.locator("body > .chatloop-feedback")
        stray.get_by_role("button", name="Bad answer").click()
        expect(stray.get_by_role("status")).to_have_attribute("data-state", "error", timeout=WAIT_MS)
        expect(stray.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "false")
    finally:
        page.close()


def test_cors_is_for_widget_origins_and_feedback_routes_only(server, page_site, redis_sync, redis_url):
    origin = page_site[1]
    script = httpx.get(f"{server}/widget.js")
    assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{server}/v1/feedback", headers={"Origin": origin, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
    other = httpx.options(f"{server}/v1/feedback", headers={"Origin": "http://127.0.0.1:1", **preflight})
    assert "access-control-allow-origin" not in other.headers
    chat = httpx.options(f"{server}/v1/chat/completions", headers={"Origin": origin, **preflight})
    assert "access-control-allow-origin" not in chat.headers
    # An admin key from a widget page is refused (and the refusal is readable there); from elsewhere it works.
    admin = {"Authorization": f"Bearer {make_key(redis_url, 'admin')}"}
    body = {"completion_id": "chatcmpl-none", "rating": "up"}
    refused = httpx.post(f"{server}/v1/feedback", json=body, headers=admin | {"Origin": origin})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_from_widget"
    assert refused.headers["access-control-allow-origin"] == origin
    assert httpx.post(f"{server}/v1/feedback", json=body, headers=admin).status_code == 404  # past the key check
    assert events(redis_sync) == []
