"""GPU smoke suite (`make test-gpu`): the real trainer on one CUDA device.

Everything here is skipped on a machine without CUDA (CI and the CPU suite); the dry run
(`tests/dry_run`) is what checks the GPU paths there. On one GPU each test spawns a single
torchrun-style rank (NCCL world of one) and runs the user's path: the Megatron actor in
bfloat16 with the distributed optimizer, the hf engine on the GPU, the weight sync into it every
step, every algorithm's step, and a checkpoint that a new trainer resumes bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import algorithm_setup, merge, probe_at_generate, tiny_train_setup

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on a GPU node)"),
]

ALGORITHMS = ["spo", "grpo", "spo_chain", "spo_tree", "soft_spo"]


def _snapshot(trainer):
    params = {k: v.detach().float().cpu().clone() for k, v in trainer.actor.export_hf()}
    moments = []
    for part in trainer.actor.optimizer.chained_optimizers:
        for group in part.optimizer.param_groups:
            for param in group["params"]:
                state = part.optimizer.state[param]
                moments.append((param.detach().cpu().clone(), state["exp_avg"].cpu().clone(),
                                state["exp_avg_sq"].cpu().clone()))
    return params, moments


def _train_on_gpu(rank, world_size, overrides, steps):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    cfg = from_dict(TrainConfig, {**overrides, "total_steps": steps})
    trainer = Trainer(cfg)
    actor_param = next(trainer.actor.raw_chunks[0].parameters())
    engine_param = next(trainer.engine.model.parameters())
    history = []
    while trainer.step < steps:
        history.append(trainer.train_step())
        if cfg.checkpoint.every_steps and trainer.step % cfg.checkpoint.every_steps == 0:
            trainer.save_checkpoint()
    snapshot = _snapshot(trainer)
    peak = torch.cuda.max_memory_allocated()
    trainer.close()
    return {"actor": (str(actor_param.device), str(actor_param.dtype)),
            "engine": str(engine_param.device),
            "distributed_optimizer": trainer.actor.chunks[0].ddp_config.use_distributed_optimizer,
            "history": history, "snapshot": snapshot, "peak_bytes": peak}


def _resume_on_gpu(rank, world_size, overrides):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, overrides))
    snapshot = _snapshot(trainer)
    step = trainer.step
    trainer.close()
    return {"step": step, "snapshot": snapshot}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_on_the_gpu(spawn, tmp_path, algorithm):
    overrides = merge(algorithm_setup(tmp_path, algorithm), {"checkpoint": {"every_steps": 0}})
    (out,) = spawn(1, _train_on_gpu, overrides, 2)
    print(algorithm, out["actor"], out["engine"], f"peak {out['peak_bytes'] / 2**20:.1f} MiB",
          {k: round(v, 4) for k, v in out["history"][-1].items() if not k.startswith("perf/")})
    assert out["actor"] == ("cuda:0", "torch.bfloat16")  # model.dtype auto -> bf16 on a GPU
    assert out["engine"] == "cuda:0"
    assert out["distributed_optimizer"]
    for metrics in out["history"]:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        assert not bad, bad
        if "rollout/logprob_mismatch" in metrics:
            # engine (fp32 copy of the synced weights) against the bf16 actor, per token
            assert metrics["rollout/logprob_mismatch"] < 0.1, metrics["rollout/logprob_mismatch"]


def test_a_gpu_checkpoint_resumes_bit_for_bit(spawn, tmp_path):
    run = tmp_path / "run"
    # qwen2 (biases beside the norms), the demo's family: its bf16 optimizer state once mis-keyed
    overrides = merge(tiny_train_setup(tmp_path, family="qwen2"),
                      {"checkpoint": {"dir": str(run), "every_steps": 2, "export_hf": False}})
    (trained,) = spawn(1, _train_on_gpu, overrides, 2)
    (resumed,) = spawn(1, _resume_on_gpu, merge(overrides, {"total_steps": 4}))
    assert resumed["step"] == 2
    params, moments = trained["snapshot"]
    params2, moments2 = resumed["snapshot"]
    assert params.keys() == params2.keys()
    for name in params:
        assert torch.equal(params[name], params2[name]), name
    assert len(moments) == len(moments2) > 0
    for a, b in zip(moments, moments2):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_transformer_engine_spec_when_installed(spawn, tmp_path):
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed here")
    overrides = merge(algorithm_setup(tmp_path, "spo"), {"checkpoint": {"every_steps": 0}})
    (out,) = spawn(1, _train_on_gpu, overrides, 1)
    assert out["actor"] == ("cuda:0", "torch.bfloat16")


def _colocated_on_gpu(rank, world_size, overrides):
    """One resident step (Adam state exists), then the offload round trip by hand, then two
    colocated steps; GPU bytes are read at each point."""
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": 3}))
    trainer.train_step()
    before = _snapshot(trainer)
    actor = trainer.colocation.models[0]
    resident = torch.cuda.memory_allocated()
    freed = actor.offload()
    offloaded = torch.cuda.memory_allocated()
    actor.onload()
    after = _snapshot(trainer)
    at_generate = probe_at_generate(trainer.engine, torch.cuda.memory_allocated)
    history = [trainer.train_step(), trainer.train_step()]
    events = list(trainer.colocation.events)
    trainer.close()
    return {"before": before, "after": after, "resident": resident, "offloaded": offloaded, "freed": freed,
            "at_generate": at_generate, "history": history, "events": events}


def test_colocation_offloads_the_actor_and_puts_the_engine_to_sleep_on_the_gpu(spawn, tmp_path):
    overrides = merge(tiny_train_setup(tmp_path, family="qwen2"),
                      {"checkpoint": {"every_steps": 0}, "rollout": {"engine": {"enable_sleep_mode": True}, "offload_actor": True}})
    (out,) = spawn(1, _colocated_on_gpu, overrides)
    print("colocation on GPU:", {k: out[k] for k in ("resident", "offloaded", "freed", "at_generate")}, out["events"])
    # the round trip through pinned host memory is exact
    for name in out["before"][0]:
        assert torch.equal(out["before"][0][name], out["after"][0][name]), name
    assert all(torch.equal(x, y) for a, b in zip(out["before"][1], out["after"][1]) for x, y in zip(a, b))
    assert out["freed"] > 0 and out["resident"] - out["offloaded"] >= out["freed"] * 0.9
    assert max(out["at_generate"]) < out["resident"]  # the engine generated beside an offloaded actor
    assert "engine.sleep(2)" in out["events"] and "models.onload" in out["events"]
    for metrics in out["history"]:
        assert all(math.isfinite(v) for v in metrics.values())


def _vllm_sleep_on_gpu(rank, world_size, model_dir):
    """vLLM with sleep mode on the GPU: greedy ids before a level-2 sleep equal those after
    wake_up(weights) + a weight sync + wake_up(kv_cache); GPU bytes read at each point."""
    import transformers

    from megatron_spo.rollout.engine import EngineConfig, make_engine
    from megatron_spo.rollout.types import GenerationRequest, SamplingParams
    from megatron_spo.rollout.weight_sync import WeightSyncConfig, sync_weights

    engine = make_engine(EngineConfig(model=str(model_dir), name="vllm", max_model_len=256, enable_sleep_mode=True,
                                      gpu_memory_utilization=0.3, dtype="bfloat16"))
    request = [GenerationRequest(prompt_token_ids=[5, 6, 7, 8], params=SamplingParams(temperature=0.0, max_tokens=16))]
    free = lambda: torch.cuda.mem_get_info()[0]  # noqa: E731  (vLLM's pool is outside torch's allocator)
    before = engine.generate(request)[0].completions[0].token_ids
    awake = free()
    engine.sleep(level=2)
    asleep = free()
    engine.wake_up(["weights"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    sync_weights(engine, ((k, v.cuda()) for k, v in hf.state_dict().items()), WeightSyncConfig())
    engine.wake_up(["kv_cache"])
    after = engine.generate(request)[0].completions[0].token_ids
    engine.shutdown()
    return {"before": before, "after": after, "freed_bytes": asleep - awake}


def test_vllm_sleep_and_wake_on_the_gpu(spawn, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here")
    from tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "model", "qwen2", num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    (out,) = spawn(1, _vllm_sleep_on_gpu, model)
    print("vLLM sleep on GPU:", out)
    assert out["after"] == out["before"]
    assert out["freed_bytes"] > 0.1 * 0.3 * torch.cuda.get_device_properties(0).total_memory  # the KV cache went


def _real_step_peak(rank, world_size, overrides):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**overrides, "total_steps": 1}))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    trainer.train_step()
    peak = torch.cuda.max_memory_allocated()
    trainer.close()
    return peak


def test_dry_run_plan_beside_the_real_peak(spawn, tmp_path):
    """The same tiny config through the dry run (simulated GPU, this machine's CPU) and for real on
    the GPU: the plan's largest phase against `torch.cuda.max_memory_allocated()` over the step.
    The plan counts the torch-native spec unfused, so it should not be below the real peak."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    overrides = merge(tiny_train_setup(tmp_path, family="qwen3"), {
        "checkpoint": {"every_steps": 0}, "run_dir": str(tmp_path / "run"),
        "rollout": {"engine": {"dtype": "bfloat16"}},
        "dry_run": {"nodes": 1, "gpus_per_node": 1, "report_file": str(tmp_path / "plan.json")},
    })
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(overrides))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "megatron_spo", "train", "--config", str(config), "--dry-run"],
                          cwd=repo, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    planned = max(max(p["phases"].values()) for p in plan.values())
    (real,) = spawn(1, _real_step_peak, overrides)
    print(f"dry-run plan: largest phase {planned / 2**20:.2f} MiB; real step: max_memory_allocated {real / 2**20:.2f} MiB")
    assert real <= planned * 1.25 + 2**20
