"""The SPO trainer: resume reproduces an uninterrupted run (also the optimizer state, with the
plain and the distributed optimizer at DP=2); a step at DP=2 / TP=2 / PP=2 equals the
single-process step; a checkpoint killed mid-write is ignored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import algorithm_setup, merge, tiny_train_setup

pytestmark = pytest.mark.distributed

# timing and throughput metrics differ run to run; everything else must match exactly
VOLATILE = ("perf/",)


def _train(rank, world_size, overrides, steps, tp=1, pp=1):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    cfg = from_dict(TrainConfig, {**overrides, "total_steps": steps, "parallel": {"tp": tp, "pp": pp}})
    trainer = Trainer(cfg)
    history = []
    trainer.fit(on_step=lambda step, metrics: history.append(
        {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}))
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    optimizer = _optimizer_state(trainer.actor.optimizer)
    store = None
    if getattr(trainer.algorithm, "store", None) is not None:  # SPO's value store
        keys = sorted({p.key for p in trainer.prompts})
        store = trainer.algorithm.store.posteriors(keys)
    trainer.close()
    return {"history": history, "params": params, "optimizer": optimizer, "store": store,
            "start": steps - len(history)}


def _optimizer_state(optimizer):
    """This rank's Adam state: per optimizer parameter (an fp32 master weight, or with the
    distributed optimizer this rank's shard of one), the tensor and its moments and step."""
    state = {"kinds": [type(part).__name__ for part in optimizer.chained_optimizers], "params": []}
    for part in optimizer.chained_optimizers:
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                adam = part.optimizer.state[param]
                state["params"].append({"master": param.detach().clone(), "exp_avg": adam["exp_avg"].clone(),
                                        "exp_avg_sq": adam["exp_avg_sq"].clone(), "step": float(adam["step"])})
    return state


def _assert_same(a, b, what):
    for step, (x, y) in enumerate(zip(a["history"], b["history"])):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), f"{what}: step {step} {key}"
    for name, tensor in a["params"].items():
        assert (b["params"][name] - tensor).abs().max().item() <= 1e-5, f"{what}: {name}"
    if a["store"] is not None:
        for x, y in zip(a["store"], b["store"]):
            assert x == pytest.approx(y, rel=1e-6), f"{what}: value store"


def test_resume_reproduces_uninterrupted_run(spawn, tmp_path):
    base = tiny_train_setup(tmp_path)
    full = spawn(1, _train, {**base, "run_dir": str(tmp_path / "full"), "checkpoint": {"every_steps": 0}}, 6)[0]
    assert any(h["reward/mean"] not in (0.0, 1.0) for h in full["history"])  # a real learning signal
    assert full["history"][-1]["kl_drift/mean"] > 0  # revisited prompts drifted
    interrupted = {**base, "run_dir": str(tmp_path / "split"), "checkpoint": {"every_steps": 3}}
    first = spawn(1, _train, interrupted, 3)[0]
    resumed = spawn(1, _train, interrupted, 6)[0]
    assert resumed["start"] == 3, "did not resume from the step-3 checkpoint"
    _assert_same({**full, "history": full["history"][3:]}, resumed, "resumed run")
    assert first["history"] == full["history"][:3]


@pytest.mark.parametrize("optimizer", ["distributed", pytest.param("plain", marks=pytest.mark.large)])  # CI time
def test_resume_at_dp2_restores_optimizer_state(spawn, tmp_path, optimizer):
    """At DP=2, a run resumed in a fresh process group from its step-1 checkpoint ends step 2 with
    the parameters and the optimizer state (Adam moments, fp32 master weights, step) of the run
    that went on without stopping, bit for bit. Distributed: Megatron's distributed optimizer over
    bf16 parameters, so each rank holds its own shard of separate fp32 master weights."""
    extra = {"optimizer": {"distributed": True}, "model": {"dtype": "bfloat16"}} if optimizer == "distributed" else {}
    # qwen2 (q/k/v biases beside the norms): a bf16 model whose norms stayed fp32 saved each
    # parameter's Adam state under another parameter's key there (megatron-core 0.16.1)
    config = merge(tiny_train_setup(tmp_path, family="qwen2"), {**extra, "run_dir": str(tmp_path / "run"), "checkpoint": {"every_steps": 1}})
    full = spawn(2, _train, config, 2)  # checkpoints after steps 1 and 2
    from megatron_spo.training.checkpointing import STATE_FILE

    (tmp_path / "run" / "checkpoints" / "step_00000002" / STATE_FILE).unlink()  # step 1's is now the latest
    resumed = spawn(2, _train, config, 2)
    total = sum(p.numel() for p in full[0]["params"].values())
    for rank, (want, got) in enumerate(zip(full, resumed)):
        assert got["start"] == 1, "did not resume from the step-1 checkpoint"
        _assert_same({**want, "history": want["history"][1:]}, got, f"resumed run rank {rank}")
        kinds, held = want["optimizer"]["kinds"], sum(p["master"].numel() for p in want["optimizer"]["params"])
        if optimizer == "distributed":
            assert kinds == ["DistributedOptimizer"] and held < total  # a shard of the state, not all of it
            assert all(p["master"].dtype == torch.float32 for p in want["optimizer"]["params"])
        else:
            assert kinds == ["FP32Optimizer"] and held == total
        assert got["optimizer"]["kinds"] == kinds and len(got["optimizer"]["params"]) == len(want["optimizer"]["params"])
        for i, (w, g) in enumerate(zip(want["optimizer"]["params"], got["optimizer"]["params"])):
            assert w["step"] == g["step"] == 4, f"rank {rank} param {i}: step"  # 2 trainer steps x 2 mini-batches
            for key in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(w[key], g[key]), f"rank {rank} param {i}: {key}"
    if optimizer == "distributed":
        assert sum(p["master"].numel() for r in full for p in r["optimizer"]["params"]) == total


def test_one_step_at_dp2_tp2_pp2_equals_single_process(spawn, tmp_path):
    base = {**tiny_train_setup(tmp_path), "checkpoint": {"every_steps": 0}}
    single = spawn(1, _train, {**base, "run_dir": str(tmp_path / "single")}, 2)[0]
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:  # (1, 1) on two processes is DP=2
        results = spawn(2, _train, {**base, "run_dir": str(tmp_path / f"tp{tp}pp{pp}")}, 2, tp, pp)
        for rank, res in enumerate(results):
            _assert_same(single, res, f"TP={tp} PP={pp} rank {rank}")


@pytest.mark.parametrize("algorithm", [pytest.param("spo_chain", marks=pytest.mark.large), "spo_tree",
                                       pytest.param("soft_spo", marks=pytest.mark.large)])  # CI time
def test_other_spos_one_step_at_tp2_equals_tp1(spawn, tmp_path, algorithm):
    """One step of each of the other SPOs at TP=2 equals the unsplit model's step (metrics and
    parameters); spo_tree also at DP=2, where ranks hold different numbers of edges."""
    base = {**algorithm_setup(tmp_path, algorithm), "checkpoint": {"every_steps": 0}}
    single = spawn(1, _train, {**base, "run_dir": str(tmp_path / "single")}, 1)[0]
    h = single["history"][0]
    assert h["rollout/train_sequences"] > 0 and h["actor/grad_norm"] > 0  # a real update happened
    if algorithm != "soft_spo":
        assert h["actor/kl_ref"] >= 0  # the reference model took part (k3 term on by default)
    layouts = [(2, 1)] + ([(1, 1)] if algorithm == "spo_tree" else [])  # (1, 1) on two processes is DP=2
    for tp, pp in layouts:
        results = spawn(2, _train, {**base, "run_dir": str(tmp_path / f"tp{tp}")}, 1, tp, pp)
        for rank, res in enumerate(results):
            _assert_same(single, res, f"{algorithm} TP={tp} PP={pp} rank {rank}")


def test_spo_tree_edge_replay_resumes_exactly(spawn, tmp_path):
    """SPO-tree with the authors' edge replay (at most 2 edges per question a step): edges wait and
    are replayed in later steps, and a run resumed from its step-1 checkpoint (the waiting edges
    and their old log-probs are the algorithm's state) ends like the uninterrupted one."""
    base = merge(algorithm_setup(tmp_path, "spo_tree"), {"algorithm": {"spo_tree": {"replay_edges_per_question": 2}}})
    full = spawn(1, _train, {**base, "run_dir": str(tmp_path / "full"), "checkpoint": {"every_steps": 0}}, 3)[0]
    assert full["history"][0]["replay/buffered_edges"] > 0  # some of step 0's edges waited
    assert sum(h["replay/replayed_edges"] for h in full["history"]) > 0  # and trained later
    interrupted = {**base, "run_dir": str(tmp_path / "split"), "checkpoint": {"every_steps": 1}}
    spawn(1, _train, interrupted, 1)
    resumed = spawn(1, _train, interrupted, 3)[0]
    assert resumed["start"] == 1, "did not resume from the step-1 checkpoint"
    _assert_same({**full, "history": full["history"][1:]}, resumed, "resumed run")


@pytest.mark.parametrize("kill", [pytest.param(signal.SIGKILL, id="SIGKILL"),
                                  pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.large)])  # CI time
def test_kill_during_checkpoint_write_is_ignored_on_resume(tmp_path, kill):
    """A kill while step 2's checkpoint is being written: no process the run started outlives it
    (the checkpoint writer's helpers die with it) and the resume starts from step 1's."""
    base = tiny_train_setup(tmp_path)
    config = {**base, "run_dir": str(tmp_path / "run"), "total_steps": 2, "checkpoint": {"every_steps": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spo", "train", "--config", str(path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = tmp_path / "run" / "checkpoints" / "step_00000002" / "model"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.stdout.read() if proc.poll() is not None else "no checkpoint started"
    import psutil

    started = psutil.Process(proc.pid).children(recursive=True)  # the checkpoint writer's helpers
    assert started, "the run started no helper process (the check below would prove nothing)"
    proc.send_signal(kill)
    proc.wait()
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"outlived the killed run: {[(p.pid, ' '.join(p.cmdline())[:80]) for p in alive]}"
    from megatron_spo.training.checkpointing import complete_checkpoints

    complete = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in complete] == ["step_00000001"]
    env.pop("MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT")
    done = subprocess.run([sys.executable, "-m", "megatron_spo", "train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "step_00000001" in done.stdout
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step_00000002"
