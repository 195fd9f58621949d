"""The trainer with rollout.mode=async at DP=2 (gloo) on a tiny model: bounded staleness with
partial rollouts trains and reports its staleness, and a resumed run discards what was in flight
at the checkpoint without losing those prompts from the value store."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from helpers import merge, tiny_train_setup

pytestmark = pytest.mark.distributed


def _async_run(rank, world_size, overrides, steps, uneven_stale=False):
    """`uneven_stale`: rank 1 sees no stale token (as a rank whose trajectories all finished in the
    current version does): the ranks must still agree on the old pass, whose metrics are collective."""
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    if uneven_stale and rank == 1:
        real = Trainer._stale_tokens
        Trainer._stale_tokens = lambda self, *args: torch.zeros_like(real(self, *args))
    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": steps}))
    resumed_at = trainer.step
    inflight_at_start = set(trainer.async_rollouts.inflight_keys)
    keys = sorted({p.key for p in trainer.prompts})
    posteriors_at_start = trainer.algorithm.store.posteriors(keys)
    history = []
    trainer.fit(on_step=lambda step, metrics: history.append(dict(metrics)))
    in_flight = sorted(trainer.async_rollouts.inflight_keys)
    posteriors = trainer.algorithm.store.posteriors(keys)
    trainer.close()
    return {"history": history, "in_flight": in_flight, "keys": keys, "posteriors": posteriors,
            "posteriors_at_start": posteriors_at_start, "resumed_at": resumed_at,
            "inflight_at_start": inflight_at_start}


def _config(tmp_path, **rollout):
    return merge(tiny_train_setup(tmp_path), {
        "run_dir": str(tmp_path / "run"), "checkpoint": {"every_steps": 2},
        "algorithm": {"spo": {"gen_batch_size": 12}},
        "rollout": {"mode": "async", "max_inflight": 1, "max_staleness": 1, "partial_rollout": True, **rollout}})


def test_async_staleness_1_trains_resumes_and_keeps_in_flight_prompts(spawn, tmp_path):
    # one mini-batch a step: the old pass runs only for stale tokens, and rank 1 reports none
    config = merge(_config(tmp_path), {"batch": {"mini_batch_size": 4}})
    first = spawn(2, _async_run, config, 2, True)
    assert any(m["async/stale_token_fraction"] > 0 for m in first[0]["history"])  # rank 0 had some
    for rank in first:
        assert [m["async/staleness_max"] <= 1 for m in rank["history"]] == [True, True]
        assert all(m["rollout/train_sequences"] == 4 for m in rank["history"])
    assert first[0]["in_flight"] == first[1]["in_flight"]  # replicated
    in_flight = first[0]["in_flight"]
    assert len(in_flight) == 4  # one batch outstanding at the end (max_staleness 1)

    second = spawn(2, _async_run, config, 4)
    for rank in second:
        assert rank["resumed_at"] == 2 and rank["inflight_at_start"] == set()  # discarded, drawable again
        assert [m["async/staleness_max"] <= 1 for m in rank["history"]] == [True, True]
    assert second[0]["history"][0]["rollout/train_sequences"] == 4
    # what was in flight at the checkpoint keeps the posterior it had there (never half-updated)
    where = np.searchsorted(first[0]["keys"], in_flight)
    for before, after in zip(first[0]["posteriors"], second[0]["posteriors_at_start"]):
        assert (before[where] == after[where]).all()



def test_a_resumed_async_run_at_staleness_0_repeats_the_uninterrupted_one(spawn, tmp_path):
    base = _config(tmp_path, max_staleness=0, max_inflight=2)
    full = spawn(1, _async_run, {**base, "run_dir": str(tmp_path / "full"), "checkpoint": {"every_steps": 0}}, 4)[0]
    split = {**base, "run_dir": str(tmp_path / "split")}
    spawn(1, _async_run, split, 2)
    resumed = spawn(1, _async_run, split, 4)[0]
    assert resumed["resumed_at"] == 2
    for a, b in zip(full["history"][2:], resumed["history"]):
        for key in a:
            if not key.startswith("perf/") and key not in ("async/stream_tokens_per_s", "async/wait_s"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def _history_and_params(rank, world_size, overrides, steps):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": steps}))
    history = []
    trainer.fit(on_step=lambda step, metrics: history.append(dict(metrics)))
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    trainer.close()
    return history, params


def test_async_grpo_at_staleness_0_trains_exactly_as_sync_grpo(spawn, tmp_path):
    """The group barrier moves into the buffer: a group of n responses is trained once all have
    finished; with max_staleness 0 and 3 slots for 4 x 2 sequences, the run is sync GRPO's."""
    base = merge(tiny_train_setup(tmp_path), {"algorithm": {"name": "grpo"}, "rollout": {"n": 2},
                                              "checkpoint": {"every_steps": 0}})
    sync = spawn(2, _history_and_params, {**base, "run_dir": str(tmp_path / "sync")}, 3)[0]
    streamed = spawn(2, _history_and_params, merge(base, {
        "run_dir": str(tmp_path / "async"), "rollout": {"mode": "async", "max_inflight": 3}}), 3)[0]
    for a, b in zip(sync[0], streamed[0]):
        for key, value in a.items():
            if not key.startswith("perf/") and key != "rollout/logprob_mismatch":
                assert b[key] == value, key
    assert sum(m["async/refills"] for m in streamed[0]) > 0
    for name, tensor in sync[1].items():
        assert torch.equal(tensor, streamed[1][name]), name
