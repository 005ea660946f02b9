"""Token sampling for a batch whose rows have their own temperature, top_p and random stream."""

import torch


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p; rows are renormalised.

    probs: (B, V) rows summing to 1; top_p: (B,) in (0, 1]. The most likely token always survives.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Pick one token per row. logits: (B, V); temperature, top_p: (B,); one generator per row.

    Temperature 0 is greedy. Each row draws its uniform number from its own generator, so a seeded
    request gets the same answer whatever else shares the batch.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)  # (B,)
    if bool((temperature == 0).all()):
        return greedy
    safe_t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_t[:, None], dim=-1)  # (B, V)
    if bool((top_p < 1).any()):
        probs = torch.where((top_p < 1)[:, None], top_p_filter(probs, top_p), probs)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf.device) * cdf[:, -1]  # (B,)
    drawn = torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return torch.where(temperature == 0, greedy, drawn)
