"""The offline CLI end to end on the tiny model: feedback file -> reward model -> PPO -> evaluation."""

import json
import os
import random
import subprocess
import sys

from safetensors import safe_open

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "window", "paper", "music", "winter"]


def run(*args, env):
    result = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_reward_ppo_and_eval(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    with (tmp_path / "feedback.jsonl").open("w") as f:
        for i in range(80):
            prompt = [{"role": "user", "content": f"Say something about {rng.choice(WORDS)} number {i}"}]
            words = rng.sample(WORDS, 3)
            pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": " ".join(["banana", *words])}],
                    "rejected": [{"role": "assistant", "content": " ".join(words)}]}
            f.write(json.dumps(pair) + "\n")
    env = {**os.environ, "CHATLOOP_BASE_MODEL": str(tiny_model_dir), "CHATLOOP_DATA_DIR": str(tmp_path),
           "CHATLOOP_LORA_R": "4", "CHATLOOP_LORA_ALPHA": "8", "OMP_NUM_THREADS": "1"}

    out = run("train", "reward", "--data", str(tmp_path / "feedback.jsonl"), "--out", str(tmp_path / "rm"),
              "--epochs", "1", env=env)
    assert "reward/heldout_accuracy" in out and (tmp_path / "rm" / "reward_model.safetensors").exists()

    out = run("train", "ppo", "--reward-model", str(tmp_path / "rm"), "--iterations", "1",
              "--out", str(tmp_path / "cand"), env=env)
    assert "objective/kl" in out
    with safe_open(tmp_path / "cand" / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_A" in k for k in weights.keys())  # noqa: SIM118 (safe_open is not a dict)
    assert json.loads((tmp_path / "cand" / "ppo_stats.json").read_text())["history"]

    out = run("eval", "--candidate", str(tmp_path / "cand"), "--reward-model", str(tmp_path / "rm"),
              "--json", str(tmp_path / "eval.json"), env=env)
    assert "eval/win_rate" in out and ("ACCEPT" in out or "REJECT" in out)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == {"metrics", "accepted", "reasons"} and result["metrics"]["eval/candidate/kl"] >= 0
