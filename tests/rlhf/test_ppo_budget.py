"""A PPO run that ends past the gate's KL budget is pulled back along its own step (rlhf.kl_budget), on the
tiny random Llama at temperature 0.1, where one contrast step at lr 5e-2 moves the policy about 13 nats."""

from collections import Counter

import torch

from rlhf.kl_budget import measure_distance
from rlhf.modeling import load_base
from rlhf.pipeline import untrained_reason
from rlhf.ppo import PPOTrainer
from tests.models import make_adapter
from tests.rlhf.helpers import PROMPTS, six_comparisons, tiny_config


def contrast_run(model_dir, budget_trials: int, kl_limit: float) -> tuple[PPOTrainer, list[torch.Tensor], dict]:
    """A fresh adapter's contrast on six comparisons, one step at lr 5e-2 (the room kl_limit leaves stops it there):
    the trainer, its parameters before the run, and the run's last stats."""
    base, tokenizer = load_base(model_dir)
    config = tiny_config(minibatch_size=2, lr=5e-2, served_step="contrast", max_kl=1e6, budget_trials=budget_trials)
    trainer = PPOTrainer(base, tokenizer, None, config)
    start = [p.detach().clone() for p in trainer.params]
    torch.manual_seed(0)
    reports = []
    [stats] = trainer.train(PROMPTS, 1, lambda i, s: reports.append((i, dict(s))), six_comparisons(), kl_limit)
    # the iteration is reported, and again with where the run ends when the fit measured it
    assert [i for i, _ in reports] == [1] * (1 if budget_trials == 0 else 2) and reports[-1][1] == stats
    assert "ppo/budget_scale" not in reports[0][1]
    return trainer, start, stats


def test_a_run_past_the_budget_is_pulled_back_along_its_own_step(tiny_model_dir):
    """Without the fit the step ends far past a 2-nat budget; with it the policy is start + f * (end - start) for
    an f in (0, 1), the same step shortened, and its last measure (the policy it ends with) is within the budget by
    its standard error."""
    unfitted, start, stats = contrast_run(tiny_model_dir, budget_trials=0, kl_limit=2.0)
    assert stats["ppo/steps"] == 1 and "ppo/budget_scale" not in stats
    kl, se = measure_distance(unfitted, PROMPTS)
    assert kl - 2 * se > 2.0 * 2  # the problem: one step went far past the budget
    end = [p.detach().clone() for p in unfitted.params]

    trainer, fitted_start, stats = contrast_run(tiny_model_dir, budget_trials=3, kl_limit=2.0)
    f = stats["ppo/budget_scale"]
    assert 0 < f < 1 and 1 <= stats["ppo/budget_trials"] <= 3
    assert stats["ppo/budget_kl"] + stats["ppo/budget_kl_se"] <= 2.0  # within it, by one standard error
    for p, a, b, a2 in zip(trainer.params, start, end, fitted_start, strict=True):
        torch.testing.assert_close(a2, a)  # both runs started from the same adapter
        torch.testing.assert_close(p.detach(), a + f * (b - a))
    assert not trainer.at_reference
    assert untrained_reason("ppo", [stats], 2.0) is None


def test_a_run_within_the_budget_keeps_its_step(tiny_model_dir):
    """A budget far beyond the step: f 1 after the first measure, the parameters exactly those of a run without the
    fit."""
    unfitted, _, _ = contrast_run(tiny_model_dir, budget_trials=0, kl_limit=1e6)
    trainer, _, stats = contrast_run(tiny_model_dir, budget_trials=3, kl_limit=1e6)
    assert stats["ppo/budget_scale"] == 1.0 and stats["ppo/budget_trials"] == 0.0
    for p, q in zip(trainer.params, unfitted.params, strict=True):
        torch.testing.assert_close(p, q)


def test_a_start_already_past_the_budget_ends_where_it_started(tiny_model_dir, tmp_path):
    """From an adapter about 20 nats out, a clipped served step (no room to respect) against a 5-nat budget: no
    fraction of the step can bring it within, so the policy is its start again and the run counts as untrained."""
    base, tokenizer = load_base(tiny_model_dir)
    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "prod", seed=3)
    config = tiny_config(minibatch_size=2, lr=5e-2, served_step="clipped", budget_trials=3)
    trainer = PPOTrainer(base, tokenizer, None, config, init_adapter_dir=adapter_dir)
    start = [p.detach().clone() for p in trainer.params]
    # answers another version wrote: the start's distance is then measured on fresh samples of its own
    served = [s._replace(on_policy=False) for s in six_comparisons()]
    history = trainer.train(PROMPTS, 1, served=served, kl_limit=5.0)
    stats = history[-1]
    assert stats["ppo/steps"] > 0 and stats["ppo/budget_kl"] > 5.0
    assert stats["ppo/budget_scale"] == 0.0 and stats["ppo/budget_trials"] == 0.0
    for p, a in zip(trainer.params, start, strict=True):
        assert torch.equal(p.detach(), a)
    assert "pulled back to its start" in untrained_reason("ppo", history, 5.0)


def record_samples(trainer: PPOTrainer) -> list:
    """The prompts of each trainer.sample call from now on, in order."""
    asked: list = []
    sample = trainer.sample
    trainer.sample = lambda prompts: asked.append(prompts) or sample(prompts)
    return asked


def test_the_end_is_measured_on_one_answer_to_each_of_the_gates_prompts(tiny_model_dir):
    """As the gate measures (EvalConfig.prompts, 32): 32 answers to 32 distinct prompts, not PPO's groups of one
    prompt's answers, whose KLs are not independent; a pool of fewer prompts is used whole, each prompt as often as
    another; a gate configured to evaluate on 12 prompts, 12."""
    base, tokenizer = load_base(tiny_model_dir)
    trainer = PPOTrainer(base, tokenizer, None, tiny_config(batch_size=8, group_size=4))
    asked = record_samples(trainer)
    pool = [[{"role": "user", "content": f"Question {i}?"}] for i in range(40)]
    kl, se = measure_distance(trainer, pool)
    assert [len(p) for p in asked] == [8] * 4  # batch_size answers a pass
    texts = [p[0]["content"] for batch in asked for p in batch]
    assert len(set(texts)) == 32 and set(texts) <= {p[0]["content"] for p in pool}
    assert kl == 0.0 and se == 0.0  # a fresh adapter is the reference itself

    asked.clear()
    measure_distance(trainer, PROMPTS)
    counts = Counter(p[0]["content"] for batch in asked for p in batch)
    assert sum(counts.values()) == 32 and set(counts) == {p[0]["content"] for p in PROMPTS}
    assert max(counts.values()) - min(counts.values()) <= 1

    asked.clear()
    measure_distance(trainer, pool, 12)
    assert [len(p) for p in asked] == [8, 4]
    assert len({p[0]["content"] for batch in asked for p in batch}) == 12


def test_a_start_that_wrote_none_of_its_served_answers_is_measured_on_distinct_served_prompts(tiny_model_dir, tmp_path):
    """Just after a promotion the served answers are other versions': the start's own distance is then measured on
    one fresh answer to each of the gate's count of served prompts (12 here), distinct ones as far as they go (the
    6 comparisons' 6 prompts, twice each), not on a batch in the served answers' order (pairs of one prompt)."""
    base, tokenizer = load_base(tiny_model_dir)
    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "prod", seed=3)
    config = tiny_config(batch_size=8, group_size=4, minibatch_size=2, served_step="contrast", max_kl=5.0)
    trainer = PPOTrainer(base, tokenizer, None, config, init_adapter_dir=adapter_dir)
    asked = record_samples(trainer)
    served = [s._replace(on_policy=False) for s in six_comparisons()]
    stats = trainer.step_served(served, kl_limit=20.0, budget_prompts=12)
    assert [len(p) for p in asked] == [8, 4]
    counts = Counter(p[0]["content"] for batch in asked for p in batch)
    assert set(counts) == {p[0]["content"] for p in PROMPTS[:6]} and set(counts.values()) == {2}
    assert stats["ppo/start_kl"] > 0.1  # the adapter really is away from the reference
