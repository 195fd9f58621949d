"""SFT at DP=2 is the same computation as at DP=1: same loss curve, same exported weights.

One spawn of two processes runs the data-parallel job (TP=1, PP=1, so DP=2) and, as the DP=1
references, the same job at PP=2 and at TP=2 (one model replica over both processes; the
actor's tests show those layouts equal the unsplit model). The data has prompts and responses of
different lengths (so padding and micro-batch widths differ between ranks) and 3 steps of 8
cross the end of the 12-example epoch.
"""

from __future__ import annotations

import json

import pytest

from tiny_models import make_tiny_model

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (tp, pp): DP=2, then two DP=1 references


def _sft_layouts(rank, world_size, model_dir, data_file, out_root):
    from megatron_spo import platform
    from megatron_spo.training.sft import SFTConfig, SFTOptimizerConfig, run_sft

    results = {}
    for tp, pp in LAYOUTS:
        config = SFTConfig(
            model=model_dir, data_files=[data_file], out=f"{out_root}/tp{tp}pp{pp}/model", tp=tp, pp=pp,
            max_steps=3, global_batch_size=8, micro_batch_size=2, seed=5,
            # Adam divides by sqrt(v) + eps: a tiny eps turns fp32 summation-order noise in
            # near-zero gradients into visible updates (see test_actor_dist.py)
            optimizer=SFTOptimizerConfig(lr=1e-3, schedule="constant", eps=1e-4),
        )
        summary = run_sft(config, platform.init_distributed(tp, pp))
        results[(tp, pp)] = [{k: r[k] for k in ("loss", "grad_norm", "response_tokens")} for r in summary["history"]]
    return results


def test_sft_at_dp2_matches_dp1(spawn, tmp_path):
    from safetensors.torch import load_file

    model_dir = make_tiny_model(tmp_path / "model", "qwen2")
    records = [{"prompt": f"Compute {i} + {i % 4}." + " please" * (i % 3),
                "response": f"{i} + {i % 4} = {i + i % 4}." + " done" * (i % 5)} for i in range(12)]
    data_file = tmp_path / "sft.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))

    results = spawn(2, _sft_layouts, str(model_dir), str(data_file), str(tmp_path / "runs"))
    assert results[0] == results[1]  # every rank reports the global numbers
    dp2 = results[0][(1, 1)]
    assert dp2[-1]["loss"] < dp2[0]["loss"]
    for tp, pp in LAYOUTS[1:]:
        reference = results[0][(tp, pp)]
        for got, want in zip(dp2, reference):
            assert got["response_tokens"] == want["response_tokens"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    weights = {layout: load_file(str(tmp_path / f"runs/tp{layout[0]}pp{layout[1]}/model/model.safetensors"))
               for layout in LAYOUTS}
    start = load_file(str(model_dir / "model.safetensors"))
    for name, tensor in weights[(1, 1)].items():
        assert (tensor - start[name]).abs().max() > 1e-4, f"{name} did not train"
        for layout in LAYOUTS[1:]:
            diff = (tensor - weights[layout][name]).abs().max().item()
            assert diff <= 1e-5, f"{name}: DP=2 vs DP=1 at TP={layout[0]} PP={layout[1]} differ by {diff}"
    metrics = [json.loads(line) for line in open(tmp_path / "runs/tp1pp1/model/sft_metrics.jsonl")]
    assert [m["loss"] for m in metrics] == [r["loss"] for r in dp2]
