"""Is the demo task learnable on this CPU? A plain-PyTorch SFT probe with HF `generate`.

Builds the demo assets (synthetic arithmetic data, BPE tokenizer, random-init tiny Qwen2), trains
the model on the SFT pairs with a minimal loop (AdamW, loss on response tokens only) for a number
of steps, and measures held-out accuracy per difficulty with greedy decoding and with sampling at
temperature 1 (what RL samples) at a few points along the way. Steps, not seconds, are the
budget, so results do not depend on how busy the machine is; the training tokens/s it prints
converts steps into time. Nothing here is the product's SFT; it answers one
question for the demo's design: does a ~0.5M-parameter model reach a non-trivial, non-perfect
accuracy within about a minute on 2 cores?

    python tools/demo_task_probe.py --steps 600 --eval-at 150,300,600 --out /tmp/probe
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
from pathlib import Path

import torch

from megatron_spo.demo.assets import TinyModelConfig, build_demo_assets, chat_text, encode_sft_example
from megatron_spo.demo.task import DemoTaskConfig, is_correct, sft_prompt


def encode_sft(tokenizer, records):
    """(input_ids, labels) per record; labels are -100 on the prompt (loss on the response only)."""
    examples = []
    for r in records:
        ids, loss_mask = encode_sft_example(tokenizer, sft_prompt(r["prompt"]), r["response"])
        examples.append((ids, [t if m else -100 for t, m in zip(ids, loss_mask)]))
    return examples


def collate(batch, pad_id):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return input_ids, labels, attention


def sft(model, examples, *, steps, seconds, batch_size, lr, warmup, seed, pad_id, on_step=None, log_every=50):
    """AdamW on response tokens for `steps` steps (or until `seconds` of training time pass)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    step, tokens, train_seconds = 0, 0, 0.0
    order: list[int] = []
    history = []
    while step < steps and train_seconds < seconds:
        model.train()
        step_start = time.time()
        if len(order) < batch_size:
            order = list(range(len(examples)))
            rng.shuffle(order)
        batch = [examples[order.pop()] for _ in range(batch_size)]
        input_ids, labels, attention = collate(batch, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += int(attention.sum())
        train_seconds += time.time() - step_start
        if step % log_every == 0:
            history.append({"step": step, "train_seconds": round(train_seconds, 1), "loss": round(loss.item(), 4)})
            print(f"  step {step:5d}  {train_seconds:6.1f}s  loss {loss.item():.4f}  "
                  f"{tokens / train_seconds:,.0f} tok/s", flush=True)
        if on_step is not None:
            on_step(step, train_seconds)
    return {"steps": step, "train_seconds": round(train_seconds, 1), "train_tokens": tokens,
            "train_tokens_per_s": round(tokens / max(train_seconds, 1e-9)), "history": history}


@torch.no_grad()
def evaluate(model, tokenizer, records, *, sample, seed, batch_size=100, max_new_tokens=48):
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    per_difficulty = collections.defaultdict(list)
    generated = 0
    start = time.time()
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [chat_text(tokenizer, sft_prompt(r["prompt"])) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, **kwargs,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        generated += int((new != tokenizer.pad_token_id).sum())
        for r, ids in zip(chunk, new):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            per_difficulty[r["difficulty"]].append(is_correct(text, r["answer"]))
    all_results = [x for v in per_difficulty.values() for x in v]
    return {
        "accuracy": sum(all_results) / len(all_results),
        "by_difficulty": {d: round(sum(v) / len(v), 3) for d, v in sorted(per_difficulty.items())},
        "generated_tokens_per_s": round(generated / (time.time() - start)),
        "example": text,
    }


def thread_check(model, examples, pad_id, *, batch_size, rounds=5, steps_per_round=3):
    """Wall seconds per SFT step with 1 and with 2 torch threads, interleaved rounds (medians).

    On a busy 2-core machine a second OpenMP thread mostly waits for a core; this prints the
    ratio so the choice of OMP_NUM_THREADS rests on a measurement taken under the current load.
    """
    import statistics

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids, labels, attention = collate(examples[:batch_size], pad_id)
    timings = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.time()
            for _ in range(steps_per_round):
                loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            timings[threads].append((time.time() - start) / steps_per_round)
    one, two = statistics.median(timings[1]), statistics.median(timings[2])
    print(f"seconds per SFT step (batch {batch_size}): 1 thread {one:.3f}, 2 threads {two:.3f}; "
          f"2 threads take {two / one:.2f}x the time of 1")
    return {"one_thread_s": round(one, 4), "two_threads_s": round(two, 4), "ratio_two_over_one": round(two / one, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/demo_task_probe", help="where assets and results go")
    parser.add_argument("--steps", type=int, default=600, help="SFT optimizer steps")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="cap on SFT training time")
    parser.add_argument("--eval-at", default="150,300,600", help="steps after which to evaluate")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts per evaluation")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=TinyModelConfig.hidden_size)
    parser.add_argument("--layers", type=int, default=TinyModelConfig.num_layers)
    parser.add_argument("--noise", type=float, default=DemoTaskConfig.sft_step_noise)
    parser.add_argument("--max-value", type=int, default=DemoTaskConfig.max_value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thread-check", action="store_true",
                        help="only time SFT steps with 1 vs 2 threads (no training run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = DemoTaskConfig(seed=args.seed, sft_step_noise=args.noise, max_value=args.max_value)
    heads = max(1, args.hidden // 32)
    model_cfg = TinyModelConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), intermediate_size=3 * args.hidden, seed=args.seed,
    )
    t0 = time.time()
    assets = build_demo_assets(args.out, task, model_cfg)
    build_seconds = time.time() - t0
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    sft_records = [json.loads(line) for line in open(assets.sft_jsonl)]
    val_records = [json.loads(line) for line in open(assets.val_jsonl)]
    label_accuracy = sum(is_correct(r["response"], r["answer"]) for r in sft_records) / len(sft_records)
    print(f"assets in {build_seconds:.1f}s: vocab {len(tokenizer)}, {n_params:,} parameters, "
          f"SFT labels correct {label_accuracy:.3f}")
    examples = encode_sft(tokenizer, sft_records)
    if args.thread_check:
        result = thread_check(model, examples, tokenizer.pad_token_id, batch_size=args.batch_size)
        Path(args.out, "thread_check.json").write_text(json.dumps(result, indent=1))
        return 0
    val_subset = val_records[: args.eval_prompts]
    eval_at = {int(x) for x in args.eval_at.split(",") if x}
    evaluations = []

    def on_step(step, train_seconds):
        if step in eval_at:
            greedy = evaluate(model, tokenizer, val_subset, sample=False, seed=args.seed)
            sampled = evaluate(model, tokenizer, val_subset, sample=True, seed=args.seed)
            evaluations.append({"step": step, "train_seconds": round(train_seconds, 1),
                                "greedy": greedy, "sampled_t1": sampled})
            print(f"  eval @ step {step}: greedy {greedy['accuracy']:.3f} {greedy['by_difficulty']}  "
                  f"sampled {sampled['accuracy']:.3f} {sampled['by_difficulty']}", flush=True)

    torch.manual_seed(args.seed)
    train = sft(model, examples, steps=args.steps, seconds=args.seconds, batch_size=args.batch_size,
                lr=args.lr, warmup=args.warmup, seed=args.seed, pad_id=tokenizer.pad_token_id, on_step=on_step)
    if not evaluations or evaluations[-1]["step"] != train["steps"]:  # stopped by --seconds
        eval_at.add(train["steps"])
        on_step(train["steps"], train["train_seconds"])
    result = {
        "parameters": n_params, "vocab": len(tokenizer), "sft_label_accuracy": round(label_accuracy, 3),
        "sft": {k: v for k, v in train.items() if k != "history"}, "loss_history": train["history"],
        "evaluations": evaluations, "args": vars(args),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss_history", "evaluations")}, indent=1))
    Path(args.out, "probe_result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
