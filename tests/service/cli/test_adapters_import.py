"""`chatloop adapters import` registers only adapters that replicas can merge into the base model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.cli.main import check_adapter
from tests.server import tiny_server_env

WEIGHTS = "adapter_model.safetensors"


def altered(adapter_dir: Path, out: Path, change) -> Path:
    """A copy of the adapter with its tensors passed through change(tensors)."""
    shutil.copytree(adapter_dir, out)
    tensors = load_file(adapter_dir / WEIGHTS)
    change(tensors)
    save_file(tensors, out / WEIGHTS)
    return out


def wrong_shape(tensors: dict) -> None:
    name = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0], 32)  # the base's q_proj takes 64 inputs


def not_finite(tensors: dict) -> None:
    name = next(k for k in tensors if "down_proj.lora_B" in k)
    tensors[name][0, 0] = float("nan")


def foreign_module(tensors: dict) -> None:
    for name in [k for k in tensors if "layers.0.self_attn.q_proj" in k]:  # lora_A and lora_B
        tensors[name.replace("layers.0", "layers.7")] = tensors[name].clone()  # the base has two layers


@pytest.mark.parametrize("change", [wrong_shape, not_finite, foreign_module])
def test_adapters_that_do_not_fit_the_base_are_refused(tiny_adapter_dir, tiny_settings, tmp_path, change):
    bad = altered(tiny_adapter_dir, tmp_path / "bad", change)
    with pytest.raises(SystemExit, match="does not fit the base model"):
        check_adapter(bad, tiny_settings)
    check_adapter(tiny_adapter_dir, tiny_settings)  # the original fits


def test_truncated_weights_are_refused(tiny_adapter_dir, tiny_settings, tmp_path):
    bad = shutil.copytree(tiny_adapter_dir, tmp_path / "bad")
    (bad / WEIGHTS).write_bytes((tiny_adapter_dir / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(SystemExit, match="does not fit the base model"):
        check_adapter(bad, tiny_settings)


def test_the_command_registers_nothing_it_refuses(tiny_model_dir, tiny_adapter_dir, tmp_path, redis_url, redis_sync):
    env = {**os.environ, **tiny_server_env(tiny_model_dir, tmp_path, redis_url), "CHATLOOP_DEVICE": "cpu"}
    bad = altered(tiny_adapter_dir, tmp_path / "bad", wrong_shape)
    command = [sys.executable, "-m", "service.cli.main", "adapters", "import", "--promote"]
    refused = subprocess.run([*command, str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "does not fit the base model" in refused.stderr, refused.stderr
    assert redis_sync.keys("chatloop:adapter*") == []
    taken = subprocess.run([*command, str(tiny_adapter_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr
    assert "registered" in taken.stdout and "promoted v0001" in taken.stdout
    assert json.loads(redis_sync.get("chatloop:adapter:v0001:meta"))["sha256"]
