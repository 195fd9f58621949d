"""What `megatron-spo demo` asks of the machine before its first stage: the reward runs in the
crash-isolated process pool, and a missing optional dependency (matplotlib) is said up front."""

from __future__ import annotations

import importlib.util

import pytest

from megatron_spo.config import from_dict
from megatron_spo.demo import cli as demo_cli
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.training.config import TrainConfig


def test_demo_training_scores_in_the_process_pool(tmp_path):
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "config.json").write_text("{}")
    files = {name: tmp_path / name for name in ("train.jsonl", "val.jsonl", "offline.json")}
    for path in files.values():
        path.write_text("{}\n")
    raw = demo_cli._spo_config(sft_dir, files["train.jsonl"], files["val.jsonl"], files["offline.json"],
                               tmp_path / "run", demo_cli.QUICK, "hf")
    reward = from_dict(TrainConfig, raw).rollout.reward
    # a reward that hangs or aborts costs a worker, never the demo's trainer
    assert reward.pool == RewardConfig().pool == "process"
    assert reward.timeout_s == RewardConfig().timeout_s


def test_demo_without_matplotlib_says_so_before_the_first_stage(tmp_path, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))

    class FirstStage(Exception):
        pass

    def first_stage(*args, **kwargs):
        raise FirstStage

    monkeypatch.setattr("megatron_spo.demo.assets.build_demo_assets", first_stage)
    with pytest.raises(FirstStage):
        demo_cli.run_demo(tmp_path / "demo", demo_cli.QUICK)
    printed = capsys.readouterr().out
    assert "matplotlib is not installed, so the demo draws no plots" in printed
    assert printed.index("matplotlib") < printed.index("[1/6]")


def test_demo_seed_reaches_the_model_sft_and_rl_but_not_the_data(tmp_path, monkeypatch):
    """`demo --seed N`: the first stage builds the model with seed N (the task's data keep their
    own seed, so every seed is evaluated on the same held-out prompts), and RL trains with it."""
    seen = {}

    class FirstStage(Exception):
        pass

    def first_stage(out_dir, task=None, model=None, **kwargs):
        seen["task"], seen["model"] = task, model
        raise FirstStage

    monkeypatch.setattr("megatron_spo.demo.assets.build_demo_assets", first_stage)
    with pytest.raises(FirstStage):
        demo_cli.main(["--quick", "--seed", "3", "--out", str(tmp_path / "demo")])
    assert seen["model"].seed == 3 and seen["task"] is None  # the task's default seed: the same data
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "config.json").write_text("{}")
    raw = demo_cli._spo_config(sft_dir, tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "o.json", tmp_path / "run",
                               demo_cli.dataclasses.replace(demo_cli.QUICK, seed=3), "hf")
    assert raw["seed"] == 3
