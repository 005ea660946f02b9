"""Token sampling for a batch whose rows have their own temperature, top_p and random stream.

This runs once per decode step over a (B, 49152) vocabulary, so it avoids whole-vocabulary work it
does not need: no argmax unless a row is greedy, no temperature division when all are 1, no top_p
work unless a row asks for it, and no full sort for top_p (see top_p_filter).
"""

import torch

NUCLEUS_START = 64  # first guess at the nucleus size; grown until it holds top_p of the mass
RESCORED = 8  # greedy rows' best tokens rescored in fp32 when the logits came in bf16


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p; rows are renormalised.

    probs: (B, V) rows summing to 1; top_p: (B,) in (0, 1]. The most likely token always survives.
    """
    kept = _nucleus(probs, top_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p_filter without the renormalisation: probs outside the nucleus zeroed. (B, V)

    Sorting the whole vocabulary costs ~3 ms a row at 49152 tokens; topk of a few dozen a tenth of that.
    Once a row's top k hold at least top_p of its mass, every token past them is outside the nucleus,
    so the result equals the full sort's. Rows whose nucleus is bigger are retried with a larger k on
    their own: the median nucleus here is ~16 tokens, but one row in a batch often needs ~1000.
    """
    kept = torch.zeros_like(probs)
    rows = torch.arange(len(probs), device=probs.device)
    k = min(NUCLEUS_START, probs.shape[-1])
    while len(rows):
        values, indices = (probs if len(rows) == len(probs) else probs[rows]).topk(k, dim=-1)  # (R, k) descending
        mass = values.cumsum(dim=-1)  # (R, k)
        done = (mass[:, -1] >= top_p[rows]) | (k == probs.shape[-1])  # (R,)
        mass_before = mass - values  # mass of the tokens ranked above each one
        values = values.masked_fill(mass_before >= top_p[rows, None], 0.0)
        kept[rows[done, None], indices[done]] = values[done]
        rows, k = rows[~done], min(4 * k, probs.shape[-1])
    return kept


def rescore_greedy(
    weights: torch.Tensor, greedy: torch.Tensor, rows: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Fix the argmax of `rows` in place, from their best few tokens' logits recomputed in fp32.

    bf16 logits are rounded to 3 significant digits, so two tokens a few hundredths apart often tie (at
    ~25, the step is 0.125) and argmax picks the lower id. Each recomputed logit is the exact dot product
    of the bf16 hidden state and the token's bf16 weights, as an fp32 head would give.
    """
    hidden, head = exact  # (B, hidden), (V, hidden)
    best = weights[rows].topk(min(RESCORED, weights.shape[-1]), dim=-1)  # (R, k)
    candidates = best.indices
    scores = torch.einsum("rd,rkd->rk", hidden[rows].float(), head[candidates].float())  # (R, k)
    scores.masked_fill_(best.values == float("-inf"), float("-inf"))  # masked by a grammar: never a candidate
    greedy[rows] = candidates.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(-1)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
    exact: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits: (B, V); temperature, top_p: (B,); one generator per row.

    Temperature 0 is greedy; `exact` (final hidden states (B, hidden), head weight (V, hidden)) lets greedy
    rows settle bf16 ties in fp32. Each row draws its uniform number from its own generator, so a seeded
    request gets the same answer whatever else shares the batch.
    """
    greedy_rows = temperature == 0
    any_greedy = bool(greedy_rows.any())
    # One fp32 copy, then worked on in place: each fresh (B, V) tensor is another pass over memory.
    weights = logits.to(torch.float32, copy=True)  # (B, V); argmax on bf16 is ~5x slower here
    greedy = weights.argmax(dim=-1) if any_greedy else None
    if any_greedy and exact is not None:
        rescore_greedy(weights, greedy, greedy_rows.nonzero().squeeze(-1), exact)
    if any_greedy and bool(greedy_rows.all()):
        return greedy
    if any_greedy or bool((temperature != 1).any()):
        weights.div_(torch.where(greedy_rows, torch.ones_like(temperature), temperature)[:, None])
    # Softmax without its division: the draw below is scaled by each row's total, the end of its cdf.
    weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
    nucleus_rows = (top_p < 1).nonzero().squeeze(-1)
    if len(nucleus_rows):
        # Normalised by the end of the cdf, not by .sum(): torch splits a one-row sum across threads, so
        # the row's draw would depend on what else is in the batch. Here all works row by row.
        rows = weights[nucleus_rows]
        weights[nucleus_rows] = _nucleus(rows / rows.cumsum(dim=-1)[:, -1:], top_p[nucleus_rows])
    cdf = weights.cumsum_(dim=-1)  # (B, V)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device) * cdf[:, -1]  # (B,)
    drawn = torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return torch.where(greedy_rows, greedy, drawn) if any_greedy else drawn


def logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the distribution each row's token was drawn from: the logits divided by the
    temperature, renormalised over the top_p nucleus (-inf outside it). A greedy row (temperature 0) reports
    the model's own distribution (temperature 1, no top_p), as a greedy answer's behaviour has no other.

    logits: (R, V); temperature, top_p, tokens: (R,). Returns the tokens' log-probabilities (R,) and the `top`
    most likely tokens' log-probabilities and ids, (R, top) each, best first. Only rows that asked run this.
    """
    greedy = temperature == 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    top_p = torch.where(greedy, torch.ones_like(top_p), top_p)
    out = torch.log_softmax(logits.float() / scale[:, None], dim=-1)  # (R, V)
    nucleus_rows = (top_p < 1).nonzero().squeeze(-1)
    if len(nucleus_rows):
        kept = _nucleus(out[nucleus_rows].exp(), top_p[nucleus_rows])
        out[nucleus_rows] = (kept / kept.sum(dim=-1, keepdim=True)).log()
    chosen = out.gather(1, tokens[:, None]).squeeze(1)
    best = out.topk(top, dim=-1)
    return chosen, best.values, best.indices
