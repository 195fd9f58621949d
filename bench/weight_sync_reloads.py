"""One engine-side reload per weight sync against one per bucket, on vLLM (CPU build here).

vLLM's `reload_weights` is a whole-model pass (it re-runs weight processing / kernel repacking for
the model), so a sync that calls it once per bucket pays that pass once per bucket: about 32
times per sync for an 8B model at the default 512 MB buckets. This bench syncs the same weights
into the same engine both ways, alternating, and prints the ratio (baseline = one reload per
bucket, the previous behaviour, measured in the same run). Run in the vLLM venv:

    OMP_NUM_THREADS=2 .venv-vllm/bin/python bench/weight_sync_reloads.py [--buckets 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buckets", type=int, default=32, help="buckets per sync (8B at 512 MB: ~32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()

    import torch
    import transformers
    from tiny_models import make_tiny_model

    from megatron_spo.rollout.engine import EngineConfig, make_engine
    from megatron_spo.rollout.weight_sync import WeightSyncConfig, iter_buckets, sync_weights

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "m", "qwen2", hidden_size=256, intermediate_size=512,
                                    num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2)
        weights = list(transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())
        total = sum(t.numel() * t.element_size() for _, t in weights)
        config = WeightSyncConfig(bucket_mb=total / args.buckets / 1e6)
        engine = make_engine(EngineConfig(model=str(model_dir), name="vllm", max_model_len=128))
        n_buckets = sum(1 for _ in iter_buckets(iter(weights), int(config.bucket_mb * 1e6)))

        def per_bucket() -> float:  # the previous behaviour: one reload_weights per bucket
            start = time.perf_counter()
            for bucket in iter_buckets(iter(weights), int(config.bucket_mb * 1e6)):
                engine.update_weights(bucket)
            return time.perf_counter() - start

        def one_reload() -> float:
            return sync_weights(engine, iter(weights), config).seconds

        per_bucket(), one_reload()  # warm-up
        base, new = [], []
        for _ in range(args.rounds):
            base.append(per_bucket())
            new.append(one_reload())
        engine.shutdown()
    b, n = statistics.median(base), statistics.median(new)
    print(f"model {total / 1e6:.1f} MB, {args.layers} layers, {n_buckets} buckets per sync, {args.rounds} rounds")
    print(f"one reload per bucket (baseline): {b * 1e3:.1f} ms per sync (median)")
    print(f"one reload per sync:              {n * 1e3:.1f} ms per sync (median)")
    print(f"speed-up: {b / n:.2f}x")


if __name__ == "__main__":
    main()
