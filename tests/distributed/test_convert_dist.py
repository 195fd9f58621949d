"""Conversion round trips under torchrun-like launches, and checkpoints loading at other layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import make_tiny_model

pytestmark = pytest.mark.distributed


def _ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(11))


def _convert_then_load(rank, world_size, hf_dir, ckpt, hf_out):
    from megatron_spo import platform
    from megatron_spo.cli import main
    from megatron_spo.models.checkpoint import load_pretrained
    from megatron_spo.training.logprobs import compute_logits

    platform.init_distributed(1, 1)  # as under torchrun: the CLI reuses the process group
    codes = [
        main(["convert", "hf-to-mcore", "--hf-dir", hf_dir, "--out", ckpt, "--tp", "2"]),
        main(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", hf_out, "--tp", "2", "--max-shard-size", "20KB"]),
    ]
    logits = {}
    for tp, pp in [(1, 1), (1, 2), (2, 1)]:  # the TP=2 checkpoint at TP=1 (x DP=2), PP=2, TP=2
        ctx = platform.init_distributed(tp, pp)
        _, chunks, _ = load_pretrained(ckpt, ctx)
        logits[(tp, pp)] = compute_logits(chunks, ctx, _ids())
    return {"codes": codes, "logits": logits}


def test_hf_to_mcore_tp2_to_hf_is_bit_identical_and_loads_anywhere(spawn, tmp_path):
    import transformers

    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2", num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, num_hidden_layers=2)
    ckpt, hf_out = tmp_path / "ckpt", tmp_path / "hf_out"
    results = spawn(2, _convert_then_load, str(hf_dir), str(ckpt), str(hf_out))
    assert all(r["codes"] == [0, 0] for r in results)

    # bit-identical tensors, sharded by size with an index
    original = load_file(hf_dir / "model.safetensors")
    index = json.loads((hf_out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    converted = {}
    for shard in sorted(set(index["weight_map"].values())):
        converted.update(load_file(hf_out / shard))
    assert converted.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name

    # an equivalent config, tokenizer carried over, loadable by transformers
    src_cfg = json.loads((hf_dir / "config.json").read_text())
    out_cfg = json.loads((hf_out / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_key_value_heads", "rope_parameters", "tie_word_embeddings"):
        assert out_cfg[key] == src_cfg[key], key
    assert (hf_out / "tokenizer.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(_ids()).logits
    for rank, res in enumerate(results):
        for layout, logits in res["logits"].items():
            diff = (logits - reference).abs().max().item()
            assert diff <= 1e-5, f"rank {rank} layout {layout}: {diff}"
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"
