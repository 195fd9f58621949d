"""`megatron-spo sft` end to end on the embedded demo's data: the exported model learned the task.

The demo's random-init Qwen2 (0.47M parameters) is trained through the command line, as a user
runs it, on one-operation problems with clean labels, then the exported HF directory is loaded
by transformers and decoded greedily on 200 prompts (100 held out, 100 RL training prompts).
Before SFT the model emits noise (accuracy 0, no \\boxed{} answer). Measured at 60 steps
(seeds 0, 1, 2 of the task and model, 2026-11-22): loss 5.8 -> 0.2-0.3; every answer boxed;
accuracy 0.22, 0.10, 0.245 on the 200 prompts (held out alone swings 0.0-0.32 between seeds: its
one-operation space holds only a few distinct questions). The bounds below sit well inside those
numbers: 10x loss drop, >= 90% boxed, accuracy up by >= 0.05.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def _greedy_answers(model_dir, records) -> list[str]:
    from transformers import AutoModelForCausalLM

    from megatron_spo.demo.assets import chat_text
    from megatron_spo.demo.task import sft_prompt
    from megatron_spo.training.sft import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = tokenizer([chat_text(tokenizer, sft_prompt(r["prompt"])) for r in records],
                        return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(ids[encoded["input_ids"].shape[1]:], skip_special_tokens=True) for ids in out]


def test_sft_on_demo_data_learns_the_task(tmp_path):
    from megatron_spo.demo.assets import TinyModelConfig, build_demo_assets
    from megatron_spo.demo.task import DemoTaskConfig, boxed_answer, is_correct

    assets = build_demo_assets(
        tmp_path / "assets", DemoTaskConfig(num_train=100, num_val=100, num_sft=400, max_ops=1, sft_step_noise=0.0),
        TinyModelConfig(),
    )
    records = [json.loads(line) for path in (assets.val_jsonl, assets.train_jsonl) for line in open(path)]
    out = tmp_path / "run" / "sft_model"
    steps = 60
    command = [
        sys.executable, "-m", "megatron_spo", "sft", "--model", str(assets.model_dir), "--data", str(assets.sft_jsonl),
        "--out", str(out), f"max_steps={steps}", "optimizer.lr=3e-3", "optimizer.warmup_steps=5",
        "optimizer.schedule=constant", "global_batch_size=32", "micro_batch_size=32", "optimizer.betas=[0.9, 0.98]",
        "log_every=20",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"sft step {steps}/{steps}" in run.stdout

    metrics = [json.loads(line) for line in open(out / "sft_metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[0]["loss"] > 4.0  # ~ln(vocab 306) = 5.7 at random init
    assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"]
    assert metrics[0]["lr"] < metrics[5]["lr"] == metrics[-1]["lr"] == pytest.approx(3e-3)  # warm-up, then constant
    assert (out / "sft_config.yaml").is_file() and not (tmp_path / "run" / "sft_metrics.jsonl").exists()

    before = _greedy_answers(str(assets.model_dir), records)
    after = _greedy_answers(str(out), records)
    accuracy_before = sum(is_correct(a, r["answer"]) for a, r in zip(before, records)) / len(records)
    accuracy_after = sum(is_correct(a, r["answer"]) for a, r in zip(after, records)) / len(records)
    boxed_after = sum(boxed_answer(a) is not None for a in after) / len(records)
    print(f"greedy accuracy before {accuracy_before:.3f}, after {accuracy_after:.3f}; boxed after {boxed_after:.2f}")
    assert boxed_after >= 0.9  # it learned the answer format
    assert accuracy_after >= accuracy_before + 0.05  # and some of the arithmetic
