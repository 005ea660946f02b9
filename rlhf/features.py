"""What the reward model reads: the frozen base's hidden states over an answer, pooled into one vector.

The base is the reference policy and never changes, so an answer's features never change either: they are
computed once per (conversation, answer) and kept in a FeatureCache, and a run trains the reward model's head on
every vote of its window in seconds instead of back-propagating through the LM. Pooling over the answer's tokens
(rather than reading its last token) suits preferences that live in the whole text, such as its tone.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from common.conversations import Messages, conversation_id
from rlhf.config import RewardConfig
from rlhf.modeling import answer_ids, build_batch, encode_prompt, forward

Progress = Callable[[int, int], None]


def answer_key(prompt: Messages, answer: str, ended: bool = True) -> str:
    return hashlib.sha256(f"{conversation_id(prompt)}\n{int(ended)}\n{answer}".encode()).hexdigest()[:32]


def layer_indexes(fractions: tuple[float, ...], depth: int) -> list[int]:
    """Hidden-state indexes (0: the embeddings, depth: the last layer) of fractions of a model's depth."""
    if not all(0 <= f <= 1 for f in fractions):
        raise ValueError(f"reward layers are fractions of the depth, in [0, 1]: {fractions}")
    return [round(f * depth) for f in fractions]


def pool(
    hidden: list[torch.Tensor], response_mask: torch.Tensor, prompt_len: int, config: RewardConfig
) -> torch.Tensor:
    """One feature vector per row from hidden states (each (B, P + R, H)): for each of config.layers, the mean
    over the answer's tokens and/or its last token, concatenated. (B, D)"""
    mask = response_mask.float()  # (B, R)
    n = mask.sum(-1).clamp(min=1)  # (B,)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)
    parts = []
    for layer in layer_indexes(config.layers, len(hidden) - 1):
        answer = hidden[layer][:, prompt_len:].float()  # (B, R, H)
        if "mean" in config.pooling:
            parts.append((answer * mask[..., None]).sum(1) / n[:, None])
        if "last" in config.pooling:
            parts.append(answer[rows, last])
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def compute_features(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages], answers: list[str],
    config: RewardConfig, progress: Progress | None = None, ended: list[bool] | None = None,
) -> torch.Tensor:
    """Features of each (prompt, answer) under `model` as it is called (the caller disables adapters: the
    features are the base's). Long conversations keep their end; answers are cut like the policy's, and end in
    EOS where they stopped (ended[i]; None: all did). (N, D)"""
    ended = ended if ended is not None else [True] * len(answers)
    device = next(model.parameters()).device
    encoded: dict[str, list[int]] = {}
    out = []
    for start in range(0, len(prompts), config.score_batch_size):
        chunk = range(start, min(start + config.score_batch_size, len(prompts)))
        prompt_ids = []
        for i in chunk:
            key = conversation_id(prompts[i])
            if key not in encoded:
                encoded[key] = encode_prompt(tokenizer, prompts[i])[-config.max_prompt_tokens :]
            prompt_ids.append(encoded[key])
        ids = [answer_ids(tokenizer, answers[i], ended[i], config.max_answer_tokens) for i in chunk]
        batch = build_batch(prompt_ids, ids, tokenizer.pad_token_id).to(device)
        hidden = forward(model, batch, hidden=True, logits_to_keep=1, precision=config.precision).hidden_states
        out.append(pool(hidden, batch.response_mask, batch.prompt_len, config).cpu())
        if progress:
            progress(chunk.stop, len(prompts))
    return torch.cat(out) if out else torch.zeros(0)


def feature_signature(config: RewardConfig, base_name: str) -> str:
    """What a cached feature depends on: the base, the layers, the pooling and the truncation."""
    fields = [base_name, list(config.layers), config.pooling, config.max_prompt_tokens, config.max_answer_tokens]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


class FeatureCache:
    """Features by answer_key, kept in one safetensors file per signature under `directory` (None: in memory
    only). `keep` rewrites the file with just the keys still wanted, so it never outgrows the training window."""

    def __init__(self, directory: Path | None, signature: str) -> None:
        self.path = Path(directory) / f"features-{signature}.safetensors" if directory else None
        self.vectors: dict[str, torch.Tensor] = {}
        self.computed = 0  # features computed (not found in the cache) so far
        if self.path is not None and self.path.exists():
            self.vectors = dict(load_file(self.path))

    def features(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Messages],
        answers: list[str], config: RewardConfig, progress: Progress | None = None, ended: list[bool] | None = None,
    ) -> torch.Tensor:
        """Features of each (prompt, answer), computing only those not cached yet. (N, D)"""
        ended = ended if ended is not None else [True] * len(answers)
        keys = [answer_key(p, a, e) for p, a, e in zip(prompts, answers, ended, strict=True)]
        missing = list({k: i for i, k in enumerate(keys) if k not in self.vectors}.values())
        self.computed += len(missing)
        if missing:
            computed = compute_features(
                model, tokenizer, [prompts[i] for i in missing], [answers[i] for i in missing], config, progress,
                [ended[i] for i in missing],
            )
            self.vectors.update({keys[i]: row.clone() for i, row in zip(missing, computed, strict=True)})
        return torch.stack([self.vectors[k] for k in keys]) if keys else torch.zeros(0)

    def keep(self, keys: set[str]) -> None:
        """Forget every other key and write the file (temp name, then rename)."""
        self.vectors = {k: v for k, v in self.vectors.items() if k in keys}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.vectors.items()}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
