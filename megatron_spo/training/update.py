"""The actor update of a step: mini-batches x epochs of the algorithm's objective.

Mini-batch k holds every sequence of the global batch's prompts [k m, (k+1) m),
m = `batch.mini_batch_size`, whichever rank holds them, so the split does not depend on DP.
Sequences from outside the batch (soft-SPO's file and replay sequences, prompt index -1) are
spread evenly over the mini-batches. Every rank takes the same number of mini-batches per epoch;
a rank without sequences in one (spo_tree drops edges) trains a masked-out row, so collectives
line up. A mini-batch whose global mask is empty is skipped (its loss would divide by zero).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_spo.training.batch import TrainBatch, blank_row
from megatron_spo.training.microbatch import microbatches, microbatches_by_tokens
from megatron_spo.training.objectives import as_loss_fn


def mini_batch_of(prompt_index: Sequence[int], train_batch_size: int, mini_batch_size: int) -> list[int]:
    """The mini-batch of each sequence, from the position of its prompt in the global batch."""
    parts = train_batch_size // mini_batch_size
    extra = [row for row, i in enumerate(prompt_index) if i < 0]
    out = [i // mini_batch_size if i >= 0 else 0 for i in prompt_index]
    for j, row in enumerate(extra):
        out[row] = j * parts // len(extra)
    return out


def update_actor(actor, objective, batch: TrainBatch, owner: Sequence[int], batch_config,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Optimizer steps over the mini-batches (`owner[row]`) x `batch_config.epochs`; returns the
    step's actor metrics (the objective's `REPORTED` sums over its count, grad norm, lr, ...)."""
    budget = batch_config.max_tokens_per_micro_batch
    parts = batch_config.train_batch_size // batch_config.mini_batch_size
    owner_t = torch.tensor(list(owner), dtype=torch.long)
    loss_fn = as_loss_fn(objective)
    sums: dict[str, float] = {}
    updates = skipped_empty = 0
    for _ in range(batch_config.epochs):
        for part in range(parts):
            rows = torch.nonzero(owner_t == part).flatten()
            mini = batch.select(rows)
            counts = reduce_sum(torch.tensor([float(mini.response_mask.sum()), float(len(rows))]))
            if counts[0] == 0:
                skipped_empty += 1
                continue
            mini = mini.replace(mini_batch_tokens=torch.full((len(rows),), counts[0].item()),
                                mini_batch_sequences=torch.full((len(rows),), counts[1].item()))
            if not len(rows):
                mini = blank_row(mini)
            tensors = mini.tensors()
            mbs = (microbatches_by_tokens(tensors, mini.lengths, budget) if budget
                   else microbatches(tensors, batch_config.micro_batch_size))
            for k, v in actor.train_step(mbs, loss_fn).items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    count = max(sums.pop("count", 0.0), 1.0)
    updates = max(updates, 1)
    out = {name: sums[key] / count for key, name in getattr(objective, "REPORTED", {}).items() if key in sums}
    out.update({
        "actor/grad_norm": sums.get("grad_norm", 0.0) / updates,
        "actor/lr": sums.get("lr", 0.0) / updates,
        "actor/skipped_steps": sums.get("skipped", 0.0),
        "actor/empty_mini_batches": float(skipped_empty),
        "tokens": sums.get("tokens", 0.0),
    })
    return out
