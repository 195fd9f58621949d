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
    rank's traceback; a hang past `timeout_s` kills every rank. The free port is chosen before the
    ranks bind it, so another job can take it in between: then the launch is retried on a new port.
    """
    for attempt in range(3):
        try:
            return _distributed_run_once(world_size, fn, args, workdir, timeout_s)
        except _PortTaken:
            if attempt == 2:
                raise


class _PortTaken(AssertionError):
    pass


def _failed(out: str) -> bool:
    if not os.path.exists(out):
        return True
    with open(out, "rb") as fh:
        return pickle.load(fh)[0] == "error"


def _distributed_run_once(world_size, fn, args, workdir, timeout_s):
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
    import time

    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        failed = any(not p.is_alive() and _failed(out) for p, out in zip(procs, outs))
        if failed:  # a rank died: its peers would wait on it until the deadline
            time.sleep(2)
            break
        time.sleep(0.1)
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
        errors.insert(0, f"ranks {hung} still running (killed after a peer failed or {timeout_s}s passed)")
    if errors:
        message = "distributed run failed:\n" + "\n".join(errors)
        raise (_PortTaken if "EADDRINUSE" in message else AssertionError)(message)
    return results


def parity_reward(response: str, ground_truth: str, config) -> float:
    """A reward a random tiny model earns about half the time (tests of the training loop)."""
    return float(len(response) % 2 == 0)


def tiny_train_setup(root: Path, *, family: str = "qwen3", prompts: int = 24) -> dict:
    """A tiny HF model and a jsonl dataset for trainer tests; returns config overrides."""
    import json

    from tiny_models import make_tiny_model

    model = make_tiny_model(root / "model", family, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    data = root / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(prompts):
            fh.write(json.dumps({"prompt": f"Compute {i} + {i % 7}.", "answer": str(i + i % 7)}) + "\n")
    return {
        "model": {"hf_dir": str(model)},
        "data": {"train_files": [str(data)], "prompt": {"answer_format_suffix": ""}},
        "rollout": {"max_response_tokens": 8, "temperature": 1.0,
                    "reward": {"pool": "inline", "function": "helpers:parity_reward"}},
        "batch": {"train_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 2,
                  "max_tokens_per_micro_batch": 100},  # dynamic batching: ~2 rows per micro-batch
        "algorithm": {"spo": {"gen_batch_size": 8}},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "eps": 1e-4},
        "eval": {"every_steps": 0},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


# small versions of each algorithm's sampling for trainer tests on `tiny_train_setup` models
ALGORITHM_OVERRIDES = {
    "spo": {},
    "grpo": {"rollout": {"n": 2}},
    # a tiny random model rarely ends within 8 tokens: with the authors' truncated_reward 0 every
    # reward would be 0 and nothing would train, so its truncated texts are graded (parity reward)
    "spo_chain": {"algorithm": {"spo_chain": {"num_continuations": 2, "cut_interval": 2, "max_response_tokens": 8,
                                              "temperature": 1.0, "top_p": 1.0, "truncated_reward": None}}},
    "spo_tree": {"algorithm": {"spo_tree": {"branching_factors": [2, 2], "segment_tokens": 3,
                                            "max_response_tokens": 8, "temperature": 1.0, "top_p": 1.0}}},
    "soft_spo": {"algorithm": {"soft_spo": {"q0_num_samples": 4, "reward_offset": -1.0, "beta": 0.1,
                                            "max_response_tokens": 8}}},
}


def merge(base: dict, extra: dict) -> dict:
    """Nested dict update (returns a new dict)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def algorithm_setup(root: Path, name: str) -> dict:
    """`tiny_train_setup` overrides running algorithm `name` with small sampling settings."""
    return merge(tiny_train_setup(root), {**ALGORITHM_OVERRIDES[name], "algorithm": {
        **ALGORITHM_OVERRIDES[name].get("algorithm", {}), "name": name}})


def probe_at_generate(engine, probe) -> list:
    """Wrap `engine.generate` so each call first appends `probe()` to the returned list (what the
    trainer holds while the engine generates, in the colocation tests and bench)."""
    readings = []
    generate = engine.generate

    def recording_generate(requests):
        readings.append(probe())
        return generate(requests)

    engine.generate = recording_generate
    return readings
