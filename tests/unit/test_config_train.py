"""TrainConfig: the authors' defaults, cross-section checks and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

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
    loss = cfg.algorithm.spo.loss
    assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert loss.loss_agg == "token-mean" and loss.kl_coef == 0.0
    assert cfg.algorithm.grpo.loss == loss  # the baseline's loss is SPO's
    assert (cfg.algorithm.spo.gen_batch_size, cfg.algorithm.spo.advantage_eps) == (14000, 1e-8)
    assert (cfg.algorithm.grpo.eps, cfg.algorithm.grpo.norm_by_std) == (1e-6, True)
    assert cfg.optimizer.lr == 1e-6
    assert cfg.algorithm.name == "spo" and cfg.rollout.n == 1  # resolved for single-stream
    assert (cfg.batch.train_batch_size, cfg.batch.mini_batch_size) == (768, 96)
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.top_k) == (16, 0.6, 0.95, 20)
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.max_response_tokens == 16384
    spo = cfg.algorithm.spo
    assert (spo.d_half, spo.clip_lower, spo.clip_upper, spo.eps) == (0.06, 0.875, 0.96, 0.05)
    assert (spo.rho_mode, spo.rho) == ("kl", 0.875)  # constant mode: the recipe's rho (spo_trainer.yaml)
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
    cfg = load_train_config(str(config), ["algorithm.spo.d_half=0.08", "data.prompt.max_prompt_tokens=64",
                                           "algorithm.spo_chain.cut_interval=3", "rollout.reward.workers=1",
                                           "algorithm.grpo.loss.kl_coef=0.01", "rollout.engine.max_num_seqs=7"])
    assert cfg.algorithm.spo.d_half == 0.08 and cfg.data.prompt.max_prompt_tokens == 64
    assert cfg.algorithm.spo_chain.cut_interval == 3 and cfg.rollout.reward.workers == 1
    assert cfg.algorithm.grpo.loss.kl_coef == 0.01 and cfg.algorithm.spo.loss.kl_coef == 0.0
    assert cfg.rollout.engine.max_num_seqs == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer.learning_rate=1"], "unknown key 'optimizer.learning_rate'"),
        (["batch.mini_batch_size=100"], "must divide train_batch_size"),
        (["algorithm.spo.gen_batch_size=10"],
         "algorithm.spo.gen_batch_size (10) must be >= batch.train_batch_size (768)"),
        (["algorithm.spo.loss.loss_agg=sum"],
         "'algorithm.spo.loss.loss_agg' expects one of 'token-mean', 'seq-mean', got 'sum'"),
        (["algorithm.spo.clip_lower=1.5"], "clip_lower"),
        (["algorithm.spo.advantage_eps=0"], "advantage_eps must be > 0"),
        (["algorithm.grpo.eps=0"], "invalid 'algorithm.grpo': eps must be > 0"),
        (["rollout.engine.name=sglang"], "'rollout.engine.name' expects one of 'hf', 'vllm', got 'sglang'"),
        (["rollout.engine.gpu_memory_utilization=1.5"], "gpu_memory_utilization must be in (0, 1]"),
        (["rollout.engine.model=/m"], "unknown key 'rollout.engine.model'"),  # model.hf_dir is the model
        (["parallel.vpp=2"], "needs pp > 1"),
        (["eval.ks=[64]"], "within 1..n=16"),
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
    with pytest.raises(UserError, match=r"'algorithm.spo': offline_values: file .*values.json' does not exist"):
        load_train_config(str(config), [f"algorithm.spo.offline_values={tmp_path / 'values.json'}"])


def test_effective_config_round_trips(setup):
    config, tmp_path = setup
    cfg = load_train_config(str(config), ["algorithm.name=grpo", "optimizer.betas=[0.9, 0.95]"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_train_config(str(saved))
    assert again == cfg and to_dict(again)["rollout"]["n"] == 8
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_rollout_engine_is_the_engine_config_with_the_program_s_fields_filled_in(setup):
    config, tmp_path = setup
    cfg = load_train_config(str(config), ["seed=3", "rollout.engine.name=vllm", "rollout.engine.max_num_seqs=7",
                                          "rollout.engine.dtype=bfloat16", "rollout.engine.enable_sleep_mode=true"])
    engine = cfg.rollout.engine_config(cfg.model.hf_dir, seed=cfg.seed, load_weights=False)
    assert isinstance(engine, EngineConfig) and engine.model == cfg.model.hf_dir
    assert (engine.name, engine.max_num_seqs, engine.dtype, engine.enable_sleep_mode) == ("vllm", 7, "bfloat16", True)
    assert (engine.seed, engine.load_weights) == (3, False)
    # every engine knob is settable under rollout.engine; the model, seed and weight loading are not
    keys = set(to_dict(cfg)["rollout"]["engine"])
    assert keys == {f.name for f in dataclasses.fields(EngineConfig)} - {"model", "seed", "load_weights"}
    assert cfg.rollout.engine.model is None  # the section itself names no model
    assert RolloutConfig().engine_config(str(tmp_path / "model")).max_num_seqs == 256


def test_eval_config_resolves_training_defaults(setup):
    config, _ = setup
    cfg = load_train_config(str(config), ["rollout.max_response_tokens=100", "data.prompt_key=question",
                                          "eval.n=4", "eval.answer_key=solution"])
    resolved = cfg.eval_config()
    assert type(resolved).__name__ == "EvalConfig" and resolved.n == 4
    assert (resolved.max_response_tokens, resolved.prompt_key, resolved.answer_key) == (100, "question", "solution")


@pytest.mark.parametrize(
    "override, new_key",
    [
        ("spo.rho_mode=constant", "algorithm.spo.rho_mode"),
        ("spo.offline_values=x.json", "algorithm.spo.offline_values"),
        ("loss.kl_coef=0.1", "algorithm.spo.loss.kl_coef' (or 'algorithm.grpo.loss.kl_coef"),
        ("batch.gen_batch_size=8", "algorithm.spo.gen_batch_size"),
        ("algorithm.normalize_advantages=false", "algorithm.spo.normalize_advantages"),
        ("algorithm.spo_advantage_eps=1e-6", "algorithm.spo.advantage_eps"),
        ("algorithm.grpo_eps=1e-5", "algorithm.grpo.eps"),
        ("algorithm.grpo_norm_by_std=false", "algorithm.grpo.norm_by_std"),
        ("rollout.engine=vllm", "rollout.engine.name"),
        ("rollout.dtype=bfloat16", "rollout.engine.dtype"),
        ("rollout.max_model_len=512", "rollout.engine.max_model_len"),
        ("rollout.max_num_seqs=8", "rollout.engine.max_num_seqs"),
        ("rollout.tensor_parallel_size=2", "rollout.engine.tensor_parallel_size"),
        ("rollout.kv_cache_gib=2", "rollout.engine.kv_cache_gib"),
        ("rollout.gpu_memory_utilization=0.4", "rollout.engine.gpu_memory_utilization"),
        ("rollout.enable_sleep_mode=true", "rollout.engine.enable_sleep_mode"),
    ],
)
def test_a_moved_key_is_one_line_naming_its_new_key(setup, override, new_key):
    config, tmp_path = setup
    old_key = override.split("=")[0]
    with pytest.raises(UserError) as err:  # as an override
        load_train_config(str(config), [override])
    message = str(err.value)
    assert f"'{old_key}' moved to '{new_key}'" in message and "\n" not in message
    # and in a file: the nested YAML of the old key
    *sections, leaf = old_key.split(".")
    value = yaml.safe_load(override.split("=", 1)[1])
    nested = {leaf: value}
    for section in reversed(sections):
        nested = {section: nested}
    old_file = tmp_path / "old.yaml"
    old_file.write_text(config.read_text() + yaml.safe_dump(nested))
    with pytest.raises(UserError) as err:
        load_train_config(str(old_file))
    message = str(err.value)
    assert f"'{old_key}' moved to '{new_key}'" in message and "old.yaml" in message and "\n" not in message


def test_a_moved_section_names_its_first_key_and_new_keys_still_load(setup):
    config, tmp_path = setup
    old_file = tmp_path / "old.yaml"
    old_file.write_text(config.read_text() + "spo:\n  d_half: 0.08\n  eps: 0.1\n")
    with pytest.raises(UserError, match=r"key 'spo.d_half' moved to 'algorithm.spo.d_half'$"):
        load_train_config(str(old_file))
    # an unknown key under a section that is also an old key's name is an ordinary unknown key
    with pytest.raises(UserError, match=r"unknown key 'rollout.engine.nme'; valid keys under 'rollout.engine'"):
        load_train_config(str(config), ["rollout.engine.nme=vllm"])
    new_file = tmp_path / "new.yaml"
    new_file.write_text(config.read_text() + "algorithm:\n  spo:\n    d_half: 0.08\nrollout:\n  engine:\n    name: hf\n")
    assert load_train_config(str(new_file)).algorithm.spo.d_half == 0.08


def test_world_size_checks_name_the_sizes(setup):
    config, _ = setup
    cfg = load_train_config(str(config), ["parallel.tp=2", "batch.train_batch_size=8", "batch.mini_batch_size=4",
                                           "algorithm.spo.gen_batch_size=8"])
    assert cfg.check_world_size(4) == 2
    with pytest.raises(UserError, match=r"parallel.tp \(2\) x parallel.pp \(1\) = 2 does not divide the world size 3"):
        cfg.check_world_size(3)
    with pytest.raises(UserError, match=r"batch.mini_batch_size \(4 prompts x 1 responses = 4 sequences\).*size 8"):
        cfg.check_world_size(16)


def test_the_lr_schedule_spans_the_run_s_optimizer_steps(setup):
    """One optimizer step per mini-batch and epoch: 768 prompts in mini-batches of 96 over 2 epochs
    make 16 per training step, so a 10-step run decays over 160 (the schedule's unit)."""
    config, _ = setup
    cfg = load_train_config(str(config), ["total_steps=10", "batch.epochs=2"])
    assert cfg.run_steps(num_prompts=5, prompts_per_step=4) == 10 and cfg.optimizer_steps(10) == 160
    by_epochs = load_train_config(str(config), ["total_epochs=3", "batch.train_batch_size=4", "batch.mini_batch_size=2"])
    # an epoch is a pass over the prompts: SPO consumes its pool of gen_batch_size per step, GRPO its batch
    assert by_epochs.run_steps(num_prompts=10, prompts_per_step=4) == 3 * (10 // 4)
    assert by_epochs.run_steps(num_prompts=100, prompts_per_step=50) == 3 * 2 and by_epochs.optimizer_steps(6) == 12
