"""Colocation: the engine sleeps while the actor trains and the actor's state goes to host while
the engine generates, in verl's order; the run is bit-identical to one where nothing moves."""

from __future__ import annotations

import pytest
import torch

from helpers import algorithm_setup, merge, probe_at_generate, tiny_train_setup

pytestmark = pytest.mark.distributed

COLOCATE = {"rollout": {"engine": {"enable_sleep_mode": True}, "offload_actor": True}}


def _run(rank, world_size, overrides, steps):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": steps}))
    actor_storages = [p.untyped_storage() for chunk in trainer.actor.chunks for p in chunk.parameters()]
    distinct = {s._cdata: s for s in actor_storages}.values()
    at_generate = probe_at_generate(trainer.engine, lambda: sum(s.nbytes() for s in distinct))
    history, events = [], []
    for _ in range(steps):
        history.append({k: v for k, v in trainer.train_step().items() if not k.startswith("perf/")})
        events.append(list(trainer.colocation.events))
        trainer.colocation.events.clear()
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    moments = [v.clone() for part in trainer.actor.optimizer.chained_optimizers
               for state in part.optimizer.state.values() for k, v in sorted(state.items()) if k != "step"]
    trainer.close()
    return {"history": history, "events": events, "params": params, "moments": moments, "at_generate": at_generate}


def _assert_identical(a, b):
    assert a["history"] == b["history"]
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert len(a["moments"]) == len(b["moments"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(a["moments"], b["moments"]))


@pytest.mark.parametrize("optimizer", [pytest.param("plain", marks=pytest.mark.large), "distributed"])  # CI time
def test_colocated_run_equals_resident_run_and_frees_the_actor_during_generation(spawn, tmp_path, optimizer):
    base = tiny_train_setup(tmp_path)
    if optimizer == "distributed":  # bf16 weights in DDP's parameter buffer, fp32 master shards
        base = merge(base, {"optimizer": {"distributed": True}, "model": {"dtype": "bfloat16"}})
    (plain,) = spawn(1, _run, merge(base, {"run_dir": str(tmp_path / "plain")}), 3)
    (colocated,) = spawn(1, _run, merge(base, {**COLOCATE, "run_dir": str(tmp_path / "colocated")}), 3)
    _assert_identical(plain, colocated)
    assert min(plain["at_generate"]) > 0 and colocated["at_generate"] == [0] * len(colocated["at_generate"])
    first, later = colocated["events"][0], colocated["events"][1]
    assert first[0] == "engine.sleep(2)"  # the engine starts awake: its KV cache goes before the sync
    offload = [e for e in first if e.startswith("models.offload")]
    assert len(offload) == 1 and int(offload[0].split("(")[1].split()[0]) > 0
    assert [e.split("(")[0] for e in later] == ["engine.wake_up", "models.offload", "engine.wake_up",
                                                "engine.sleep", "models.onload"]
    assert later[0] == "engine.wake_up(weights)" and later[2] == "engine.wake_up(kv_cache)"
    assert plain["events"] == [[]] * 3  # nothing moves unless asked


@pytest.mark.parametrize("algorithm", [pytest.param("spo_chain", marks=pytest.mark.large), "soft_spo"])  # CI time
def test_colocation_with_a_reference_and_a_second_generation(spawn, tmp_path, algorithm):
    """spo_chain generates continuations after the old-policy pass (the engine stays awake over
    it); soft_spo loads the reference into the engine for Q0 first. Both also offload the
    reference model. Bit-identical to the resident run."""
    base = algorithm_setup(tmp_path, algorithm)
    (plain,) = spawn(1, _run, merge(base, {"run_dir": str(tmp_path / "plain")}), 2)
    (colocated,) = spawn(1, _run, merge(base, {**COLOCATE, "run_dir": str(tmp_path / "colocated")}), 2)
    _assert_identical(plain, colocated)
    steps = colocated["events"]
    # the actor trains alone; spo_chain's actor comes back before its continuations, the engine
    # sleeps after them
    end = ["models.onload", "engine.sleep(2)"] if algorithm == "spo_chain" else ["engine.sleep(2)", "models.onload"]
    assert all(s[-2:] == end for s in steps), steps
    if algorithm == "soft_spo":  # Q0 from the reference: a sync and a generation before the actor's
        assert [e.split("(")[0] for e in steps[0][:4]] == ["engine.sleep", "engine.wake_up", "models.offload",
                                                           "engine.wake_up"]
        assert "models.onload" in steps[0][4:]
