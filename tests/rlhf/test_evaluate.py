import pytest
import torch

from rlhf.config import EvalConfig, GateConfig
from rlhf.evaluate import compare, gate
from rlhf.modeling import load_base
from tests.models import make_adapter

PROMPTS = [[{"role": "user", "content": f"Tell me about number {i}"}] for i in range(6)]
CONFIG = EvalConfig(temperature=1.0, max_new_tokens=6, batch_size=4, precision="fp32")


def length_reward(prompts, texts, ids):
    return torch.tensor([float(len(x)) for x in ids])


def metrics(**overrides):
    base = {
        "eval/candidate/score": 0.5, "eval/current/score": 0.0, "eval/candidate/kl": 3.0, "eval/current/kl": 1.0,
        "eval/candidate/length": 40.0, "eval/current/length": 42.0, "eval/candidate/eos": 0.9,
        "eval/current/eos": 0.95, "eval/win_rate": 0.7,
    }
    return base | overrides


def test_gate_accepts_a_better_candidate():
    assert gate(metrics(), GateConfig()) == (True, [])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"eval/candidate/score": -0.5}, "reward did not improve"),  # past the default tolerance
        ({"eval/candidate/kl": 30.0}, "KL to reference"),
        ({"eval/candidate/length": 10.0}, "collapsed in length"),
        ({"eval/candidate/eos": 0.5}, "fewer answers finish"),
    ],
)
def test_gate_rejects_with_a_reason(overrides, fragment):
    accepted, reasons = gate(metrics(**overrides), GateConfig())
    assert not accepted and len(reasons) == 1 and fragment in reasons[0]


def test_gate_win_rate_threshold():
    accepted, reasons = gate(metrics(**{"eval/win_rate": 0.4}), GateConfig(min_win_rate=0.55))
    assert not accepted and "win rate" in reasons[0]


def test_an_adapter_compared_with_itself_ties(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=3, b_std=0.05)
    base, tokenizer = load_base(tiny_model_dir)
    result = compare(base, tokenizer, length_reward, PROMPTS, adapter, adapter, CONFIG)
    for key in ("score", "kl", "length", "eos"):
        assert result[f"eval/candidate/{key}"] == pytest.approx(result[f"eval/current/{key}"])
    assert result["eval/win_rate"] == 0.5 and result["eval/prompts"] == len(PROMPTS)
    assert result["eval/candidate/kl"] > 0


def test_against_the_base_the_current_policy_has_zero_kl(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "a", seed=3, b_std=0.05)
    base, tokenizer = load_base(tiny_model_dir)
    result = compare(base, tokenizer, length_reward, PROMPTS, adapter, None, CONFIG)
    assert result["eval/current/kl"] == pytest.approx(0.0, abs=1e-5)
    assert result["eval/candidate/kl"] > 0.01
