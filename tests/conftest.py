"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, and LoRA adapters for it."""

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import redis.asyncio
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from service.engine.model import default_gguf_path
from service.settings import Settings
from tests.models import make_adapter

# `make test` runs the suite in pytest-xdist workers (TEST_WORKERS). Each worker gets its share of the cores, and
# the servers and workers it starts inherit that share, so two workers do not fight over every core.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
WORKER_INDEX = int(WORKER.removeprefix("gw"))
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)

# The modules whose tests take 20 s to over 2 min each (a real model, servers, workers, whole training runs), the
# slowest first. They run before the rest, so that pytest-xdist's work stealing, which takes tests from the back of
# a worker's queue, ends the suite on quick tests instead of one worker waiting out a long one alone. Keep it in
# step with the slowest tests `make test` prints.
SLOW_FIRST = (
    "tests/service/api/test_fuzz.py", "tests/service/cli/test_train.py", "tests/workers/test_loop.py",
    "tests/service/api/test_structured_outputs.py", "tests/rlhf/test_ppo.py", "tests/bench/test_loop.py",
    "tests/service/engine/test_llama.py", "tests/service/engine/test_real_model.py",
    "tests/service/serving/test_hot_swap.py", "tests/service/cli/test_launcher.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow modules first (SLOW_FIRST's order), every module's own tests in their usual order."""
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.split("::")[0]
        return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama saved as a model directory, with the default model's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "v1", seed=1)


@pytest.fixture
def tiny_settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(base_model=tiny_model_dir, data_dir=tmp_path, dtype="float32", device="cpu", max_context=256)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Tests use their own Redis database, flushed per test: REDIS_URL's (default 15) for the first xdist worker, the
    one below it for the second, and so on, so that workers never flush each other's data."""
    base = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    database = int(base.path.strip("/") or 0) - WORKER_INDEX
    if database < 0:
        pytest.exit(f"test worker {WORKER} has no Redis database left below REDIS_URL's: use fewer TEST_WORKERS")
    return urlunsplit(base._replace(path=f"/{database}"))


@pytest.fixture
def redis_sync(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def aredis(redis_url):
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()
