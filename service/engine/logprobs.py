"""The log-probabilities a request asks for (`logprobs`, `top_logprobs`), decoded for its response.

They come from the distribution each row's token was drawn from (sampling.logprobs), and only the rows
that asked for them pay for them: a decode step where no row asked does no work at all. A row asking for
k most likely tokens gets k, however many another row in the same batch asked for.
"""

import torch
from transformers import PreTrainedTokenizerBase

from service.engine.requests import TokenLogprob
from service.engine.sampling import logprobs


def sampled_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, tokens: torch.Tensor,
    requested: list[int | None], tokenizer: PreTrainedTokenizerBase,
) -> dict[int, TokenLogprob]:
    """Row -> its sampled token's log-probability and its `requested[row]` most likely tokens', for the rows
    whose request asked (requested[row] is not None).

    logits: (B, V); temperature, top_p, tokens: (B,); requested: B entries.
    """
    asked = [(row, k) for row, k in enumerate(requested) if k is not None]
    if not asked:
        return {}
    index = torch.tensor([row for row, _ in asked])
    top = max(k for _, k in asked)
    chosen, values, ids = logprobs(logits[index], temperature[index], top_p[index], tokens[index], max(top, 1))
    decode = tokenizer.decode
    out = {}
    for i, (row, k) in enumerate(asked):
        best = zip(ids[i, :k].tolist(), values[i, :k].tolist(), strict=True)
        out[row] = TokenLogprob(decode([int(tokens[row])]), float(chosen[i]), tuple((decode([t]), v) for t, v in best))
    return out
