"""Cost of one SFT step on the Megatron actor against a plain PyTorch step on the same model.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft_step.py [--batch 32] [--rounds 5] [--steps-per-round 4]

Builds the embedded demo's assets (arithmetic SFT pairs, BPE tokenizer, random-init 0.47M-parameter
Qwen2), tokenises the pairs as `megatron-spo sft` does, then times, in interleaved rounds on the
same global batches:

- baseline: Hugging Face `Qwen2ForCausalLM` + `torch.optim.AdamW`, loss on response tokens,
  grad-norm clip 1.0 (the loop of tools/demo_task_probe.py);
- `run_sft`'s step: `Actor.train_step(make_microbatches(...), lm_loss)` (Megatron GPTModel, DDP
  grad buffers, Megatron optimizer with clipping, LR scheduler), with one micro-batch of the whole
  batch and with micro-batches of 8.

Prints median seconds per step and the ratio to the baseline. One process, one thread (on a busy
2-core machine a second thread is slower, bench/RESULTS.md "Demo task learnability").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="examples per step [32]")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds [5]")
    parser.add_argument("--steps-per-round", type=int, default=4, help="steps per variant per round [4]")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM

    from megatron_spo import platform
    from megatron_spo.models.checkpoint import load_pretrained
    from megatron_spo.training.actor import Actor, lm_loss
    from megatron_spo.demo.assets import build_demo_assets
    from megatron_spo.demo.task import DemoTaskConfig
    from megatron_spo.training.sft import (
        SFTConfig, SFTOptimizerConfig, build_dataset, load_tokenizer, make_microbatches, step_indices,
    )

    tmp = tempfile.mkdtemp(prefix="bench_sft_")
    assets = build_demo_assets(tmp, DemoTaskConfig(num_train=50, num_val=50, num_sft=1000))
    config = SFTConfig(model=str(assets.model_dir), data_files=[str(assets.sft_jsonl)], out=f"{tmp}/out",
                       optimizer=SFTOptimizerConfig(lr=1e-3, schedule="constant"), global_batch_size=args.batch,
                       micro_batch_size=args.batch)
    tokenizer = load_tokenizer(assets.model_dir)
    dataset = build_dataset(config, tokenizer)
    pad_id = tokenizer.pad_token_id
    total = args.rounds * args.steps_per_round
    batches = [[dataset.examples[i] for i in step_indices(len(dataset.examples), args.batch, s, 0)]
               for s in range(total)]
    tokens = statistics.mean(sum(len(e.input_ids) for e in b) for b in batches)

    parallel = platform.init_distributed(1, 1)
    spec, chunks, bridge = load_pretrained(assets.model_dir, parallel)
    actor = Actor(spec, chunks, bridge, parallel, config.optimizer, total_steps=total)
    hf_model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    hf_model.train()
    hf_optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3, weight_decay=0.0)

    def hf_step(batch):
        mb = make_microbatches(batch, len(batch), pad_id, same_width=False)[0]
        # labels are the inputs with -100 off the response: HF shifts them itself
        labels = torch.where(torch.roll(mb["loss_mask"], 1, 1).bool(), mb["input_ids"], -100)
        attention = torch.zeros_like(mb["input_ids"])
        for row, example in enumerate(batch):
            attention[row, : len(example.input_ids)] = 1
        loss = hf_model(input_ids=mb["input_ids"], attention_mask=attention, labels=labels).loss
        hf_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        hf_optimizer.step()

    variants = {
        "hf + torch AdamW (baseline)": hf_step,
        "actor, 1 micro-batch": lambda b: actor.train_step(make_microbatches(b, len(b), pad_id, same_width=False), lm_loss),
        "actor, micro-batches of 8": lambda b: actor.train_step(make_microbatches(b, 8, pad_id, same_width=False), lm_loss),
    }
    for fn in variants.values():  # warm-up (first-call allocations, lazy imports)
        fn(batches[0])
    timings = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, fn in variants.items():
            chosen = batches[round_ * args.steps_per_round : (round_ + 1) * args.steps_per_round]
            start = time.perf_counter()
            for batch in chosen:
                fn(batch)
            timings[name].append((time.perf_counter() - start) / len(chosen))
    baseline = statistics.median(timings["hf + torch AdamW (baseline)"])
    print(f"batch {args.batch} x ~{tokens / args.batch:.0f} tokens, {sum(p.numel() for p in hf_model.parameters()):,} "
          f"parameters, median of {args.rounds} rounds x {args.steps_per_round} steps, 1 thread")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"  {name:<30} {median * 1000:7.1f} ms/step  {tokens / median:8,.0f} tok/s  "
              f"{median / baseline:5.2f}x baseline")
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
