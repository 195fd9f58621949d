"""Disaggregated placement (parallel.rollout_ranks=1 on 2 gloo ranks: rank 0 trains, rank 1 only
generates): at max_staleness 0 it trains exactly as the colocated synchronous run; the weights
travel by broadcast; a rollout rank that dies stops the trainer with one line, no hang, and the
run resumes from its checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from helpers import merge, tiny_train_setup

pytestmark = pytest.mark.distributed


def _run(rank, world_size, overrides, steps, die_at_load=None, trainer_dies_at_step=None):
    """`megatron-spo train`'s two roles, as its CLI splits them; `die_at_load` kills the rollout
    rank (SIGKILL) as its k-th weight load starts, `trainer_dies_at_step` the trainer after that step."""
    from megatron_spo import platform
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    config = from_dict(TrainConfig, {**overrides, "total_steps": steps})
    if platform.is_rollout_rank(config.parallel.rollout_ranks):
        from megatron_spo.rollout import remote

        if die_at_load is not None:
            loads = [0]
            original = remote.RolloutServer._op_load

            def load_then_die(self, arg):
                loads[0] += 1
                if loads[0] == die_at_load:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(self, arg)

            remote.RolloutServer._op_load = load_then_die
        try:
            return remote.serve(config)
        except remote.RolloutRankError as err:
            return {"error": f"{type(err).__name__}: {err}"}
    trainer = Trainer(config)
    history = []

    def on_step(step, metrics):
        history.append(dict(metrics))
        if step == trainer_dies_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        trainer.fit(on_step=on_step)
    except Exception as err:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(err).__name__}: {err}", "history": history, "step": trainer.step}
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    trainer.close()
    return {"history": history, "params": params, "is_remote": type(trainer.engine).__name__}


def _base(root):
    return merge(tiny_train_setup(root), {"checkpoint": {"every_steps": 2}})  # checkpoints change nothing


def _disaggregated(base, run_dir, **rollout):
    return merge(base, {"run_dir": run_dir, "parallel": {"rollout_ranks": 1},
                        "rollout": {"mode": "async", "max_staleness": 0, "max_inflight": 3, **rollout}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(root, base config, the colocated sync run on 1 rank, the disaggregated run on 1 + 1), 4 steps each."""
    from helpers import distributed_run

    root = tmp_path_factory.mktemp("disaggregated")
    base = _base(root)
    sync = distributed_run(1, _run, {**base, "run_dir": str(root / "sync")}, 4, workdir=root)[0]
    split = distributed_run(2, _run, _disaggregated(base, str(root / "split")), 4, workdir=root)
    return root, base, sync, split


def _assert_same_training(a, b):
    for x, y in zip(a["history"], b["history"], strict=True):
        for key, value in x.items():
            if not key.startswith(("perf/", "async/")) and key != "rollout/logprob_mismatch":
                assert y[key] == value, key
    for name, tensor in a["params"].items():
        assert torch.equal(tensor, b["params"][name]), name


def test_disaggregated_staleness_0_trains_exactly_as_colocated_sync(reference):
    """3 slots on the rollout rank for 4 sequences a step: slots are refilled remotely, the
    weights reach the rollout rank by broadcast after every step, and 4 steps are sync's."""
    _, _, sync, split = reference
    trainer = split[0]
    assert "error" not in trainer, trainer.get("error")
    assert trainer["is_remote"] == "RemoteEngine" and split[1] == 0
    _assert_same_training(sync, trainer)
    assert sum(m["async/refills"] for m in trainer["history"]) > 0
    assert all(m["perf/weight_sync_s"] > 0 for m in trainer["history"])


def test_a_dead_rollout_rank_stops_the_trainer_with_one_line_and_the_run_resumes(reference, spawn, tmp_path):
    """SIGKILL on the rollout rank as its 4th weight load starts (loads: the start, after step 1,
    after step 2, after step 3; the checkpoint is at step 2): the trainer raises one line naming
    the rank in step 3, and the same command resumes from step 2 and ends as an uninterrupted run."""
    import pickle

    _, base, _, split = reference
    config = _disaggregated(base, str(tmp_path / "run"))
    with pytest.raises(AssertionError) as failed:
        spawn(2, _run, config, 4, 4, timeout_s=240)
    assert "rank 1: no result" in str(failed.value)  # the killed rollout rank
    with open(tmp_path / "rank0.pkl", "rb") as fh:
        status, trainer = pickle.load(fh)
    assert status == "ok" and trainer["step"] == 2 and len(trainer["history"]) == 2, trainer
    message = trainer["error"]
    assert message.startswith("RolloutRankError: rollout rank 1 (parallel.rollout_ranks) stopped ("), message
    assert "\n" not in message and "resume from the last complete checkpoint" in message

    resumed = spawn(2, _run, config, 4)[0]
    assert "error" not in resumed, resumed.get("error")
    assert len(resumed["history"]) == 2
    whole = split[0]
    _assert_same_training({"history": whole["history"][2:], "params": whole["params"]}, resumed)


def test_a_dead_trainer_stops_its_rollout_rank_with_one_line(spawn, tmp_path):
    config = _disaggregated(_base(tmp_path), str(tmp_path / "run"))
    with pytest.raises(AssertionError) as failed:
        spawn(2, _run, config, 4, None, 1, timeout_s=240)
    assert "rank 0: no result" in str(failed.value)
    import pickle

    with open(tmp_path / "rank1.pkl", "rb") as fh:
        status, rollout = pickle.load(fh)
    assert status == "ok", rollout
    assert rollout["error"].startswith("RolloutRankError: trainer rank 0 stopped ("), rollout
    assert "\n" not in rollout["error"]
