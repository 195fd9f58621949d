"""Benchmark of the SPO value store at internet scale (default 10 million prompts, one process).

    .venv/bin/python bench/value_store.py [--prompts 10000000] [--steps 30] [--dp 2]

Measures, each against baselines timed in the same run:
- build from an offline mapping {prompt: [8 scores]} (hashing every prompt text, binarising,
  subsampling, sharding) and from success/total arrays;
- one trainer step: `sample` 1024 of a pool of 14,000 + `p_hat` of the batch + `update` 1024;
- `state_dict`;
- memory per prompt of the store's arrays (stored responses excluded).

Baselines: `bare pass` = one read-modify-write numpy pass over a float64 array of the store's size
(the cost floor of touching every prompt once); `inline step` = the same step written as bare numpy
on plain arrays (searchsorted, weights, exponential race, scatter update), i.e. the store's
overhead. Goals (issue 3): step < 5 ms, < 32 bytes per prompt.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from megatron_spo.value import ValueConfig, ValueStore, prompt_keys


def _best_of(fn, repeats: int) -> float:
    """Shortest wall time of `fn()` in seconds: on a shared machine the fastest run is the one
    least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def _inline_step(keys, alpha, beta, pool_keys, batch, eps, rng) -> None:
    """The step as bare numpy on one process's sorted arrays: the baseline for the store's overhead."""
    pos = np.searchsorted(keys, pool_keys)
    p = alpha[pos] / (alpha[pos] + beta[pos])
    weights = np.sqrt(p * (1 - p)) + eps
    race = rng.standard_exponential(weights.size) / weights
    chosen = np.argpartition(race, batch - 1)[:batch]
    idx = pos[chosen]
    rewards = (rng.random(batch) < p[chosen]).astype(np.float64)
    alpha[idx] = 0.96 * alpha[idx] + rewards
    beta[idx] = 0.96 * beta[idx] + (1 - rewards)


def _sharded_steps(rank: int, world: int, port: int, n: int, pool: int, batch: int, steps: int, out) -> None:
    """One DP rank of the sharded step benchmark: every rank builds the same 10M-prompt store and
    keeps its shard; sampling and p_hat are replicated, the update is split over the ranks."""
    import os

    import torch

    from megatron_spo import platform

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(platform.backend(), rank=rank, world_size=world)
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    store = ValueStore.from_keys(keys, ValueConfig(), group=torch.distributed.group.WORLD)
    pools = [keys[rng.choice(n, size=pool, replace=False)] for _ in range(steps)]
    sampler = np.random.default_rng(1)
    cpu_times, wall_times = [], []
    for pool_keys in pools:
        torch.distributed.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        chosen = pool_keys[store.sample(pool_keys, batch, sampler)]
        p = store.p_hat(chosen)
        rewards = (sampler.random(batch) < p).astype(np.float64)
        mine = slice(rank, None, world)
        store.update(chosen[mine], rewards[mine], 0.96)
        wall_times.append(time.perf_counter() - wall)
        cpu_times.append(time.process_time() - cpu)
    out.put((rank, float(np.median(cpu_times)), float(np.median(wall_times)), store.local_nbytes / store._keys.size))
    torch.distributed.destroy_process_group()


def _bench_dp(world: int, args) -> list[tuple]:
    import multiprocessing as mp

    from megatron_spo.platform import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_sharded_steps, args=(r, world, port, args.prompts, args.pool, args.batch, args.steps, out))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results = sorted(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10_000_000)
    parser.add_argument("--mapping-prompts", type=int, default=None, help="prompts in the mapping build (default: --prompts)")
    parser.add_argument("--pool", type=int, default=14_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dp", type=int, default=0, help="also time the step sharded over this many gloo ranks")
    args = parser.parse_args()
    n = args.prompts
    n_map = args.mapping_prompts or n
    rng = np.random.default_rng(0)
    config = ValueConfig()

    work = np.ones(n)

    def bare_pass():
        np.multiply(work, 1.0000001, out=work)

    bare = _best_of(bare_pass, 9)
    print(f"prompts: {n:,}   bare numpy pass over {n:,} float64: {bare * 1e3:.1f} ms")

    # ---- build from an offline mapping {prompt: [scores]} (the authors' file, parsed)
    texts = [f"Problem #{i}: find the number of integers x with x^2 < {i}." for i in range(n_map)]
    mapping = dict(zip(texts, rng.integers(0, 2, size=(n_map, 8)).tolist()))
    gc.collect()
    start = time.perf_counter()
    store = ValueStore.from_offline_values(mapping, config)
    build_mapping = time.perf_counter() - start
    hash_only = _best_of(lambda: prompt_keys(texts[: min(n_map, 1_000_000)]), 1) * n_map / min(n_map, 1_000_000)
    del mapping, texts, store
    gc.collect()
    scale = n / n_map
    print(
        f"build from mapping ({n_map:,} prompts): {build_mapping:.2f} s = {build_mapping / bare * scale:,.0f}x bare pass"
        f" (per prompt {build_mapping / n_map * 1e6:.2f} us; hashing the texts alone ~{hash_only:.2f} s)"
    )

    # ---- build from arrays
    keys = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    totals = rng.integers(0, 17, size=n)
    successes = rng.integers(0, totals + 1)
    start = time.perf_counter()
    store = ValueStore.from_offline_counts(keys, successes, totals, config)
    build_arrays = time.perf_counter() - start
    print(f"build from arrays: {build_arrays:.2f} s = {build_arrays / bare:.0f}x bare pass (sorting {n:,} keys included)")
    del successes, totals
    gc.collect()

    # ---- one step: sample 1024 from a pool of 14,000, p_hat of the batch, update 1024
    pools = [keys[rng.choice(n, size=args.pool, replace=False)] for _ in range(args.steps)]
    sampler = np.random.default_rng(1)
    step_wall, step_cpu = [], []
    for pool_keys in pools:
        wall, cpu = time.perf_counter(), time.process_time()
        batch = pool_keys[store.sample(pool_keys, args.batch, sampler)]
        p = store.p_hat(batch)
        rewards = (sampler.random(args.batch) < p).astype(np.float64)
        store.update(batch, rewards, 0.96)
        step_wall.append(time.perf_counter() - wall)
        step_cpu.append(time.process_time() - cpu)
    plain_keys, plain_alpha, plain_beta = store._keys, store._posterior[:, 0].copy(), store._posterior[:, 1].copy()
    inline_rng = np.random.default_rng(2)
    inline_wall, inline_cpu = [], []
    for pool_keys in pools:
        wall, cpu = time.perf_counter(), time.process_time()
        _inline_step(plain_keys, plain_alpha, plain_beta, pool_keys, args.batch, config.eps, inline_rng)
        inline_wall.append(time.perf_counter() - wall)
        inline_cpu.append(time.process_time() - cpu)
    # on a shared machine wall time includes waiting for a core; CPU time of this process does not
    step, inline = float(np.median(step_cpu)), float(np.median(inline_cpu))
    print(
        f"step (sample {args.batch} of {args.pool:,} + p_hat + update), median of {args.steps}: "
        f"CPU {step * 1e3:.2f} ms, wall {np.median(step_wall) * 1e3:.2f} ms (min {np.min(step_wall) * 1e3:.2f})"
        f" = {step / bare:.2f}x bare pass = {step / inline:.2f}x inline numpy step ({inline / step:.1f}x faster; CPU"
        f" {inline * 1e3:.2f} ms, wall {np.median(inline_wall) * 1e3:.2f} ms); goal < 5 ms (CPU):"
        f" {'met' if step < 5e-3 else 'NOT met'}"
    )

    if args.dp > 1:
        del store, keys, pools, plain_alpha, plain_beta
        gc.collect()
        results = _bench_dp(args.dp, args)
        dp_cpu = max(r[1] for r in results)
        dp_wall = max(r[2] for r in results)
        print(
            f"step sharded over DP={args.dp} gloo ranks (each {args.prompts // args.dp:,} prompts), slowest rank's"
            f" median: CPU {dp_cpu * 1e3:.2f} ms, wall {dp_wall * 1e3:.2f} ms = {dp_cpu / step:.2f}x the DP=1 step (CPU)"
        )
        return

    # ---- state_dict
    state = _best_of(store.state_dict, 3)
    print(f"state_dict: {state * 1e3:.1f} ms = {state / bare:.1f}x bare pass")

    # ---- memory per prompt, stored responses excluded
    per_prompt = store.local_nbytes / n
    bare_bytes = 8 + 8 + 8  # int64 key + float64 alpha + float64 beta
    print(
        f"memory: {per_prompt:.1f} bytes/prompt = {per_prompt / bare_bytes:.2f}x bare arrays (key, alpha, beta: "
        f"{bare_bytes} B); goal < 32: {'met' if per_prompt < 32 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
