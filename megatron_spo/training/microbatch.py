"""Splitting a training batch into micro-batches: fixed row counts, or a padded-token budget.

Both take a dict of (B, ...) tensors (the rows of one mini-batch) and return a list of dicts with
the same keys, each holding some of the rows; the actor's `train_step` runs one forward/backward
per micro-batch and accumulates gradients.
"""

from __future__ import annotations

import torch


def microbatches(tensors: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a dict of (B, ...) tensors into micro-batches of at most `micro_batch_size` rows."""
    batch = next(iter(tensors.values())).shape[0]
    return [
        {k: v[start : start + micro_batch_size] for k, v in tensors.items()}
        for start in range(0, batch, micro_batch_size)
    ]


def microbatches_by_tokens(
    tensors: dict[str, torch.Tensor], lengths: torch.Tensor, max_tokens: int
) -> list[dict[str, torch.Tensor]]:
    """Dynamic batching: pack the rows of (B, T) tensors into micro-batches of at most
    `max_tokens` padded tokens (rows x longest row), longest rows first, each cut to its longest
    row, so short responses do not pay for the longest one. `lengths` (B,) are the real lengths.
    A row longer than the budget gets a micro-batch of its own.
    """
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    groups: list[list[int]] = []
    for row in order:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    out = []
    for rows in groups:
        index = torch.tensor(sorted(rows))
        width = int(lengths[index].max())
        out.append({k: v[index][:, :width] if v.dim() >= 2 else v[index] for k, v in tensors.items()})
    return out
