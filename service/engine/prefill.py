"""Prompts on their way into the batch: grouped into cohorts that are prefilled together, a chunk at a time.

A cohort is the prompts of one or more requests for the same weights, prefilled in one padded batch: each
row starts from the longest cached prefix of its prompt (prefix_cache.py) and feeds the rest, right-aligned
so that every row's last prompt token comes out in the last column. Several prompts share a cohort only
when the whole cohort fits the turn's token budget; a longer prompt gets a cohort of its own and is fed a
budget's worth per turn, between decode steps, so running streams wait one chunk at most, never a whole
long prefill.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.batch import Rows
from service.engine.prefix_cache import Entry, PrefixCache


@dataclass
class Cohort:
    rows: Rows
    requests: list  # GenerationRequest, one per row
    todo: Tensor  # (R, N) long: each row's tokens still to feed, right-aligned
    fed: Tensor  # (R, N) bool: False where `todo` is padding
    done: int = 0  # columns of `todo` fed so far

    def feed(self, budget: int) -> tuple[Tensor | None, int]:
        """Feed the next columns, at most `budget` tokens over all rows (one column at least).

        Returns the logits (R, V) once the prompts are all in (else None), and the tokens spent.
        """
        r, n = self.todo.shape
        c = min(n - self.done, max(1, budget // r))
        columns = slice(self.done, self.done + c)
        self.done += c
        return self.rows.feed(self.todo[:, columns], self.fed[:, columns], logits=self.done == n), r * c


def plan_cohorts(requests: list, prefixes: PrefixCache, budget: int) -> tuple[list[Cohort], list]:
    """Cohorts for the requests, in order, while they fit `budget` tokens; the rest wait for the next turn.

    The first request always gets a cohort, alone if it does not fit (then it is fed a chunk per turn).
    """
    plans: dict[int, list[tuple[object, int, Entry | None]]] = {}  # forward serial -> (request, reused, entry)
    for i, request in enumerate(requests):
        reused, entry = prefixes.lookup(request._forward.serial, request.prompt_ids)
        members = plans.get(request._forward.serial, [])
        trial = {**plans, request._forward.serial: [*members, (request, reused, entry)]}
        if i > 0 and _cost(trial) > budget:
            return [_cohort(m) for m in plans.values()], requests[i:]
        plans = trial
    return [_cohort(m) for m in plans.values()], []


def _cost(plans: dict) -> int:
    return sum(len(m) * max(len(r.prompt_ids) - reused for r, reused, _ in m) for m in plans.values())


def _cohort(members: list[tuple[object, int, Entry | None]]) -> Cohort:
    requests = [r for r, _, _ in members]
    rows = Rows.empty(requests[0]._forward, len(members))
    reused = [p for _, p, _ in members]
    width = max(reused)
    if width:  # each row's cached prefix, right-aligned at column `width`
        segment = rows.segments[0]
        like = next(e.kv for _, _, e in members if e is not None)[0, 0][None]  # (1, kv_heads, n, head_dim)
        segment.cache.allocate(like, len(members), width)
        segment.valid = torch.zeros((len(members), width), dtype=torch.bool)
        for row, (_, p, entry) in enumerate(members):
            if p:
                segment.cache.write(row, width - p, entry.kv[:, :, :, :p])
                segment.valid[row, width - p :] = True
        segment.pos = torch.tensor(reused, dtype=torch.long)
    new = [r.prompt_ids[p:] for r, p, _ in members]
    n = max(len(ids) for ids in new)
    todo = torch.zeros((len(members), n), dtype=torch.long)
    fed = torch.zeros((len(members), n), dtype=torch.bool)
    for row, ids in enumerate(new):
        todo[row, n - len(ids) :] = torch.tensor(ids)
        fed[row, n - len(ids) :] = True
    return Cohort(rows, requests, todo, fed)
