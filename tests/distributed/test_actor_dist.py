"""Adam steps of the Megatron actor at TP=2 and PP=2 equal the unsplit model's steps.

The reference runs in the same two processes at TP=1, PP=1 (data parallel 2 on identical data:
gradients are summed over both ranks and divided by the doubled token count, which is exactly
the single-process step), so one spawn covers every layout.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_model

pytestmark = pytest.mark.distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]


def _batch(seed=3, batch=4, seq=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq)
    mask[:, :3] = 0  # "prompt" tokens carry no loss
    mask[0, 7:] = 0  # a shorter sequence
    mask[:, -1] = 0  # the last position has no next token
    return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": mask}


def _adam_steps(rank, world_size, hf_dirs, steps):
    from megatron_spo import platform
    from megatron_spo.models.checkpoint import load_pretrained
    from megatron_spo.training.actor import Actor, lm_loss
    from megatron_spo.training.config import OptimizerConfig
    from megatron_spo.training.microbatch import microbatches

    out = {}
    for family, hf_dir in hf_dirs.items():
        for tp, pp in LAYOUTS:
            ctx = platform.init_distributed(tp, pp)
            spec, chunks, bridge = load_pretrained(hf_dir, ctx)
            # Adam divides by sqrt(v) + eps: with a tiny eps, coordinates whose gradient is ~1e-9
            # turn fp32 summation-order noise into visible updates, so eps is kept moderate.
            actor = Actor(spec, chunks, bridge, ctx, OptimizerConfig(lr=1e-3, grad_clip=1.0, eps=1e-4, weight_decay=0.0))
            history = [actor.train_step(microbatches(_batch(), 2), lm_loss) for _ in range(steps)]
            params = {k: v.clone() for k, v in actor.export_hf()}
            out[(family, tp, pp)] = {"history": history, "params": params}
    return out


def test_adam_steps_at_tp2_and_pp2_match_unsplit(spawn, tmp_path):
    hf_dirs = {
        # QKV bias + tied embeddings (the last stage holds a copy under PP)
        "qwen2": str(make_tiny_model(tmp_path / "qwen2", "qwen2", num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, tie_word_embeddings=True)),
        # QK-norm, GQA, untied output layer
        "qwen3": str(make_tiny_model(tmp_path / "qwen3", "qwen3", num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16)),
    }
    results = spawn(2, _adam_steps, hf_dirs, 2)
    for family in hf_dirs:
        reference = results[0][(family, 1, 1)]
        first, second = reference["history"]
        assert first["skipped"] == 0.0 and first["count"] == 2 * 22  # 4 x 6 loss tokens, minus 2 in row 0, per rank
        assert second["nll_sum"] < first["nll_sum"]  # it learns
        for tp, pp in LAYOUTS[1:]:
            for rank, res in enumerate(results):
                got = res[(family, tp, pp)]
                for step, (g, w) in enumerate(zip(got["history"], reference["history"])):
                    # metrics are summed over data-parallel ranks (2 in the reference): compare means
                    assert g["nll_sum"] / g["count"] == pytest.approx(w["nll_sum"] / w["count"], rel=1e-5)
                    assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5)
                for name, tensor in reference["params"].items():
                    diff = (got["params"][name] - tensor).abs().max().item()
                    assert diff <= 1e-5, f"{family} TP={tp} PP={pp} rank {rank} {name}: {diff}"


def _steps_with_recompute(rank, world_size, hf_dir, recompute):
    from megatron_spo import platform
    from megatron_spo.models.checkpoint import load_pretrained
    from megatron_spo.training.actor import Actor, lm_loss
    from megatron_spo.training.config import OptimizerConfig
    from megatron_spo.training.microbatch import microbatches

    ctx = platform.init_distributed(2, 1)
    spec, chunks, bridge = load_pretrained(hf_dir, ctx, recompute=recompute)
    assert chunks[0].config.recompute_granularity == (None if recompute == "none" else "full")
    actor = Actor(spec, chunks, bridge, ctx, OptimizerConfig(lr=1e-3, grad_clip=1.0, eps=1e-4, weight_decay=0.0))
    history = [actor.train_step(microbatches(_batch(), 2), lm_loss) for _ in range(2)]
    return {"history": history, "params": {k: v.clone() for k, v in actor.export_hf()}}


def test_full_recompute_gives_the_same_steps(spawn, tmp_path):
    """parallel.recompute=full (layers recomputed in backward, with the RNG tracker restored) trains
    exactly as keeping every activation, at TP=2."""
    hf_dir = str(make_tiny_model(tmp_path / "qwen3", "qwen3", num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16))
    plain = spawn(2, _steps_with_recompute, hf_dir, "none")
    recomputed = spawn(2, _steps_with_recompute, hf_dir, "full")
    for a, b in zip(plain, recomputed):
        for x, y in zip(a["history"], b["history"]):
            assert x["nll_sum"] == y["nll_sum"] and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6)
        for name, tensor in a["params"].items():
            assert torch.allclose(b["params"][name], tensor, atol=1e-7, rtol=0), name
