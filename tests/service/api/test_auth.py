"""API keys, roles, anonymous access and rate limits, against a real server and Redis."""

import asyncio
import os
import subprocess
import sys

import httpx
import openai
import pytest

from service.api.auth import Caller, enforce_rate_limit, identify, is_loopback
from service.errors import APIError
from service.store.api_keys import create_key, list_keys, revoke_key
from tests.server import running_server, tiny_server_env

MESSAGES = [{"role": "user", "content": "Hi"}]


def cli_create_key(redis_url: str, role: str, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "keys", "create", "--role", role, "--name", name],
        env={**os.environ, "CHATLOOP_REDIS_URL": redis_url}, capture_output=True, text=True, check=True,
    ).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    env = tiny_server_env(tiny_model_dir, data, redis_url) | {
        "CHATLOOP_ANONYMOUS": "never", "CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "1000",
    }
    with running_server(env, data / "server.log") as url:
        yield url


@pytest.fixture
def keys(redis_sync, redis_url):
    return {name: cli_create_key(redis_url, role, name) for name, role in
            [("alice", "user"), ("bob", "user"), ("root", "admin")]}


def chat(server, key, **kwargs):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model="chatloop", messages=MESSAGES, max_tokens=4, **kwargs)


def thumb(server, key, completion_id):
    return httpx.post(
        f"{server}/v1/feedback", json={"completion_id": completion_id, "rating": 1},
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )


def test_keys_are_required_when_anonymous_is_off(server, keys):
    for key in ("EMPTY", "cl-not-a-real-key"):
        with pytest.raises(openai.AuthenticationError):
            chat(server, key)
    assert thumb(server, None, "chatcmpl-x").status_code == 401
    response = httpx.post(f"{server}/v1/feedback", json={}, headers={"Authorization": "Basic abc"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_feedback_only_on_your_own_answers(server, keys):
    completion = chat(server, keys["alice"])
    assert thumb(server, keys["alice"], completion.id).status_code == 200
    denied = thumb(server, keys["bob"], completion.id)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "not_owner"
    assert thumb(server, keys["root"], completion.id).status_code == 200  # admins may


def test_revoked_keys_stop_working(server, keys, redis_url):
    import redis.asyncio

    async def revoke():
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        records = {r["name"]: r["id"] for r in await list_keys(client)}
        assert await revoke_key(client, records["bob"])
        await client.aclose()

    chat(server, keys["bob"])
    asyncio.run(revoke())
    with pytest.raises(openai.AuthenticationError):
        chat(server, keys["bob"])


def test_keys_are_stored_hashed(keys, redis_sync):
    dump = " ".join(str(redis_sync.hgetall(k)) for k in redis_sync.keys("chatloop:apikey*"))
    assert all(key not in dump for key in keys.values())


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback("testclient")


async def test_anonymous_setting(aredis):
    assert (await identify(aredis, None, "127.0.0.1", "loopback", True)).role == "anonymous"
    assert (await identify(aredis, "Bearer EMPTY", "::1", "loopback", True)).principal == "anonymous"
    for address, direct in (("192.0.2.7", True), ("127.0.0.1", False)):  # not local, or through a proxy
        with pytest.raises(APIError) as err:
            await identify(aredis, None, address, "loopback", direct)
        assert err.value.status == 401
    assert (await identify(aredis, None, "192.0.2.7", "always", False)).role == "anonymous"
    key, key_id = await create_key(aredis, "admin", "ops")
    caller = await identify(aredis, f"Bearer {key}", "192.0.2.7", "never", False)
    assert caller == Caller(key_id=key_id, role="admin", address="192.0.2.7")


async def test_rate_limit_window(aredis):
    caller = Caller(key_id="k1", role="user", address="127.0.0.1")
    for _ in range(3):
        await enforce_rate_limit(aredis, caller, "chat", 3)
    with pytest.raises(APIError) as err:
        await enforce_rate_limit(aredis, caller, "chat", 3)
    assert err.value.status == 429 and 1 <= int(err.value.headers["Retry-After"]) <= 61
    other = Caller(key_id="k2", role="user", address="127.0.0.1")
    await enforce_rate_limit(aredis, other, "chat", 3)  # limits are per caller
    await enforce_rate_limit(aredis, caller, "feedback", 3)  # and per route


def test_rate_limited_requests_get_429_with_retry_after(tiny_model_dir, tmp_path, redis_url, redis_sync):
    env = tiny_server_env(tiny_model_dir, tmp_path, redis_url) | {"CHATLOOP_CHAT_REQUESTS_PER_MINUTE": "2"}
    with running_server(env, tmp_path / "server.log") as url:
        body = {"model": "chatloop", "messages": MESSAGES, "max_tokens": 2}
        codes = [httpx.post(f"{url}/v1/chat/completions", json=body) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[-1].headers["retry-after"]) >= 1
        assert codes[-1].json()["error"]["type"] == "rate_limit_error"
