"""`megatron-spo train --dry-run`: the real step of a GPU configuration on simulated GPUs.

Each dry run is a subprocess (it turns its process into a rank of a simulated cluster for good).
Covered: a tiny config end to end with closed-form parameter / gradient / optimizer bytes and
`dtype: auto` = bf16 on GPU; each kind of device bug the strict mode must catch, planted into the
real step, failing with the file:line of the offending call; the Qwen3-8B recipe (the command the
README gives) with its plan's closed-form counts; and the over-budget refusal.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def params_per_tp_rank(cfg: dict, tp: int) -> tuple[list[int], list[int]]:
    """Element counts of the (matrices, norm vectors) one TP rank holds (PP = 1), from the HF
    config alone."""
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    matrices = [(heads + 2 * kv) * hd * h // tp, h * heads * hd // tp, 2 * f * h // tp, f * h // tp] * layers
    matrices += [cfg["vocab_size"] * h // tp] * (1 if cfg.get("tie_word_embeddings") else 2)
    norms = ([h, h] + ([hd, hd] if cfg.get("model_type") == "qwen3" else [])) * layers + [h]
    return matrices, norms


def check_closed_form(role: dict, cfg: dict, tp: int, dp: int) -> None:
    """Parameter, gradient and optimizer bytes of a role against their closed form.

    Every weight is bf16, the norms too (as under the TE spec), so Megatron's DDP makes one buffer
    (one bucket: overlap_grad_reduce is off), starts each parameter on a multiple of 64 elements
    and pads the end to a multiple of lcm(dp, 128). With every parameter a multiple of 64 elements
    (true of both configs tested) the N real elements sit at [0, N) of P = ceil(N / L) L, and DP
    rank r's optimizer owns [r P / dp, (r + 1) P / dp) of it: an fp32 master weight and two fp32
    Adam moments (12 bytes) per element."""
    matrices, norms = params_per_tp_rank(cfg, tp)
    assert all(n % 64 == 0 for n in matrices + norms)
    n = sum(matrices + norms)
    padded = -(-n // math.lcm(dp, 128)) * math.lcm(dp, 128)
    shard = padded // dp
    param_bytes = 2 * padded
    grad_bytes = 4 * padded  # fp32 gradient buffer
    optimizer_bytes = 12 * min(max(n - role["dp_rank"] * shard, 0), shard)
    assert role["param_numel"] == n
    assert (role["param_bytes"], role["grad_bytes"], role["optimizer_bytes"]) == (param_bytes, grad_bytes, optimizer_bytes)


def run(args: list[str], *, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny(tmp_path):
    """A tiny Qwen3 GPU config: TP 2 on 4 simulated GPUs (DP 2), bf16 from `dtype: auto`."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_config

    model = tmp_path / "model"
    hf_config = tiny_config("qwen3", hidden_size=128, intermediate_size=256, head_dim=64)
    hf_config.architectures = ["Qwen3ForCausalLM"]
    hf_config.save_pretrained(model)  # config.json only: no weights, no tokenizer
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"hf_dir": str(model), "dtype": "auto"},
        "parallel": {"tp": 2, "pp": 1},
        "data": {"train_files": [str(data)], "prompt": {"max_prompt_tokens": 16}},
        "algorithm": {"name": "spo"},
        "rollout": {"engine": {"name": "vllm", "gpu_memory_utilization": 0.5}, "max_response_tokens": 48},
        "batch": {"train_batch_size": 8, "mini_batch_size": 4, "max_tokens_per_micro_batch": 64},
        "dry_run": {"nodes": 1, "gpus_per_node": 4, "gpu_memory_gib": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, json.loads((model / "config.json").read_text())


def test_tiny_config_dry_run_measures_closed_form_bytes(tiny, tmp_path):
    config, hf = tiny
    report = tmp_path / "report.json"
    proc = run(["-m", "megatron_spo", "train", "--config", str(config), "--dry-run", f"dry_run.report_file={report}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per GPU" in proc.stdout and "phase peak: training" in proc.stdout
    roles = json.loads(report.read_text())["roles"]
    assert [r["rank"] for r in roles] == [0, 3]
    for role in roles:
        assert role["dtype"] == "bfloat16"  # model.dtype auto on GPU
        assert role["distributed_optimizer"] is True
        check_closed_form(role, hf, tp=2, dp=2)
        # one micro-batch of the token budget: logits (1, 64, V / 2) in bf16
        assert role["logits_bytes"] == 64 * hf["vocab_size"] // 2 * 2
        assert role["engine_synced_bytes"] > 0


def test_colocation_phases_are_measured(tiny, tmp_path):
    """With the engine asleep during training and the actor offloaded during generation, the
    dry run runs the real offload (storages freed in place) and the plan's phases follow it:
    the rollout phase holds the engine beside next to nothing of the actor, the training phase
    holds no engine. Without colocation the actor stays whole beside the engine throughout."""
    config, _ = tiny
    plans = {}
    for name, flags in {"colocated": ["rollout.engine.enable_sleep_mode=true", "rollout.offload_actor=true"],
                        "resident": ["rollout.engine.enable_sleep_mode=false", "rollout.offload_actor=false"]}.items():
        report = tmp_path / f"{name}.json"
        proc = run(["-m", "megatron_spo", "train", "--config", str(config), "--dry-run",
                    f"dry_run.report_file={report}", *flags])
        assert proc.returncode == 0, proc.stderr[-3000:]
        plans[name] = json.loads(report.read_text())
    engine = 0.5 * 2**30  # gpu_memory_utilization 0.5 of the 1 GiB budget
    for colocated, resident in zip(plans["colocated"]["roles"], plans["resident"]["roles"]):
        static = resident["static_after_step"]
        # the whole actor stays (Adam's moments are created by the first update, after this)
        assert resident["live_at_generate"] >= resident["param_bytes"] + resident["grad_bytes"]
        assert colocated["live_at_generate"] < 0.01 * static  # offloaded: RoPE frequencies are what is left
        assert [e.split("(")[0] for e in colocated["colocation_events"]] == [
            "engine.sleep", "engine.wake_up", "models.offload", "engine.wake_up", "engine.sleep", "models.onload"]
        assert resident["colocation_events"] == []
    for rank, plan in plans["colocated"]["plan"].items():
        phases, other = plan["phases"], plans["resident"]["plan"][rank]["phases"]
        assert phases["rollout"] == pytest.approx(plan["items"]["trainer's GPU state while the engine generates"] + engine)
        # the engine slept (and the bridge's gather buffers, dropped for the rollout, are not back)
        assert other["training"] - phases["training"] >= engine
        assert phases["weight sync"] < other["weight sync"]  # only the engine's weights are awake


def test_over_budget_fails_with_one_line_when_fit_is_required(tiny, tmp_path):
    config, _ = tiny
    proc = run(["-m", "megatron_spo", "train", "--config", str(config), "--dry-run",
                "dry_run.gpu_memory_gib=0.001", "dry_run.require_fit=true"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    match = re.search(r"phase '(weight sync|rollout|training)' on rank \d+ needs ([\d.e-]+) GiB > 0.001 GiB "
                      r"\(dry_run.gpu_memory_gib\); largest item: (.+) \(([\d.e-]+) GiB\)$", last)
    assert match, last
    assert float(match[2]) > 0.001 and 0 < float(match[4]) <= float(match[2])


PLANTS = {
    # the actor no longer moves micro-batches to the GPU (the old code: CPU tensors into the model)
    "cpu_into_model": """
        import megatron_spo.training.actor as actor_module
        from megatron_spo import platform as real
        class CpuDevice:
            def __getattr__(self, name): return getattr(real, name)
            def device(self): return torch.device("cpu")
        actor_module.platform = CpuDevice()
    """,
    # host sums and the value store on the NCCL data-parallel group (the old code)
    "cpu_into_nccl": """
        import dataclasses
        from megatron_spo import platform
        original = platform.init_distributed
        platform.init_distributed = lambda *a, **k: dataclasses.replace(
            original(*a, **k), host_dp_group=original(*a, **k).dp_group)
    """,
    # a GPU tensor into the gloo data-parallel group
    "gpu_into_gloo": """
        from megatron_spo import platform
        from megatron_spo.training.algorithms.base import StepContext
        original = StepContext.reduce_sum
        StepContext.reduce_sum = lambda self, t: original(self, t.to(platform.device()))
    """,
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_strict_mode_catches_planted_device_bugs(tiny, tmp_path, plant):
    config, _ = tiny
    from megatron_spo.dry_run.runner import prepare_config

    _, data, _, _ = prepare_config(str(config), [], tmp_path)
    role_config = tmp_path / "role.yaml"
    role_config.write_text(yaml.safe_dump(data))
    script = tmp_path / "plant.py"
    script.write_text("import sys, torch\n" + textwrap.dedent(PLANTS[plant]) + textwrap.dedent(f"""
        from megatron_spo.dry_run.runner import run_role
        run_role({str(role_config)!r}, 0, {str(tmp_path / 'out.json')!r})
    """))
    proc = run([str(script)])
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if "DeviceMixError" in line][-1]
    expected = {"cpu_into_model": r"mixes GPU and CPU tensors", "cpu_into_nccl": r"on a nccl group got a cpu tensor",
                "gpu_into_gloo": r"on a gloo group got a meta tensor"}[plant]
    assert re.search(expected, error), error
    # the offending call in our code, by file:line, and that line is the call named
    site = re.findall(r"(megatron_spo/[\w/]+\.py):(\d+)", error)[-1]
    line = (REPO / site[0]).read_text().splitlines()[int(site[1]) - 1]
    want = {"cpu_into_model": ("training/actor.py", "model("),
            "cpu_into_nccl": ("", "torch.distributed."),
            "gpu_into_gloo": ("training/algorithms/base.py", "all_reduce")}[plant]
    assert want[0] in site[0] and want[1] in line, (site, line)


@pytest.mark.slow
@pytest.mark.large
def test_qwen3_8b_recipe_dry_run(tmp_path):
    """The README's command: the 8-GPU Qwen3-8B SPO recipe at the authors' settings (16,384
    response + 2,048 prompt tokens), TP 2 x DP 4 with sequence parallelism, colocated: it fits 80
    GiB in every phase (require_fit would fail the run otherwise)."""
    report = tmp_path / "report.json"
    proc = run(["-m", "megatron_spo", "train", "--config", "examples/qwen3_8b_dapo/spo.yaml", "--dry-run",
                "dry_run.nodes=1", "dry_run.gpus_per_node=8", "dry_run.require_fit=true",
                f"dry_run.report_file={report}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per GPU" in proc.stdout and "fits: every phase of every role within 80 GiB" in proc.stdout
    hf = json.loads((REPO / "examples/qwen3_8b_dapo/model/config.json").read_text())
    written = json.loads(report.read_text())
    assert written["over_budget"] is None
    for plan in written["plan"].values():
        assert set(plan["phases"]) == {"weight sync", "rollout", "training"}
        assert max(plan["phases"].values()) <= 80 * 2**30
        # chunked log-probs: no (tokens x V/tp) fp32 buffer (one is 18,432 x 75,968 x 4 B = 5.2 GiB)
        assert plan["items"]["loss buffers (log-softmax, entropy)"] < 18432 * hf["vocab_size"] // 2 * 4
    roles = written["roles"]
    assert len(roles) == 2
    for role in roles:
        check_closed_form(role, hf, tp=2, dp=4)
        # logits of one full micro-batch: 18,432 tokens x V/2 in bf16
        assert role["logits_bytes"] == 18432 * hf["vocab_size"] // 2 * 2


@pytest.mark.slow
@pytest.mark.large
@pytest.mark.parametrize("algorithm, extra", [
    ("grpo", ["rollout.n=2", "parallel.pp=2", "algorithm.grpo.loss.kl_coef=0.001"]),  # PP 2 and the reference's log-probs
    ("spo_chain", ["algorithm.spo_chain.max_response_tokens=48"]),
    ("spo_tree", ["algorithm.spo_tree.branching_factors=[2,2]", "algorithm.spo_tree.segment_tokens=16",
                  "algorithm.spo_tree.max_response_tokens=48"]),
    ("soft_spo", ["parallel.recompute=full"]),
])
def test_every_algorithm_passes_the_dry_run(tiny, tmp_path, algorithm, extra):
    config, _ = tiny
    report = tmp_path / "report.json"
    proc = run(["-m", "megatron_spo", "train", "--config", str(config), "--dry-run", f"algorithm.name={algorithm}",
                f"dry_run.report_file={report}", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    roles = json.loads(report.read_text())["roles"]
    assert all(r["metrics"]["rollout/train_sequences"] > 0 for r in roles)
    assert all(r["phases"]["actor update (forward + backward + optimizer)"]["calls"] >= 1 for r in roles)


def test_an_async_config_is_planned_as_the_synchronous_step_and_says_so(tiny, tmp_path):
    config, _ = tiny
    from megatron_spo.dry_run.runner import prepare_config

    one_rank_replicas = ["parallel.tp=1", "parallel.pp=1", "rollout.engine.tensor_parallel_size=1"]
    cfg, data, notes, _ = prepare_config(str(config), ["rollout.mode=async", *one_rank_replicas], tmp_path)
    assert cfg.rollout.mode == "sync" and data["rollout"]["mode"] == "sync"
    assert any(note.startswith("rollout.mode=async: planned as the synchronous step") for note in notes)
    from megatron_spo.errors import UserError

    with pytest.raises(UserError, match="parallel.tp=1"):  # what async mode refuses, the dry run refuses
        prepare_config(str(config), ["rollout.mode=async", "parallel.tp=2"], tmp_path)


def test_disaggregated_placement_plans_trainers_without_the_engine_and_a_rollout_rank_with_it(tiny, tmp_path):
    """parallel.rollout_ranks=2 on 4 simulated GPUs: ranks 0-1 run the real step as the trainers
    of a world of 2 (DP 2, no engine on their GPUs), their weight export packs the real broadcast
    buckets on the device; rank 2, the first rollout rank, holds vLLM's reservation and a bucket."""
    config, hf = tiny
    report = tmp_path / "report.json"
    proc = run(["-m", "megatron_spo", "train", "--config", str(config), "--dry-run", f"dry_run.report_file={report}",
                "parallel.tp=1", "rollout.mode=async", "parallel.rollout_ranks=2", "rollout.weight_sync.bucket_mb=0.1",
                "algorithm.spo.gen_batch_size=64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 4: 2 trainer ranks (TP 1 x PP 1 x DP 2) + 2 rollout ranks" in proc.stdout
    written = json.loads(report.read_text())
    roles = written["roles"]
    assert [r["rank"] for r in roles] == [0, 1] and all(r["dp"] == 2 for r in roles)
    for role in roles:
        check_closed_form(role, hf, tp=1, dp=2)
        assert role["broadcast_buckets"] > 1 and 0 < role["broadcast_bucket_bytes"]
        assert role["engine_synced_bytes"] == role["hf_numel"] * 2  # every weight, bf16, through the packing
    plans = written["plan"]
    assert sorted(plans) == ["0", "1", "2"]
    engine = 0.5 * 2**30  # gpu_memory_utilization 0.5 of the 1 GiB budget
    for rank in ("0", "1"):
        assert plans[rank]["items"]["rollout engine: weights"] == 0
        assert plans[rank]["items"]["rollout engine: KV cache + activations"] == 0
    rollout = plans["2"]
    assert rollout["items"]["rollout engine: weights"] == roles[0]["hf_numel"] * 4  # the engine's dtype: float32
    assert rollout["phases"]["rollout"] == engine
    assert rollout["phases"]["weight sync"] == engine + max(r["broadcast_bucket_bytes"] for r in roles)
    assert "rank 2: rollout rank (first of 2)" in proc.stdout


def test_a_disaggregated_placement_the_job_cannot_lay_out_is_refused(tiny, tmp_path):
    config, _ = tiny
    from megatron_spo.dry_run.runner import prepare_config
    from megatron_spo.errors import UserError

    with pytest.raises(UserError, match="leaves 3 trainer ranks"):
        prepare_config(str(config), ["parallel.tp=1", "rollout.mode=async", "parallel.rollout_ranks=1",
                                     "algorithm.spo.gen_batch_size=64"], tmp_path)
