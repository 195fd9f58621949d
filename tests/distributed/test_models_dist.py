"""Megatron models at TP=2 / PP=2 (and virtual PP) over gloo give HF transformers' results.

One spawn per parallel layout covers all three families, to keep process start-up cost low.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_model

pytestmark = pytest.mark.distributed

FAMILIES = ["llama", "qwen2", "qwen3"]


def _input_ids(batch=3, seq=11, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (batch, seq), generator=gen)


def _make_models(root):
    # 4 layers so PP=2 x VPP=2 has one layer per chunk; GQA; tied embeddings for one family
    return {
        family: str(
            make_tiny_model(
                root / family, family, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, tie_word_embeddings=(family == "qwen2"),
            )
        )
        for family in FAMILIES
    }


def _megatron_outputs(rank, world_size, hf_dirs, tp, pp, vpp=None):
    from megatron_spo import platform
    from megatron_spo.models.bridge import WeightBridge
    from megatron_spo.models.builder import build_model
    from megatron_spo.models.hf_config import load_model_spec
    from megatron_spo.training.logprobs import compute_logits, compute_logprobs

    ctx = platform.init_distributed(tp, pp, vpp)
    results = {}
    for family, hf_dir in hf_dirs.items():
        spec = load_model_spec(hf_dir)
        chunks = build_model(spec, ctx)
        WeightBridge(spec, ctx).load_hf(chunks, hf_dir)
        ids = _input_ids()
        out = compute_logprobs(chunks, ctx, ids, micro_batch_size=2, with_entropy=True)
        out["logits"] = compute_logits(chunks, ctx, ids, micro_batch_size=2)
        results[family] = out
    return results


def _hf_reference(hf_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = _input_ids()
    with torch.no_grad():
        logits = model(ids).logits
    logp = torch.log_softmax(logits, -1)
    return {
        "logits": logits,
        "logprobs": logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0],
        "entropy": -(logp.exp() * logp).sum(-1)[:, :-1],
    }


@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (1, 2, 2)], ids=["tp2", "pp2", "pp2-vpp2"])
def test_logits_logprobs_entropy_match_hf(spawn, tmp_path, tp, pp, vpp):
    hf_dirs = _make_models(tmp_path)
    results = spawn(2, _megatron_outputs, hf_dirs, tp, pp, vpp)
    for family, hf_dir in hf_dirs.items():
        ref = _hf_reference(hf_dir)
        for rank, res in enumerate(results):
            for key in ("logits", "logprobs", "entropy"):
                diff = (res[family][key] - ref[key]).abs().max().item()
                assert diff <= 1e-5, f"{family} rank {rank} {key}: max abs diff {diff}"
