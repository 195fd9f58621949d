"""The SPO trainer: resume reproduces an uninterrupted run; a step at DP=2 / TP=2 / PP=2 equals
the single-process step; a checkpoint killed mid-write is ignored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers import algorithm_setup, tiny_train_setup

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
    while trainer.step < steps:
        metrics = trainer.train_step()
        history.append({k: v for k, v in metrics.items() if not k.startswith(VOLATILE)})
        if cfg.checkpoint.every_steps and trainer.step % cfg.checkpoint.every_steps == 0:
            trainer.save_checkpoint()
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    store = None
    if trainer.store is not None:
        keys = sorted({p.key for p in trainer.prompts})
        store = trainer.store.posteriors(keys)
    trainer.close()
    return {"history": history, "params": params, "store": store, "start": steps - len(history)}


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


def test_one_step_at_dp2_tp2_pp2_equals_single_process(spawn, tmp_path):
    base = {**tiny_train_setup(tmp_path), "checkpoint": {"every_steps": 0}}
    single = spawn(1, _train, {**base, "run_dir": str(tmp_path / "single")}, 2)[0]
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:  # (1, 1) on two processes is DP=2
        results = spawn(2, _train, {**base, "run_dir": str(tmp_path / f"tp{tp}pp{pp}")}, 2, tp, pp)
        for rank, res in enumerate(results):
            _assert_same(single, res, f"TP={tp} PP={pp} rank {rank}")


@pytest.mark.parametrize("algorithm", ["spo_chain", "spo_tree", "soft_spo"])
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


def test_kill_during_checkpoint_write_is_ignored_on_resume(tmp_path):
    """SIGKILL while step 2's checkpoint is being written; the resume starts from step 1's."""
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
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from megatron_spo.training.trainer import complete_checkpoints

    complete = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in complete] == ["step_00000001"]
    env.pop("MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT")
    done = subprocess.run([sys.executable, "-m", "megatron_spo", "train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "step_00000001" in done.stdout
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step_00000002"
