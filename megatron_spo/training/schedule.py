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
    other stages get an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

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
