"""Per-token log-probabilities (and entropy) of given token sequences from a Megatron model.

Logits stay split over the vocabulary across tensor-parallel ranks: log-probabilities come from
Megatron's vocab-parallel cross entropy, entropy from all-reduced softmax statistics, so the full
vocabulary is never materialised on one rank. Pipeline stages run through Megatron's own
forward-only schedule (`get_forward_backward_func()`); the result, computed on the last stage, is
broadcast so every rank of the pipeline returns it.

Conventions: `input_ids` is (B, T), right-padded; position t of the result is the log-probability
of token t+1 given tokens <= t, so the result is (B, T-1).
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_spo import platform

from megatron_spo.platform import ParallelContext
from megatron_spo.training.schedule import run_microbatches


def vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """Entropy of softmax(logits) over a vocabulary split across `tp_group`; differentiable.

    logits: (..., V / tp) float. Returns (...,).
    """
    import torch.distributed.nn.functional as dist_fn

    tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
    logits_max = logits.detach().amax(dim=-1, keepdim=True)
    if tp > 1:
        torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = logits - logits_max
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    sum_exp_shifted = (exp * shifted).sum(dim=-1)
    if tp > 1:
        sum_exp = dist_fn.all_reduce(sum_exp, group=tp_group)
        sum_exp_shifted = dist_fn.all_reduce(sum_exp_shifted, group=tp_group)
    # H = log Z - E_p[z], with z the shifted logits and Z = sum exp z
    return sum_exp.log() - sum_exp_shifted / sum_exp


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and optionally entropy, from vocab-parallel logits; both differentiable.

    logits: (B, T, V / tp); targets: (B, T) token ids (any id for padded positions).
    Returns ((B, T) log-probs, (B, T) entropy or None).
    """
    from megatron.core import tensor_parallel

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    entropy = vocab_parallel_entropy(logits, tp_group) if with_entropy else None
    # Megatron's kernel rewrites its input in place: hand it a private copy.
    neg_logprobs = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), targets)
    return -neg_logprobs, entropy


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


@torch.no_grad()
def compute_logprobs(
    chunks: Sequence[torch.nn.Module],
    parallel: ParallelContext,
    input_ids: torch.Tensor,
    *,
    micro_batch_size: int = 8,
    temperature: float = 1.0,
    with_entropy: bool = False,
    lengths: torch.Tensor | None = None,
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """{"logprobs": (B, T-1)[, "entropy": (B, T-1)]} of `input_ids` under the model, on every rank,
    as host (CPU) tensors; `input_ids` may be on the host, it is moved to the model's device.

    Every rank of the model-parallel group passes the same `input_ids` (data-parallel ranks pass
    their own). Padded positions get values too; mask them with the caller's response mask.
    With `lengths` (B,) real lengths and `max_tokens`, rows are packed into micro-batches of at
    most that many padded tokens (`microbatches_by_tokens`) instead of `micro_batch_size` rows;
    positions past a row's length are then 0.
    """
    for chunk in chunks:
        chunk.eval()
    batch, seq = input_ids.shape
    input_ids = input_ids.to(next(chunks[0].parameters()).device)
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    targets = torch.roll(input_ids, shifts=-1, dims=1)  # position t predicts token t+1
    tensors = {"input_ids": input_ids, "position_ids": position_ids, "targets": targets,
               "row": torch.arange(batch, device=input_ids.device)}
    if max_tokens is not None and lengths is not None:
        mbs = microbatches_by_tokens(tensors, lengths, max_tokens)
    else:
        mbs = microbatches(tensors, micro_batch_size)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["input_ids"], mb["position_ids"], attention_mask=None)

        def collect(logits):
            logprobs, entropy = vocab_parallel_logprobs(
                logits,
                mb["targets"],
                tp_group=parallel.tp_group,
                temperature=temperature,
                with_entropy=with_entropy,
            )
            out = {"logprobs": logprobs[:, :-1], "row": mb["row"]}
            if with_entropy:
                out["entropy"] = entropy[:, :-1]
            return logits.new_zeros(()), out

        return output, collect

    results = run_microbatches(chunks, parallel, forward_step, mbs, forward_only=True)
    keys = ["logprobs"] + (["entropy"] if with_entropy else [])
    out = {}
    for key in keys:
        if parallel.is_last_stage:
            value = torch.zeros(batch, seq - 1, dtype=torch.float32, device=input_ids.device)
            for r in results:  # micro-batches may be reordered and cut to their longest row
                value[r["row"], : r[key].shape[1]] = r[key]
        else:
            value = torch.empty(batch, seq - 1, dtype=torch.float32, device=input_ids.device)
        if parallel.pp > 1:
            torch.distributed.broadcast(value, src=parallel.pp_ranks[-1], group=parallel.pp_group)
        out[key] = value.to(platform.host_device())  # the trainer's arithmetic is host-side
    return out


@torch.no_grad()
def compute_logits(
    chunks: Sequence[torch.nn.Module],
    parallel: ParallelContext,
    input_ids: torch.Tensor,
    *,
    micro_batch_size: int = 8,
) -> torch.Tensor:
    """Full-vocabulary logits (B, T, V) on every rank: gathered over TP, broadcast over PP.

    For checks and debugging (it materialises the vocabulary); training uses `compute_logprobs`.
    """
    from megatron.core import tensor_parallel
    for chunk in chunks:
        chunk.eval()
    batch, seq = input_ids.shape
    input_ids = input_ids.to(next(chunks[0].parameters()).device)
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    mbs = microbatches({"input_ids": input_ids, "position_ids": position_ids}, micro_batch_size)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["input_ids"], mb["position_ids"], attention_mask=None)

        def collect(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float())
            return logits.new_zeros(()), {"logits": full}

        return output, collect

    results = run_microbatches(chunks, parallel, forward_step, mbs, forward_only=True)
    if parallel.is_last_stage:
        logits = torch.cat([r["logits"] for r in results], dim=0).contiguous()
        shape = torch.tensor(logits.shape)
    else:
        logits, shape = None, torch.zeros(3, dtype=torch.long)
    if parallel.pp > 1:
        torch.distributed.broadcast(shape, src=parallel.pp_ranks[-1], group=parallel.pp_group)
        if logits is None:
            logits = torch.empty(*shape.tolist(), dtype=torch.float32, device=input_ids.device)
        torch.distributed.broadcast(logits, src=parallel.pp_ranks[-1], group=parallel.pp_group)
    return logits
