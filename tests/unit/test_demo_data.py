"""The demo's synthetic task, tokenizer and tiny Qwen2 model: correctness, determinism,
held-out separation, HF loadability, and that a few SFT steps actually learn."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re

import pytest
import torch

from megatron_spo.demo.assets import TinyModelConfig, build_demo_assets, chat_text, encode_sft_example
from megatron_spo.demo.task import (
    DemoTaskConfig,
    boxed_answer,
    generate_splits,
    is_correct,
    random_problem,
    sft_prompt,
    worked_response,
)

SMALL = DemoTaskConfig(num_train=300, num_val=60, num_sft=400)
# the smallest model vLLM's CPU attention would accept (head_dim 32), so the tests stay cheap
MICRO = TinyModelConfig(
    hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128
)
STEP_RE = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


def test_clean_worked_responses_are_right_and_stay_in_range():
    cfg = DemoTaskConfig(max_value=12)
    rng = random.Random(0)
    for _ in range(300):
        problem = random_problem(rng, cfg)
        response = worked_response(problem)
        assert is_correct(response, str(problem.answer))
        steps = STEP_RE.findall(response)
        assert len(steps) == problem.difficulty
        for a, op, b, result in steps:
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert 0 <= int(result) <= cfg.max_value and 1 <= int(b) <= cfg.max_operand


def test_splits_are_deterministic_spread_and_held_out():
    splits = generate_splits(SMALL)
    assert splits == generate_splits(SMALL)
    assert splits != generate_splits(dataclasses.replace(SMALL, seed=1))
    assert {len(v) for v in splits.values()} == {300, 60, 400}
    assert {r["difficulty"] for r in splits["train"]} == {1, 2, 3, 4}
    val_prompts = {r["prompt"] for r in splits["val"]}
    assert not val_prompts & {r["prompt"] for r in splits["train"] + splits["sft"]}
    record = splits["train"][0]
    assert set(record) == {"prompt", "answer", "difficulty"} and record["prompt"].startswith("Compute ")
    assert set(splits["sft"][0]) == {"prompt", "response", "answer", "difficulty"}


def test_sft_noise_makes_the_imitated_solver_mediocre():
    splits = generate_splits(dataclasses.replace(SMALL, num_sft=3000))
    by_difficulty: dict[int, list[bool]] = {}
    for r in splits["sft"]:
        by_difficulty.setdefault(r["difficulty"], []).append(is_correct(r["response"], r["answer"]))
    rates = {d: sum(v) / len(v) for d, v in by_difficulty.items()}
    # a slip per step with probability 0.15: about 0.85 ** difficulty right
    for d, rate in rates.items():
        assert rate == pytest.approx(0.85**d, abs=0.06), rates
    clean = generate_splits(dataclasses.replace(SMALL, sft_step_noise=0.0))
    assert all(is_correct(r["response"], r["answer"]) for r in clean["sft"])


def test_boxed_answer_takes_the_last_box():
    assert boxed_answer("2 + 2 = 4. \\boxed{4} no, \\boxed{ 5 }") == "5"
    assert boxed_answer("no box") is None
    assert not is_correct("\\boxed{4}", "5") and is_correct("x \\boxed{5}", " 5")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_ops=3, max_ops=2), "min_ops"),
        (dict(operators=("*",)), "operators"),
        (dict(sft_step_noise=1.0), "sft_step_noise"),
        (dict(val_share=0.0), "val_share"),
    ],
)
def test_task_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoTaskConfig(**kwargs)


def test_model_config_keeps_head_dim_for_vllm():
    with pytest.raises(ValueError, match="head_dim = 16"):
        TinyModelConfig(hidden_size=64, num_attention_heads=4)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), SMALL, MICRO)


def test_assets_are_written_as_jsonl_and_parquet(assets):
    import datasets

    for name in ("train", "val", "sft"):
        jsonl = [json.loads(line) for line in (assets.root / "data" / f"{name}.jsonl").read_text().splitlines()]
        parquet = datasets.Dataset.from_parquet(str(assets.root / "data" / f"{name}.parquet")).to_list()
        assert jsonl == parquet and len(jsonl) > 0
    leftovers = [p.name for p in (assets.root / "data").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tokenizer_and_model_load_with_auto_classes(assets):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 100 < len(tok) < 1000
    record = json.loads(assets.sft_jsonl.read_text().splitlines()[0])
    text = chat_text(tok, sft_prompt(record["prompt"]), record["response"])
    assert text.startswith("<|im_start|>user\nCompute ") and text.endswith("<|im_end|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # transformers loads this as a Qwen2 tokenizer with Qwen2's own pre-tokenizer; the trained
    # merges must still apply, i.e. tokenize exactly as the raw trained tokenizer does
    raw = Tokenizer.from_file(str(assets.model_dir / "tokenizer.json"))
    assert raw.encode(text).ids == ids
    assert len(ids) < 90  # short prompts and answers keep CPU rollouts cheap

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    config = model.config
    assert config.model_type == "qwen2" and config.vocab_size == len(tok)
    assert config.hidden_size // config.num_attention_heads >= 32
    assert config.eos_token_id == tok.eos_token_id


def test_assets_are_byte_identical_for_the_same_seed(assets, tmp_path):
    again = build_demo_assets(tmp_path, SMALL, MICRO)
    for rel in ("data/train.jsonl", "data/sft.jsonl", "model/tokenizer.json", "model/model.safetensors"):
        assert _digest(assets.root / rel) == _digest(again.root / rel), rel


STEPS, LOSS_AFTER = 20, 2.5


def test_a_few_sft_steps_learn_the_format(assets):
    """Cheap learnability check (the full probe is tools/demo_task_probe.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation
    try:
        losses = _sft_losses(assets, AutoModelForCausalLM, AutoTokenizer)
    finally:
        torch.set_num_threads(threads)
    # from ~ln(vocab) = 5.7 nats to the structure of the worked answers
    assert losses[0] > 5.0 and losses[-1] < LOSS_AFTER, losses


def _sft_losses(assets, AutoModelForCausalLM, AutoTokenizer):
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    records = [json.loads(line) for line in assets.sft_jsonl.read_text().splitlines()][:16]
    examples = [encode_sft_example(tok, sft_prompt(r["prompt"]), r["response"]) for r in records]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tok.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    attention = (labels != -100) | (torch.arange(width) < torch.tensor([len(i) for i, _ in examples])[:, None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, attention_mask=attention.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
