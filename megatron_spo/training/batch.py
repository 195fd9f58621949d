"""`TrainBatch`: the tensors one step trains on, typed.

A rank's `Rollout` (token lists) becomes a `TrainBatch` (right-padded tensors); the algorithm fills
in what its objective reads (`advantages`, `rewards`, `q0`, ...), and the actor update cuts it into
mini-batches and micro-batches. Every (N, T) tensor is aligned with `input_ids`: position t scores
token t + 1, so `response_mask` is 1 on the positions that *predict* a response token that
carries gradient (tool output stays 0) and the last column is always 0.

The actor's micro-batch contract is a mapping of tensors (`tensors()` / `from_tensors`), shared
with SFT; the objectives read the typed view.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass
class TrainBatch:
    input_ids: torch.Tensor
    """(N, T) context + response token ids, right-padded."""
    targets: torch.Tensor
    """(N, T) the next token of each position (`input_ids` shifted left)."""
    response_mask: torch.Tensor
    """(N, T) 1.0 where the position's target is a response token that carries gradient."""
    lengths: torch.Tensor
    """(N,) real (unpadded) lengths."""
    old_logprobs: torch.Tensor | None = None
    """(N, T) the behaviour policy's log-probs; None = the step makes one update on fresh
    samples and the objective takes its own detached forward as pi_old."""
    ref_logprobs: torch.Tensor | None = None
    """(N, T) the frozen reference's log-probs (KL terms, soft Q)."""
    advantages: torch.Tensor | None = None
    """(N, T) per-token advantages (policy-gradient objectives)."""
    is_weights: torch.Tensor | None = None
    """(N, T) importance weight of each token's policy-gradient term: pi_old / pi_behaviour for
    tokens an older policy sampled (async rollout, `training.async_rollout`), 1 elsewhere; None
    = all 1."""
    rewards: torch.Tensor | None = None
    """(N,) training reward per sequence (soft SPO)."""
    q0: torch.Tensor | None = None
    """(N,) soft value of each sequence's prompt (soft SPO)."""
    mini_batch_tokens: torch.Tensor | None = None
    """(N,) response tokens of the whole (global, all DP ranks) mini-batch a row trains in."""
    mini_batch_sequences: torch.Tensor | None = None
    """(N,) sequences of the whole mini-batch a row trains in (filled by the update loop)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set fields as the actor's micro-batch mapping."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TrainBatch:
        return cls(**tensors)

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The given rows of every tensor."""
        return TrainBatch.from_tensors({k: v[rows] for k, v in self.tensors().items()})

    def replace(self, **changes) -> TrainBatch:
        return dataclasses.replace(self, **changes)

    @property
    def target_mask(self) -> torch.Tensor:
        """(N, T - 1): the response mask on the positions that have a target."""
        return self.response_mask[:, :-1]

    @classmethod
    def from_sequences(cls, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       masks: Sequence[Sequence[int]], pad_id: int) -> TrainBatch:
        """Right-padded context+response rows; with no sequences the tensors have 0 rows (T = 2)."""
        length = max([len(c) + len(r) for c, r in zip(contexts, responses)], default=2)
        n = len(responses)
        ids = torch.full((n, length), pad_id, dtype=torch.long)
        mask = torch.zeros(n, length)
        for row, (c, r, m) in enumerate(zip(contexts, responses, masks)):
            seq = list(c) + list(r)
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, len(c) - 1 : len(seq) - 1] = torch.tensor(list(m), dtype=torch.float32)
        lengths = torch.tensor([len(c) + len(r) for c, r in zip(contexts, responses)], dtype=torch.long)
        return cls(input_ids=ids, targets=torch.roll(ids, -1, 1), response_mask=mask, lengths=lengths)

    @classmethod
    def from_rollout(cls, rollout, pad_id: int) -> TrainBatch:
        return cls.from_sequences(rollout.contexts, rollout.responses, rollout.masks, pad_id)


def per_token(contexts: Sequence[Sequence[int]], values: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-response-token lists -> (N, T - 1) aligned with the log-prob positions of `like`."""
    out = torch.zeros_like(like)
    for row, (c, v) in enumerate(zip(contexts, values)):
        out[row, len(c) - 1 : len(c) - 1 + len(v)] = torch.tensor(list(v), dtype=out.dtype)
    return out


def pad_right(values: torch.Tensor) -> torch.Tensor:
    """(N, T - 1) per-position values -> (N, T), zero in the last column (aligned with input_ids)."""
    return torch.nn.functional.pad(values, (0, 1))


def blank_row(batch: TrainBatch) -> TrainBatch:
    """One fully masked 2-token row with `batch`'s fields: a rank without sequences still takes
    part in the step's collectives and adds nothing to the loss or the gradients."""
    row = {k: torch.zeros((1, 2) if v.dim() >= 2 else (1,), dtype=v.dtype) for k, v in batch.tensors().items()}
    row["lengths"] = torch.full((1,), 2, dtype=batch.lengths.dtype)
    return TrainBatch.from_tensors(row)
