"""A run directory belongs to one run (`training.run_dir.claim`): new runs never mix with old
ones, a resume must use the config that made the checkpoints, overwriting is explicit."""

from __future__ import annotations

import json

import pytest

from megatron_spo.config import load_yaml
from megatron_spo.training.config import load_train_config
from megatron_spo.training.metrics import MetricsLogger, read_metrics
from megatron_spo.training.run_dir import changed_keys, claim


@pytest.fixture
def make_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1 + 1", "answer": "2"}) + "\n")
    base = tmp_path / "base.yaml"
    base.write_text(f"model:\n  hf_dir: {model}\ndata:\n  train_files: [{train}]\nrun_dir: {tmp_path / 'run'}\n")
    return lambda *overrides: load_train_config(str(base), list(overrides))


def test_a_new_run_records_its_config(make_config, tmp_path):
    cfg = make_config("total_steps=4")
    assert claim(tmp_path / "run", cfg, resume_step=0) == (None, False)
    assert load_yaml(tmp_path / "run" / "config.yaml")["total_steps"] == 4


def test_never_refuses_a_directory_that_holds_a_run_and_overwrite_clears_it(make_config, tmp_path):
    run = tmp_path / "run"
    claim(run, make_config(), resume_step=0)
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / ".lock").write_text("pid 1")
    problem, _ = claim(run, make_config("checkpoint.resume=never"), resume_step=2)
    assert "already holds a run" in problem and "checkpoint.resume=overwrite" in problem
    assert claim(run, make_config("checkpoint.resume=overwrite", "seed=3"), resume_step=2) == (None, False)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]  # the old run's files are gone
    assert load_yaml(run / "config.yaml")["seed"] == 3


def test_resume_refuses_a_changed_config_naming_the_keys_and_records_a_harmless_change(make_config, tmp_path):
    run = tmp_path / "run"
    claim(run, make_config("total_steps=4"), resume_step=0)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # the run trained
    problem, _ = claim(run, make_config("algorithm.name=grpo", "batch.train_batch_size=96"), resume_step=2)
    assert "another config (algorithm.name, batch.train_batch_size, rollout.n differ" in problem
    longer = make_config("total_steps=10", "logging.tensorboard=false", "eval.every_steps=5", "rollout.reward.workers=4")
    assert claim(run, longer, resume_step=2) == (None, True)
    assert load_yaml(run / "config.yaml")["total_steps"] == 4  # the first config stays the record
    assert load_yaml(run / "config.resume-00000002.yaml")["total_steps"] == 10


def test_a_directory_that_holds_no_run_is_never_continued(make_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    problem, _ = claim(run, make_config(), resume_step=0)
    assert "holds no megatron-spo run (no config.yaml)" in problem
    assert (run / "notes.txt").read_text() == "mine"


def test_checkpoints_kept_elsewhere_belong_to_the_run(make_config, tmp_path):
    elsewhere = tmp_path / "ckpt"
    (elsewhere / "step_00000001").mkdir(parents=True)
    problem, _ = claim(tmp_path / "run", make_config(f"checkpoint.dir={elsewhere}", "checkpoint.resume=never"),
                       resume_step=1)
    assert "already holds a run" in problem
    assert claim(tmp_path / "run", make_config(f"checkpoint.dir={elsewhere}", "checkpoint.resume=overwrite"),
                 resume_step=1) == (None, False)
    assert not any(elsewhere.iterdir())


def test_changed_keys_compare_as_yaml_holds_them():
    first = {"optimizer": {"betas": [0.9, 0.999], "lr": 1e-6}, "logging": {"wandb": False}, "total_steps": 4}
    assert changed_keys(first, {"optimizer": {"betas": [0.9, 0.999], "lr": 1e-6}, "logging": {"wandb": True},
                                "total_steps": 9}) == []
    # a key present on one side only counts as changed unless harmless (logging, length)
    assert changed_keys(first, {"optimizer": {"betas": [0.9, 0.95], "lr": 1e-6}}) == ["optimizer.betas"]


def test_a_restart_before_the_first_checkpoint_drops_the_killed_run_s_rows(tmp_path):
    """Continuing from step 0 (no checkpoint was complete): none of the killed run's rows stay, so
    the new rows do not follow them."""
    first = MetricsLogger(tmp_path, tensorboard=False)
    first.log(0, {"eval/accuracy": 0.1})
    first.log(1, {"reward/mean": 0.5})
    first.close()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=-1).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_a_run_that_stopped_before_its_first_step_does_not_block_a_corrected_one(make_config, tmp_path):
    """The first attempt recorded its config and failed at start-up (no checkpoint, no metrics):
    the corrected config starts the run again instead of being refused as another config."""
    run = tmp_path / "run"
    claim(run, make_config("seed=1"), resume_step=0)
    (run / "tensorboard").mkdir()
    assert claim(run, make_config("seed=2"), resume_step=0) == (None, False)
    assert load_yaml(run / "config.yaml")["seed"] == 2 and not (run / "tensorboard").exists()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # it trained a step: now it is a run to continue
    problem, _ = claim(run, make_config("seed=3"), resume_step=0)
    assert "seed differ" in problem
