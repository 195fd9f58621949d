"""SFT data path (tokenisation, masks, order, sharding) and the CLI's bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_spo.config import from_dict
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.training import sft
from megatron_spo.training.sft import SFTExample
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sft_model") / "model")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_collate_masks_exactly_the_response_targets():
    examples = [
        SFTExample(input_ids=[5, 6, 7, 8, 2], prompt_length=3),  # response 8, eos 2
        SFTExample(input_ids=[9, 10, 2], prompt_length=1),  # response 10, eos 2
    ]
    batch = sft.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]]
    # position t predicts input_ids[t + 1]; only targets that are response tokens count
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]
    masked_targets = batch["targets"][batch["loss_mask"].bool()].tolist()
    assert masked_targets == [8, 2, 10, 2]
    wide = sft.collate(examples, pad_id=0, pad_to=7)
    assert wide["input_ids"].shape == (2, 7) and wide["loss_mask"].sum() == 4


def test_microbatches_pad_to_own_width_or_the_step_width():
    examples = [SFTExample(input_ids=[1] * n, prompt_length=1) for n in (3, 6, 4, 2, 5)]
    own = sft.make_microbatches(examples, 2, pad_id=0, same_width=False)
    assert [mb["input_ids"].shape for mb in own] == [(2, 6), (2, 4), (1, 5)]
    same = sft.make_microbatches(examples, 2, pad_id=0, same_width=True)
    assert [mb["input_ids"].shape for mb in same] == [(2, 6), (2, 6), (1, 6)]
    assert sum(mb["loss_mask"].sum() for mb in own) == sum(n - 1 for n in (3, 6, 4, 2, 5))


def test_order_is_a_seeded_permutation_per_epoch_and_shards_partition_each_batch():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in sft.step_indices(n, batch, step, seed=3)]  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh shuffle per epoch
    assert stream[:10] != list(range(10))
    assert sft.step_indices(n, batch, 2, seed=3) == stream[8:12]  # straddles the epoch boundary
    assert sft.step_indices(n, batch, 0, seed=4) != stream[:4]
    global_batch = sft.step_indices(n, batch, 1, seed=3)
    shards = [sft.dp_shard(global_batch, r, 2) for r in range(2)]
    assert shards[0] + shards[1] == global_batch
    with pytest.raises(UserError, match="multiple of the data-parallel size 3"):
        sft.dp_shard(global_batch, 0, 3)


def test_overlong_examples_are_skipped_truncated_or_refused():
    prompt, response = [1, 2, 3], [4, 5, 6]
    kept, truncated = sft.encode_example(prompt, response, 9, max_length=7, overlong="skip")
    assert kept.input_ids == [1, 2, 3, 4, 5, 6, 9] and not truncated
    assert sft.encode_example(prompt, response, 9, max_length=6, overlong="skip") == (None, False)
    cut, truncated = sft.encode_example(prompt, response, 9, max_length=5, overlong="truncate")
    assert cut.input_ids == [1, 2, 3, 4, 5] and cut.prompt_length == 3 and truncated
    assert sft.encode_example(prompt, response, 9, max_length=3, overlong="truncate") == (None, False)
    with pytest.raises(UserError, match="record 7 has 7 tokens, more than max_length=6"):
        sft.encode_example(prompt, response, 9, max_length=6, overlong="error", where="f.jsonl: record 7")


def test_examples_are_the_rl_prompt_tokens_then_response_and_eos(tiny_model_dir, tmp_path):
    from megatron_spo.demo.assets import encode_sft_example
    from megatron_spo.demo.task import sft_prompt

    records = [{"prompt": "Compute 7 + 5.", "response": "7 + 5 = 12. \\boxed{12}"},
               {"prompt": "Compute 3 - 1.", "response": "3 - 1 = 2. \\boxed{2}"},
               {"prompt": "x" * 300, "response": "too long"}]
    config = sft.SFTConfig(model=str(tiny_model_dir), data_files=[_write_jsonl(tmp_path / "d.jsonl", records)],
                           out=str(tmp_path / "out"), prompt=PromptConfig(max_prompt_tokens=256))
    tokenizer = sft.load_tokenizer(tiny_model_dir)
    dataset = sft.build_dataset(config, tokenizer)
    assert (dataset.num_records, dataset.skipped, len(dataset.examples)) == (3, 1, 2)
    for example, record in zip(dataset.examples, records):
        # the demo's own encoder: chat-formatted prompt with the answer suffix, response, <|im_end|>
        ids, loss_mask = encode_sft_example(tokenizer, sft_prompt(record["prompt"]), record["response"])
        assert example.input_ids == ids
        assert example.prompt_length == loss_mask.index(1)
        assert example.input_ids[-1] == tokenizer.eos_token_id


def _cli_error(capsys, argv) -> str:
    from megatron_spo.cli import main

    assert main(["sft", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_naming_the_problem(tiny_model_dir, tmp_path, capsys):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    missing = str(tmp_path / "missing.jsonl")
    assert missing in _cli_error(capsys, base + ["--data", missing])
    no_key = _write_jsonl(tmp_path / "no_key.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "answer": "d"}])
    err = _cli_error(capsys, base + ["--data", no_key])
    assert "no_key.jsonl: record 1 has no key 'response'" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty.jsonl: no records (the dataset is empty)" in _cli_error(capsys, base + ["--data", str(empty)])
    assert "unknown key 'learning_rate'" in _cli_error(capsys, base + ["--data", good, "learning_rate=1e-3"])
    assert "'lr' moved to 'optimizer.lr'" in _cli_error(capsys, base + ["--data", good, "lr=1e-3"])
    old_file = tmp_path / "old.yaml"
    old_file.write_text("schedule: constant\n")
    assert "'schedule' moved to 'optimizer.schedule'" in _cli_error(capsys, base + ["--data", good, "--config",
                                                                                    str(old_file)])
    assert "is not a Hugging Face model directory" in _cli_error(
        capsys, ["--model", str(tmp_path), "--data", good, "--out", str(tmp_path / "out")])
    (tmp_path / "taken").mkdir()
    assert "already exists" in _cli_error(capsys, base[:2] + ["--data", good, "--out", str(tmp_path / "taken")])
    assert "global_batch_size must be >= 1" in _cli_error(capsys, base + ["--data", good, "global_batch_size=0"])
    assert not (tmp_path / "out").exists()
    assert not torch.distributed.is_initialized()  # refused before any process group


def test_step_budget_from_epochs_or_max_steps_and_the_schedule(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    common = dict(model=str(tiny_model_dir), data_files=[data], out=str(tmp_path / "out"), global_batch_size=4)
    assert sft.total_steps(sft.SFTConfig(**common, epochs=2.5), num_examples=10) == 7  # ceil(25 / 4)
    assert sft.total_steps(sft.SFTConfig(**common, epochs=2.5, max_steps=3), num_examples=10) == 3
    from megatron_spo.training.actor import lr_schedule

    # SFT's optimizer defaults (cosine, no weight decay) survive a partial `optimizer:` section
    config = from_dict(sft.SFTConfig, {**common, "optimizer": {"warmup_steps": 2, "lr": 1e-3, "min_lr_ratio": 0.1}})
    assert (config.optimizer.schedule, config.optimizer.weight_decay) == ("cosine", 0.0)
    assert lr_schedule(config.optimizer, total_steps=10) == {
        "init_lr": 0.0, "max_lr": 1e-3, "min_lr": pytest.approx(1e-4), "lr_warmup_steps": 2, "lr_decay_steps": 10,
        "lr_decay_style": "cosine"}
    constant = lr_schedule(sft.SFTOptimizerConfig(schedule="constant"), total_steps=10)
    assert (constant["lr_decay_style"], constant["init_lr"], constant["max_lr"]) == ("constant", 1e-5, 1e-5)
    assert sft.SFTConfig(**common).metrics_path == tmp_path / "out" / "sft_metrics.jsonl"


def test_two_runs_in_one_parent_keep_their_metrics_and_config_inside_their_own_out(tiny_model_dir, tmp_path):
    from megatron_spo.cli import main

    data = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "response": "2"}, {"prompt": "2+2", "response": "4"}])
    parent = tmp_path / "runs"
    for name, lr in (("a", "1e-3"), ("b", "2e-3")):
        argv = ["sft", "--model", str(tiny_model_dir), "--data", data, "--out", str(parent / name), "max_steps=1",
                "global_batch_size=2", "micro_batch_size=2", f"optimizer.lr={lr}"]
        assert main(argv) == 0
    assert sorted(p.name for p in parent.iterdir()) == ["a", "b"]  # nothing beside the outputs
    for name, lr in (("a", 1e-3), ("b", 2e-3)):
        out = parent / name
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        assert [json.loads(line)["step"] for line in open(out / "sft_metrics.jsonl")] == [1]
        assert f"lr: {lr}" in (out / "sft_config.yaml").read_text()
    # a model started from an SFT output does not inherit that run's records
    assert main(["sft", "--model", str(parent / "a"), "--data", data, "--out", str(parent / "c"), "max_steps=1",
                 "global_batch_size=2", "micro_batch_size=2", "optimizer.lr=3e-3"]) == 0
    assert "lr: 0.003" in (parent / "c" / "sft_config.yaml").read_text()
