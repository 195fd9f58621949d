"""Live weight sync: a TP=2 and a PP=2 Megatron actor, exported by the bridge in buckets, pushed
into the `hf` rollout engine on every rank; greedy outputs then equal HF's with the actor's
weights. One spawn covers both layouts (the parallel state is re-initialised in between)."""

from __future__ import annotations

import pytest
import torch
import transformers

from tiny_models import make_tiny_model

pytestmark = pytest.mark.distributed

PROMPTS = [[40, 70, 77, 77, 80], [5, 6, 7], [55, 60, 65, 70, 75, 80, 85, 90]]
MAX_TOKENS = 16
LAYOUTS = [(2, 1), (1, 2)]


def make_actor_and_engine_dirs(root):
    """(engine_dir, actor_dir): a tiny model, and the same model with perturbed weights."""
    engine_dir = make_tiny_model(root / "engine", "qwen2", seed=4, vocab_size=100, num_hidden_layers=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(engine_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    actor_dir = root / "actor"
    model.save_pretrained(actor_dir)
    return str(engine_dir), str(actor_dir)


def hf_greedy(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    for prompt in PROMPTS:
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=2, pad_token_id=0)
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def greedy(engine):
    from megatron_spo.rollout.types import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [r.completions[0].token_ids for r in engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in PROMPTS])]


def sync_from_actor(rank, world_size, engine_dir, actor_dir, engine_name, layouts, rollout_tp=None):
    """On every rank: for each (tp, pp) actor layout, sync the actor into the engine and decode.
    `rollout_tp` (vllm): ranks per engine; None = one engine over the world."""
    import safetensors.torch

    from megatron_spo import platform
    from megatron_spo.models.bridge import WeightBridge
    from megatron_spo.models.builder import build_model
    from megatron_spo.models.hf_config import load_model_spec
    from megatron_spo.rollout.engine import EngineConfig, make_engine
    from megatron_spo.rollout.weight_sync import WeightSyncConfig, sync_weights

    results = {}
    engine = None
    for tp, pp in layouts:
        ctx = platform.init_distributed(tp, pp)
        if engine is None:  # after torch.distributed is up: vLLM's external launcher joins it
            if rollout_tp is None:
                rollout_tp = world_size if engine_name == "vllm" else 1
            engine = make_engine(EngineConfig(model=engine_dir, name=engine_name, tensor_parallel_size=rollout_tp))
        spec = load_model_spec(actor_dir)
        chunks = build_model(spec, ctx)
        bridge = WeightBridge(spec, ctx)
        bridge.load_hf(chunks, actor_dir)
        before = greedy(engine)
        # small bridge buckets (several per layer) under larger sync buckets: a sync bucket
        # holds tensors from several bridge buckets
        stream = bridge.export_hf(chunks, bucket_bytes=32 * 1024)
        reloads = []
        if hasattr(engine, "llm"):  # vLLM: count engine-side reloads
            rpc = engine.llm.collective_rpc
            engine.llm.collective_rpc = lambda method, *a, _rpc=rpc, **k: (reloads.append(method), _rpc(method, *a, **k))[1]
        stats = sync_weights(engine, stream, WeightSyncConfig(bucket_mb=0.15))
        if hasattr(engine, "llm"):
            engine.llm.collective_rpc = rpc
        results[(tp, pp)] = {"before": before, "after": greedy(engine), "buckets": stats.buckets, "bytes": stats.bytes,
                             "reloads": reloads}
        # back to the engine's original weights for the next layout
        engine.update_weights(safetensors.torch.load_file(f"{engine_dir}/model.safetensors").items())
    engine.shutdown()
    return results


def test_tp2_and_pp2_actor_sync_into_hf_engine(spawn, tmp_path):
    engine_dir, actor_dir = make_actor_and_engine_dirs(tmp_path)
    expected = hf_greedy(actor_dir)
    assert expected != hf_greedy(engine_dir)
    model_bytes = sum(t.numel() * t.element_size() for t in transformers.AutoModelForCausalLM.from_pretrained(actor_dir).state_dict().values())
    results = spawn(2, sync_from_actor, engine_dir, actor_dir, "hf", LAYOUTS)
    for rank, per_layout in enumerate(results):
        for layout, result in per_layout.items():
            assert result["before"] != expected, (rank, layout)
            assert result["after"] == expected, (rank, layout)
            assert result["bytes"] == model_bytes
            assert result["buckets"] > 1
