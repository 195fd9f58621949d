"""Colocation on one GPU: the colocated step against the resident step, same model, same run.

Colocated: the engine sleeps while the actor trains and the actor's weights, gradients and Adam
state sit in pinned host memory while the engine generates (`rollout.engine.enable_sleep_mode`,
`rollout.offload_actor`). Resident: nothing moves. The model is a randomly initialised Qwen3 with
Qwen3-0.6B's layer shape (hidden 1024, 16 query / 8 KV heads of 128, MLP 3072) and a small
vocabulary; the engine is the hf engine on the GPU. Prints, per mode, the median step seconds,
the seconds spent moving state, the GPU bytes the trainer held while the engine generated, and
the colocated / resident step-time ratio. Needs CUDA:

    python bench/colocation_gpu.py [--layers 16] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _run(rank, world_size, overrides, steps):
    import torch
    from helpers import probe_at_generate

    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": steps}))
    at_generate = probe_at_generate(trainer.engine, torch.cuda.memory_allocated)
    torch.cuda.reset_peak_memory_stats()
    history = [trainer.train_step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated()
    state = sum(s.nbytes() for s in {p.untyped_storage()._cdata: p.untyped_storage()
                                     for c in trainer.actor.chunks for p in c.parameters()}.values())
    trainer.close()
    return {"history": history, "at_generate": at_generate, "peak": peak, "param_storage_bytes": state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per mode (the first is warm-up)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/colocation_gpu.py needs a CUDA GPU")
    from helpers import distributed_run
    from tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model", "qwen3", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=3072,
                                num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                                head_dim=128, max_position_embeddings=1024)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Compute {i} + {i % 7}.", "answer": str(i + i % 7)}) + "\n"
                                for i in range(256)))
        base = {
            "model": {"hf_dir": str(model), "dtype": "bfloat16"},
            "data": {"train_files": [str(data)]},
            "rollout": {"max_response_tokens": 128, "engine": {"dtype": "bfloat16"}, "reward": {"pool": "inline"}},
            "batch": {"train_batch_size": 32, "mini_batch_size": 32, "micro_batch_size": 8,
                      "max_tokens_per_micro_batch": 4096},
            "optimizer": {"lr": 1e-6},
            "checkpoint": {"every_steps": 0},
            "eval": {"every_steps": 0},
            "logging": {"tensorboard": False, "progress_bar": False},
        }
        results = {}
        for mode, rollout in (("resident", {}), ("colocated", {"offload_actor": True})):
            engine = {**base["rollout"]["engine"], "enable_sleep_mode": mode == "colocated"}
            overrides = {**base, "run_dir": str(tmp / mode), "rollout": {**base["rollout"], **rollout, "engine": engine}}
            (results[mode],) = distributed_run(1, _run, overrides, args.steps, workdir=tmp, timeout_s=900)

    gib = 2**30
    print(f"{torch.cuda.get_device_name()}, Qwen3-shaped model, {args.layers} layers, "
          f"{results['resident']['param_storage_bytes'] / gib:.2f} GiB of bf16 weights")
    print(f"{'mode':<10} {'step s (median)':>16} {'moving state s':>15} {'GPU GiB at generate':>20} {'peak GiB':>9}")
    step = {}
    for mode, r in results.items():
        steady = r["history"][1:]
        step[mode] = statistics.median(h["perf/step_s"] for h in steady)
        moving = statistics.median(h["perf/colocation_s"] for h in steady)
        print(f"{mode:<10} {step[mode]:>16.3f} {moving:>15.3f} {max(r['at_generate']) / gib:>20.2f} {r['peak'] / gib:>9.2f}")
    print(f"colocated / resident step time: {step['colocated'] / step['resident']:.2f}x")


if __name__ == "__main__":
    main()
