"""TrainConfig: the authors' defaults, cross-section checks and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_spo.config import from_dict, save_config, to_dict
from megatron_spo.errors import UserError
from megatron_spo.rollout.engine import EngineConfig
from megatron_spo.training.config import RolloutConfig, TrainConfig, load_train_config


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1 + 1", "answer": "2"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  hf_dir: {model}\ndata:\n  train_files: [{train}]\n")
    return config, tmp_path


def test_defaults_are_the_authors(setup):
    config, _ = setup
    cfg = load_train_config(str(config))
    assert (cfg.loss.clip_ratio_low, cfg.loss.clip_ratio_high, cfg.loss.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert cfg.loss.loss_agg == "token-mean" and cfg.loss.kl_coef == 0.0
    assert cfg.optimizer.lr == 1e-6
    assert cfg.algorithm.name == "spo" and cfg.rollout.n == 1  # resolved for single-stream
    assert (cfg.batch.train_batch_size, cfg.batch.mini_batch_size) == (768, 96)
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (0.6, 0.95, 20)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_response_tokens == 16384
    assert (cfg.spo.d_half, cfg.spo.clip_lower, cfg.spo.clip_upper, cfg.spo.eps) == (0.06, 0.875, 0.96, 0.05)
    assert cfg.checkpoint_dir.name == "checkpoints"


def test_grpo_gets_eight_responses_and_spo_refuses_groups(setup):
    config, _ = setup
    assert load_train_config(str(config), ["algorithm.name=grpo"]).rollout.n == 8
    with pytest.raises(UserError, match="single-stream"):
        load_train_config(str(config), ["rollout.n=8"])
    with pytest.raises(UserError, match="at least 2 responses"):
        load_train_config(str(config), ["algorithm.name=grpo", "rollout.n=1"])


def test_overrides_reach_nested_subsystem_configs(setup):
    config, _ = setup
    cfg = load_train_config(str(config), ["spo.d_half=0.08", "data.prompt.max_prompt_tokens=64",
                                           "algorithm.spo_chain.cut_interval=3", "rollout.reward.workers=1"])
    assert cfg.spo.d_half == 0.08 and cfg.data.prompt.max_prompt_tokens == 64
    assert cfg.algorithm.spo_chain.cut_interval == 3 and cfg.rollout.reward.workers == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.learning_rate=1"], "unknown key 'optimizer.learning_rate'"),
        (["batch.mini_batch_size=100"], "must divide train_batch_size"),
        (["batch.gen_batch_size=10"], "gen_batch_size (10) must be >= batch.train_batch_size (768)"),
        (["loss.loss_agg=sum"], "'loss.loss_agg' expects one of 'token-mean', 'seq-mean', got 'sum'"),
        (["spo.clip_lower=1.5"], "clip_lower"),
        (["parallel.vpp=2"], "needs pp > 1"),
        (["eval.ks=[64]"], "within 1..n=16"),
        (["algorithm.name=spo_chain", "loss.kl_coef=0.1"], "takes its reference terms from algorithm.spo_chain.loss"),
        (["algorithm.name=spo_tree", "rollout.agent=tool"], "does not cross tool output"),
        (["algorithm.name=spo_tree", "rollout.n=4"], "branching_factors"),
        (["algorithm.name=soft_spo", "algorithm.soft_spo.replay_per_step=2"], "needs replay_buffer_size > 0"),
        (["max_generated_tokens=0"], "max_generated_tokens must be >= 1"),
    ],
)
def test_bad_values_give_one_clear_line(setup, overrides, message):
    config, _ = setup
    with pytest.raises(UserError) as err:
        load_train_config(str(config), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_files_are_named(setup):
    config, tmp_path = setup
    with pytest.raises(UserError, match=r"dataset file '.*missing\.jsonl' does not exist"):
        load_train_config(str(config), [f"data.val_files=[{tmp_path / 'missing.jsonl'}]"])
    with pytest.raises(UserError, match="not a .jsonl / .json / .parquet file"):
        load_train_config(str(config), [f"data.train_files=[{tmp_path / 'x.csv'}]"])
    with pytest.raises(UserError, match="no config.json"):
        load_train_config(str(config), [f"model.hf_dir={tmp_path}"])
    with pytest.raises(UserError, match="spo.offline_values"):
        load_train_config(str(config), [f"spo.offline_values={tmp_path / 'values.json'}"])


def test_effective_config_round_trips(setup):
    config, tmp_path = setup
    cfg = load_train_config(str(config), ["algorithm.name=grpo", "optimizer.betas=[0.9, 0.95]"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_train_config(str(saved))
    assert again == cfg and to_dict(again)["rollout"]["n"] == 8
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_rollout_section_mirrors_every_engine_knob(setup):
    _, tmp_path = setup
    set_elsewhere = {"model", "name", "seed", "load_weights"}
    rollout_fields = {f.name for f in dataclasses.fields(RolloutConfig)}
    missing = {f.name for f in dataclasses.fields(EngineConfig)} - set_elsewhere - rollout_fields
    assert not missing, f"EngineConfig fields not settable from the train config: {missing}"
    engine = RolloutConfig(max_num_seqs=7).engine_config(str(tmp_path / "model"), seed=3)
    assert engine.max_num_seqs == 7 and engine.seed == 3 and engine.name == "hf"


def test_world_size_checks_name_the_sizes(setup):
    config, _ = setup
    cfg = load_train_config(str(config), ["parallel.tp=2", "batch.train_batch_size=8", "batch.mini_batch_size=4",
                                           "batch.gen_batch_size=8"])
    assert cfg.check_world_size(4) == 2
    with pytest.raises(UserError, match=r"parallel.tp \(2\) x parallel.pp \(1\) = 2 does not divide the world size 3"):
        cfg.check_world_size(3)
    with pytest.raises(UserError, match=r"batch.mini_batch_size \(4 prompts x 1 responses = 4 sequences\).*size 8"):
        cfg.check_world_size(16)
