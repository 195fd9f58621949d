"""ValueStore sharded over DP=2 gloo ranks holds exactly the state of DP=1 after the same steps,
and its checkpoints re-shard (2 -> 1, 2 -> 4) bit for bit.

The value store needs only a process group, so the ranks initialise plain torch.distributed
(`platform.backend()`, gloo here) rather than Megatron's parallel state: 4 Megatron imports would
cost most of this file's time budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_spo.value import ValueConfig, ValueStore, kl_drift, rho_from_drift

pytestmark = pytest.mark.distributed

NUM_PROMPTS, POOL, BATCH, STEPS = 200, 60, 16, 50


def _visit(key: int, step: int) -> tuple[np.ndarray, np.ndarray, float]:
    """This step's response to prompt `key`: token ids, post-update log-probs, reward; a pure
    function of (key, step), so it does not matter which rank generates it."""
    rng = np.random.default_rng([key % 2**32, step])
    length = int(rng.integers(0, 12))
    return rng.integers(0, 50_000, length), -rng.random(length).astype(np.float32), float(rng.integers(0, 2))


def _actor_logprobs(old: np.ndarray, key: int, step: int) -> np.ndarray:
    """The actor's current log-probs of a stored response: the old ones plus a drift."""
    rng = np.random.default_rng([key % 2**32, step, 7])
    return old + rng.normal(0, 0.02, old.shape[0]).astype(np.float32)


def _make_store(group) -> ValueStore:
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**62), 2**62, NUM_PROMPTS)  # negative keys too: owner = key mod dp
    totals = rng.integers(0, 16, NUM_PROMPTS)
    return ValueStore.from_offline_counts(keys, rng.integers(0, totals + 1), totals, ValueConfig(), group=group), keys


def _run_spo_steps(store: ValueStore, all_keys: np.ndarray, rank: int, world: int) -> dict:
    """The trainer's use of the store, SPMD: replicated sampling and p_hat, rank-local updates."""
    sampler = np.random.default_rng(1234)  # the same seed on every rank
    batches, p_hats, rhos = [], [], {}
    for step in range(STEPS):
        pool_keys = all_keys[sampler.choice(NUM_PROMPTS, POOL, replace=False)]
        batch = pool_keys[store.sample(pool_keys, BATCH, sampler)]
        batches.append(batch)
        p_hats.append(store.p_hat(batch))
        local = batch[rank::world]  # this rank's share of the batch
        stored = store.stored_responses(local)
        _, old, mask = stored.padded()
        new = old.clone()
        for row, key in enumerate(local):
            length = len(stored.token_ids[row])
            new[row, :length] = torch.from_numpy(_actor_logprobs(stored.logprobs[row], int(key), step))
        rho = rho_from_drift(kl_drift(old, new, mask), store.config)
        rhos.update({(step, int(k)): float(r) for k, r in zip(local, rho)})
        visits = [_visit(int(key), step) for key in local]
        store.update(local, [v[2] for v in visits], rho)
        store.store_responses(local, [v[0] for v in visits], [v[1] for v in visits])
    return {"batches": batches, "p_hats": p_hats, "rhos": rhos, "state": store.state_dict()}


def _scenario(rank: int, world: int, directory: str) -> dict:
    """Ranks 0-1 run the SPO steps at DP=2 and save; then all 4 ranks load the checkpoint at DP=4."""
    from megatron_spo import platform

    torch.distributed.init_process_group(platform.backend(), rank=rank, world_size=world)
    pair = torch.distributed.new_group([0, 1])  # every rank takes part in creating each group
    everyone = torch.distributed.new_group(list(range(world)))
    result = {}
    if rank < 2:
        store, keys = _make_store(pair)
        result = _run_spo_steps(store, keys, rank, 2)
        store.save(directory)
    torch.distributed.barrier(group=everyone)
    loaded = ValueStore.load(directory, ValueConfig(), group=everyone)
    local_keys = loaded.state_dict()["keys"]
    result["loaded"] = loaded.state_dict()
    result["present"] = loaded.stored_responses(local_keys[:5]).present  # rank-local reads after load
    # bad input on one rank is an error on every rank, not a hang in a collective
    errors = []
    for reward, key in ((float("nan") if rank == 2 else 1.0, local_keys[0]), (1.0, 12345 if rank == 1 else local_keys[0])):
        try:
            loaded.update([key], [reward], 0.9)
        except (ValueError, KeyError) as err:
            errors.append(type(err).__name__)
    result["errors"] = errors
    result["alpha_after_errors"] = loaded.state_dict()["alpha"]
    return result


def _merge(states: list[dict]) -> dict:
    """One DP=1 state from per-rank shards (sorted by key, responses in key order)."""
    keys = np.concatenate([s["keys"] for s in states])
    order = np.argsort(keys)
    merged = {name: np.concatenate([s[name] for s in states])[order] for name in ("keys", "alpha", "beta")}
    r_keys = np.concatenate([s["response_keys"] for s in states])
    r_order = np.argsort(r_keys)
    lengths = [s["response_lengths"] for s in states]
    per_key_ids, per_key_lps = [], []
    for s in states:
        bounds = np.cumsum(np.concatenate(([0], s["response_lengths"])))
        per_key_ids += [s["response_token_ids"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        per_key_lps += [s["response_logprobs"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    merged["response_keys"] = r_keys[r_order]
    merged["response_lengths"] = np.concatenate(lengths)[r_order]
    merged["response_token_ids"] = np.concatenate([per_key_ids[i] for i in r_order])
    merged["response_logprobs"] = np.concatenate([per_key_lps[i] for i in r_order])
    return merged


def _assert_same_state(got: dict, want: dict) -> None:
    for name in ("keys", "alpha", "beta", "response_keys", "response_lengths", "response_token_ids", "response_logprobs"):
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # bit-identical, no tolerance


def test_dp2_equals_dp1_and_checkpoints_reshard(spawn, tmp_path):
    single_store, keys = _make_store(None)
    single = _run_spo_steps(single_store, keys, 0, 1)
    reference = single_store.state_dict()
    assert len(reference["response_keys"]) > 100  # most prompts were visited and hold a response
    assert len(set(single["rhos"].values())) > 10  # KL-mode rho actually varied

    directory = str(tmp_path / "values")
    ranks = spawn(4, _scenario, directory)
    for rank in ranks[:2]:  # both DP=2 ranks drew the same batches and read the same p_hat as DP=1
        for got, want in zip(rank["batches"], single["batches"]):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(rank["p_hats"], single["p_hats"]):
            np.testing.assert_array_equal(got, want)
    assert {**ranks[0]["rhos"], **ranks[1]["rhos"]} == single["rhos"]
    shards = [r["state"] for r in ranks[:2]]
    assert all(len(s["keys"]) < NUM_PROMPTS for s in shards)  # really sharded
    _assert_same_state(_merge(shards), reference)

    # 2 -> 1: load in this process
    _assert_same_state(ValueStore.load(directory, ValueConfig()).state_dict(), reference)
    # 2 -> 4
    _assert_same_state(_merge([r["loaded"] for r in ranks]), reference)
    stored = set(reference["response_keys"].tolist())
    for rank, result in enumerate(ranks):
        assert result["errors"] == ["ValueError", "KeyError"]
        np.testing.assert_array_equal(result["alpha_after_errors"], result["loaded"]["alpha"])  # nothing applied
        assert np.all(np.mod(result["loaded"]["keys"], 4) == rank)
        assert result["present"].tolist() == [int(k) in stored for k in result["loaded"]["keys"][:5]]
