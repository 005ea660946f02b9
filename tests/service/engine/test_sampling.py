import math

import pytest
import torch

from service.engine.sampling import sample, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before each: 0, 0.5, 0.8, 0.95. With p=0.8 keep 0.5 and 0.3.
    kept = top_p_filter(probs, torch.tensor([0.8]))
    assert torch.allclose(kept, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # p=0.5: 0.5 alone reaches it.
    assert torch.allclose(top_p_filter(probs, torch.tensor([0.5])), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # p=1 keeps everything.
    assert torch.allclose(top_p_filter(probs, torch.tensor([1.0])), probs)


def test_top_p_rows_are_independent():
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    kept = top_p_filter(probs, torch.tensor([0.5, 1.0]))
    assert torch.allclose(kept, torch.tensor([[1.0, 0.0], [0.6, 0.4]]))


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    out = sample(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), _gens(1, 2))
    assert out.tolist() == [1, 0]


def test_mixed_greedy_and_sampled_rows():
    # Even rows greedy, odd rows sampled from a flat distribution, all in one batch.
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 0.0, 0.0]]).repeat(100, 1)
    temperature = torch.tensor([0.0, 1.0]).repeat(100)
    out = sample(logits, temperature, torch.ones(200), _gens(*range(200)))
    assert set(out[0::2].tolist()) == {1}
    assert set(out[1::2].tolist()) == {0, 1, 2}  # 100 flat draws miss a token with probability ~1e-17
    alone = [sample(logits[i : i + 1], temperature[i : i + 1], torch.ones(1), _gens(i)) for i in (1, 3, 5)]
    assert [int(a) for a in alone] == out[1:6:2].tolist()  # a sampled row draws the same as it would alone


def test_same_seed_same_tokens_regardless_of_other_rows():
    logits = torch.randn(3, 50)
    t, p = torch.ones(3), torch.full((3,), 0.9)
    a = sample(logits, t, p, _gens(7, 8, 9))
    b = sample(logits[1:2], t[:1], p[:1], _gens(8))
    assert a[1] == b[0]


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log()[None].repeat(4000, 1)
    gens = _gens(*range(4000))
    out = sample(logits, torch.ones(4000), torch.ones(4000), gens)
    freq = torch.bincount(out, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(2000, 1)
    out = sample(logits, torch.ones(2000), torch.full((2000,), 0.8), _gens(*range(2000)))
    assert set(out.tolist()) == {0, 1}


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0]).repeat(3000, 1)
    cold = sample(logits, torch.full((3000,), 0.25), torch.ones(3000), _gens(*range(3000)))
    # p(token 0) = sigmoid(1 / 0.25) = 0.982
    assert (cold == 0).float().mean() > 0.96


def test_top_p_filter_equals_a_full_sort_on_wide_and_peaked_rows():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 5000) * 0.1, torch.randn(3, 5000) * 8])  # huge and tiny nuclei
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.5, 0.9, 0.99, 0.5, 0.9, 0.99])
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    expected = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(before >= top_p[:, None], 0))
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(top_p_filter(probs, top_p), expected, atol=1e-6)


def test_logprobs_are_those_of_the_distribution_sampled_from():
    from service.engine.sampling import logprobs

    logits = torch.tensor([[2.0, 1.0, 0.0]] * 4)
    temperature = torch.tensor([1.0, 2.0, 2.0, 0.0])
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.5])
    chosen, values, ids = logprobs(logits, temperature, top_p, torch.tensor([1, 1, 1, 0]), top=3)
    z1 = math.exp(2) + math.exp(1) + 1  # T = 1: softmax of (2, 1, 0)
    z2 = math.exp(1) + math.exp(0.5) + 1  # T = 2: softmax of (1, 0.5, 0) = (0.506, 0.307, 0.186)
    nucleus = math.exp(1) + math.exp(0.5)  # top_p 0.7 keeps the first two (0.813 of the mass)
    assert chosen.tolist() == pytest.approx(
        [1 - math.log(z1), 0.5 - math.log(z2), 0.5 - math.log(nucleus), 2 - math.log(z1)], abs=1e-5)
    assert ids.tolist() == [[0, 1, 2]] * 4
    assert values.tolist() == [
        pytest.approx([2 - math.log(z1), 1 - math.log(z1), -math.log(z1)], abs=1e-5),
        pytest.approx([1 - math.log(z2), 0.5 - math.log(z2), -math.log(z2)], abs=1e-5),
        [pytest.approx(1 - math.log(nucleus), abs=1e-5), pytest.approx(0.5 - math.log(nucleus), abs=1e-5), -math.inf],
        pytest.approx([2 - math.log(z1), 1 - math.log(z1), -math.log(z1)], abs=1e-5),  # greedy: the model's own
    ]
