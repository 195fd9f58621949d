"""Run micro-batches through Megatron's pipeline schedules with explicit process groups.

A thin wrapper over `get_forward_backward_func()`: it hands the schedule this rank's process
groups (and, with pipeline parallelism, a `P2PCommunicator` on the pipeline group) instead of
letting it read Megatron's globals, and gives every model chunk its own data iterator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_spo.platform import ParallelContext


def run_microbatches(
    chunks: Sequence[torch.nn.Module],
    parallel: ParallelContext,
    forward_step: Callable,
    microbatches: list[dict[str, torch.Tensor]],
    *,
    forward_only: bool,
) -> list:
    """Run `forward_step(data_iterator, model) -> (output, loss_fn)` over every micro-batch.

    Returns what the last pipeline stage's loss functions reported (one entry per micro-batch);
    other stages get an empty list. Under sequence parallelism each micro-batch is first padded to
    a width divisible by TP (`pad_width`): the sequence is split over the TP ranks.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if chunks[0].config.sequence_parallel:
        microbatches = [pad_width(mb, parallel.tp) for mb in microbatches]
    seq = max(mb["input_ids"].shape[1] for mb in microbatches)
    mbs = max(mb["input_ids"].shape[0] for mb in microbatches)
    n_chunks = len(chunks)
    kwargs = {}
    if parallel.pp > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(
            pp_group=parallel.pp_group, config=chunks[0].config
        )
    return get_forward_backward_func(parallel.pp, parallel.vpp)(
        forward_step_func=forward_step,
        data_iterator=[iter(microbatches) for _ in range(n_chunks)] if n_chunks > 1 else iter(microbatches),
        model=list(chunks) if n_chunks > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
        pg_collection=parallel.pg_collection,
        **kwargs,
    )


def pad_width(mb: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pad the second dimension of every (B, T, ...) tensor of a micro-batch with zeros by
    the same number of columns, so `input_ids`' width becomes a multiple of `multiple`. Tensors
    one column narrower (per-target values) stay aligned with the targets; the padding is token
    0 with a zero mask, so it adds nothing to a loss or a metric. 1-D tensors are left alone."""
    extra = -mb["input_ids"].shape[1] % multiple
    if not extra:
        return mb
    out = {}
    for key, value in mb.items():
        if value.dim() >= 2:
            pad = value.new_zeros(value.shape[0], extra, *value.shape[2:])
            value = torch.cat([value, pad], dim=1)
        out[key] = value
    return out
