"""Test helpers: a torchrun-like launcher for gloo processes, and tiny HF model factories."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from pathlib import Path
from typing import Any, Callable


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        result = ("error", traceback.format_exc())
    with open(out, "wb") as fh:
        pickle.dump(result, fh)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def distributed_run(
    world_size: int, fn: Callable, *args: Any, workdir: Path, timeout_s: float = 300.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return their results.

    `fn` must be importable (a module-level function). A failure on any rank raises with that
    rank's traceback; a hang past `timeout_s` kills every rank.
    """
    from megatron_spo.platform import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    outs = [str(Path(workdir) / f"rank{rank}.pkl") for rank in range(world_size)]
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, outs[rank]))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    results = []
    errors = []
    for rank, out in enumerate(outs):
        if not os.path.exists(out):
            errors.append(f"rank {rank}: no result (exit code {procs[rank].exitcode})")
            continue
        with open(out, "rb") as fh:
            status, value = pickle.load(fh)
        if status == "error":
            errors.append(f"rank {rank}:\n{value}")
        results.append(value)
    if hung:
        errors.insert(0, f"ranks {hung} still running after {timeout_s}s")
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return results
