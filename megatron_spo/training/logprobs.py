"""Per-token log-probabilities (and entropy) of given token sequences from a Megatron model.

Logits stay split over the vocabulary across tensor-parallel ranks, and the vocabulary-wide fp32
work runs in chunks of rows (`_VocabParallelLogprobEntropy`): the full vocabulary is never
materialised on one rank, nor the whole sequence's softmax in fp32. Pipeline stages run through Megatron's own
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
from megatron_spo.training.microbatch import microbatches, microbatches_by_tokens
from megatron_spo.training.schedule import run_microbatches


CHUNK_TOKENS = 1024
"""Rows (tokens) of the vocabulary-wide fp32 temporaries at a time: 1024 x 76k (Qwen3 at TP 2)
x 4 bytes = 0.3 GB each, instead of several full (tokens x V / tp) fp32 copies (20.9 GiB for the
8B recipe's 18k-token micro-batch)."""


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """log p(target) and entropy of softmax(logits / T) over a vocabulary split across TP ranks,
    computed and differentiated in chunks of rows, never holding more than a chunk in fp32.

    Forward, two collectives per call: the row maxima (MAX), then the stacked per-row sums
    sum exp(z - m), sum exp(z - m)(z - m) and the target's logit (SUM; only the rank whose shard
    holds the target contributes it). log Z = m + log S, log p(t) = z_t - log Z and
    H = log S - sum exp(z - m)(z - m) / S.
    Backward, no collectives (each rank owns its shard's gradient), recomputing p per chunk:
    d log p(t) / dz = onehot(t) - p;  dH / dz = -p (log p + H); the entropy term only when the
    entropy's gradient is used (an entropy bonus), so a reported-only entropy costs no backward.
    Same numbers as Megatron's vocab-parallel cross entropy plus an all-reduced entropy, in
    another summation order."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, tp_group, chunk):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        v_local = logits.shape[-1]
        flat = logits.reshape(-1, v_local)
        flat_targets = targets.reshape(-1)
        rows = flat.shape[0]
        tp = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        start = (torch.distributed.get_rank(tp_group) if tp > 1 else 0) * v_local
        local_t = flat_targets - start
        owned = (local_t >= 0) & (local_t < v_local)
        local_t = local_t.clamp(0, v_local - 1)
        maxima = torch.empty(rows, dtype=torch.float32, device=flat.device)
        for i in range(0, rows, chunk):
            maxima[i:i + chunk] = flat[i:i + chunk].float().amax(-1) / temperature
        if tp > 1:
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        sums = torch.empty(3, rows, dtype=torch.float32, device=flat.device)  # S, sum e * z', z_t
        for i in range(0, rows, chunk):
            z = flat[i:i + chunk].float() / temperature - maxima[i:i + chunk, None]
            e = z.exp()
            sums[0, i:i + chunk] = e.sum(-1)
            sums[1, i:i + chunk] = (e * z).sum(-1)
            sums[2, i:i + chunk] = z.gather(-1, local_t[i:i + chunk, None]).squeeze(-1) * owned[i:i + chunk]
        if tp > 1:
            torch.distributed.all_reduce(sums, group=tp_group)
        log_s = sums[0].log()
        logprobs = sums[2] - log_s
        entropy = log_s - sums[1] / sums[0]
        ctx.save_for_backward(logits, local_t, owned, maxima + log_s, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprobs.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, local_t, owned, log_z, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        v_local = logits.shape[-1]
        flat = logits.reshape(-1, v_local)
        rows = flat.shape[0]
        g_lp = grad_logprobs.reshape(-1) if grad_logprobs is not None else None
        g_h = grad_entropy.reshape(-1) if grad_entropy is not None else None
        grad = torch.empty_like(flat)
        for i in range(0, rows, chunk):
            log_p = flat[i:i + chunk].float() / temperature - log_z[i:i + chunk, None]
            p = log_p.exp()
            g = torch.zeros_like(p)
            if g_lp is not None:
                g -= p * g_lp[i:i + chunk, None]
                g.scatter_add_(-1, local_t[i:i + chunk, None],
                               (g_lp[i:i + chunk] * owned[i:i + chunk])[:, None])
            if g_h is not None:
                g -= p * (log_p + entropy[i:i + chunk, None]) * g_h[i:i + chunk, None]
            grad[i:i + chunk] = g / temperature
        return grad.view(logits.shape), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and optionally entropy, from vocab-parallel logits; both differentiable.

    logits: (B, T, V / tp), any float dtype (read in chunks as fp32); targets: (B, T) token ids
    (any id for padded positions); `tp_group` None = Megatron's tensor-parallel group when
    initialised (as its vocab-parallel cross entropy), else an unsplit vocabulary. Returns ((B, T) fp32 log-probs, (B, T) entropy or None).
    """
    if tp_group is None:  # as Megatron's own vocab-parallel kernels: the initialised TP group
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
    logprobs, entropy = _VocabParallelLogprobEntropy.apply(logits, targets, float(temperature), tp_group,
                                                           int(chunk_tokens))
    return logprobs, (entropy if with_entropy else None)


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
                width = min(r[key].shape[1], seq - 1)  # sequence parallelism pads micro-batches
                value[r["row"], :width] = r[key][:, :width]
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
        logits = torch.cat([r["logits"][:, :seq] for r in results], dim=0).contiguous()
        shape = torch.tensor(logits.shape)
    else:
        logits, shape = None, torch.zeros(3, dtype=torch.long)
    if parallel.pp > 1:
        torch.distributed.broadcast(shape, src=parallel.pp_ranks[-1], group=parallel.pp_group)
        if logits is None:
            logits = torch.empty(*shape.tolist(), dtype=torch.float32, device=input_ids.device)
        torch.distributed.broadcast(logits, src=parallel.pp_ranks[-1], group=parallel.pp_group)
    return logits
