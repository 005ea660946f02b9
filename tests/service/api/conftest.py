"""A plain server on the tiny model (one per test module that does not define its own `server`) and an `openai`
client for it."""

import openai
import pytest

from tests.server import running_server, tiny_server_env


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, redis_url):
    data = tmp_path_factory.mktemp("data")
    with running_server(tiny_server_env(tiny_model_dir, data, redis_url), data / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
