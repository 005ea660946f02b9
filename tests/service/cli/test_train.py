"""`chatloop train` and `chatloop eval` end to end on the tiny model: feedback file -> reward model -> PPO ->
evaluation, and the gate's verdict printed as it was decided."""

import json
import os
import random
import subprocess
import sys

from safetensors import safe_open

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "window", "paper", "music", "winter"]


def run(*args, env):
    result = subprocess.run([sys.executable, "-m", "service.cli.main", *args], env=env, capture_output=True, text=True)
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

    evaluate = ["eval", "--candidate", str(tmp_path / "cand"), "--reward-model", str(tmp_path / "rm"), "--json"]
    out = run(*evaluate, str(tmp_path / "reject.json"), env=env | {"CHATLOOP_GATE_MIN_SCORE_GAIN": "1000"})
    result = json.loads((tmp_path / "reject.json").read_text())
    assert set(result) == {"metrics", "accepted", "reasons"} and result["accepted"] is False
    assert any("reward did not improve" in reason for reason in result["reasons"])
    assert out.rstrip().endswith("REJECT: " + "; ".join(result["reasons"]))
    # The current policy is the base itself (no --current): its KL to the base is exactly zero, the candidate's not.
    assert result["metrics"]["eval/current/kl"] == 0.0 and result["metrics"]["eval/candidate/kl"] != 0.0

    anything = {"CHATLOOP_GATE_MIN_SCORE_GAIN": "-1000", "CHATLOOP_GATE_MAX_KL": "1000",
                "CHATLOOP_GATE_MIN_LENGTH_RATIO": "0", "CHATLOOP_GATE_MAX_EOS_DROP": "1"}
    out = run(*evaluate, str(tmp_path / "accept.json"), env=env | anything)
    assert json.loads((tmp_path / "accept.json").read_text())["accepted"] is True
    assert "eval/win_rate" in out and out.rstrip().endswith("ACCEPT")
