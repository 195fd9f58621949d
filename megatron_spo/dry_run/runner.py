"""Drive the dry run: pick the rank roles, run each in its own process, print the memory plan.

`dry_run(config_path, overrides)` is `megatron-spo train --config C --dry-run`. For each distinct
role of the layout (the first pipeline stage's rank 0, which also leads a rollout group and owns
value-store shard 0; the last stage's first rank; the job's last rank, on the last node), a fresh
process runs `run_role`: it becomes that rank of the simulated cluster (`platform.enter_simulation`),
builds the real `Trainer` with the substitutes of `substitutes.py`, runs one `train_step` and builds
the checkpoint's sharded state dicts, all under the `Audit` mode, and writes what it measured.

The batch is shrunk to what exercises every path at its worst: each rank gets two mini-batches (so
the second optimizer step runs with the Adam state allocated), each of `pp` micro-batches (so a
pipeline holds as many in flight as 1F1B does), each micro-batch full to the token budget with
sequences of max prompt + max response tokens. Per-micro-batch and static memory are therefore
those of the configured run; only host-side bookkeeping is smaller.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_spo.errors import UserError

GIB = 2**30


# ----------------------------------------------------------------------------- the config


def _layout(cfg, rollout_ranks: int = 0) -> tuple[int, int, int, int]:
    """(the trainers' world, tp, pp, dp): the simulated cluster less its `rollout_ranks`."""
    world = cfg.dry_run.world_size - rollout_ranks
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise UserError(f"dry_run: parallel.tp ({tp}) x parallel.pp ({pp}) does not divide the simulated world "
                        f"{world} (dry_run.nodes x dry_run.gpus_per_node)")
    return world, tp, pp, world // (tp * pp)


def role_ranks(world: int, tp: int, pp: int, *, value_store: bool = True) -> dict[int, str]:
    """Global rank -> role description, for Megatron's rank order (TP fastest, then DP, then PP)."""
    dp = world // (tp * pp)
    shard = lambda d: f", value-store shard {d}" if value_store else ""  # noqa: E731
    roles: dict[int, str] = {0: f"first stage, tp 0, dp 0: rollout leader{shard(0)}"}
    if pp > 1:
        roles.setdefault((pp - 1) * tp * dp, f"last stage (pp {pp - 1}), tp 0, dp 0")
    roles.setdefault(world - 1, f"last rank: pp {pp - 1}, tp {tp - 1}, dp {dp - 1}{shard(dp - 1)}")
    return roles


def _section(data: dict, key: str) -> dict:
    """data[key] as a mapping, created when absent or empty (`key:` with nothing under it)."""
    if not isinstance(data.get(key), dict):
        data[key] = {}
    return data[key]


def prepare_config(config_path: str | None, overrides: list[str], workdir: Path):
    """The run's config with what the dry run does not read replaced; returns (config, its data,
    notes, parallel.rollout_ranks). The config is the trainer ranks' (rollout_ranks set to 0)."""
    from megatron_spo.config import apply_overrides, check_moved, from_dict, load_yaml
    from megatron_spo.training.config import TrainConfig

    data = load_yaml(config_path) if config_path else {}
    data = apply_overrides(TrainConfig, data, overrides)
    notes = []
    model = data.setdefault("model", {})
    hf_dir = model.get("hf_dir")
    if hf_dir is None:
        raise UserError("model.hf_dir is not set")
    if not (Path(hf_dir) / "config.json").is_file():
        beside = Path(config_path).parent / "model" if config_path else None
        if beside is None or not (beside / "config.json").is_file():
            raise UserError(f"model.hf_dir: {hf_dir!r} has no config.json, and there is no model/config.json beside "
                            f"the config for the dry run to take the architecture from")
        model["hf_dir"] = str(beside)
        notes.append(f"model: {hf_dir} not found; architecture from {beside / 'config.json'} (no weights needed)")
    prompts_file = workdir / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n")
    d = data.setdefault("data", {})
    d["train_files"], d["val_files"] = [str(prompts_file)], []
    data.setdefault("eval", {})["files"] = []
    notes.append("data: not read; prompts are synthetic, each max_prompt_tokens long; evaluation is not run")
    check_moved(TrainConfig, data, f"config {config_path!r}")  # before the sections below are filled in
    spo = _section(_section(data, "algorithm"), "spo")
    if spo.get("offline_values"):
        notes.append(f"algorithm.spo.offline_values ({spo['offline_values']}) not read: every prompt starts at the prior")
        spo["offline_values"] = None
    rollout = _section(data, "rollout")
    rollout_ranks = int(_section(data, "parallel").get("rollout_ranks") or 0)
    if rollout.get("mode") == "async" or rollout_ranks:
        full = from_dict(TrainConfig, copy.deepcopy(data), where=f"config {config_path!r}")  # async's own refusals first
        full.check_world_size(full.dry_run.world_size)
    if rollout_ranks:
        trainers = full.dry_run.world_size - rollout_ranks
        notes.append(f"parallel.rollout_ranks={rollout_ranks}: ranks 0-{trainers - 1} train with no engine on their "
                     f"GPUs (their weight export runs the real broadcast packing); ranks {trainers}-"
                     f"{trainers + rollout_ranks - 1} hold the engine and one received weight bucket, counted from "
                     "the config (the dry run runs no engine)")
        data["parallel"]["rollout_ranks"] = 0
    if rollout.get("mode") == "async":
        notes.append("rollout.mode=async: planned as the synchronous step; the plan does not hold the stream's KV "
                     "cache resident during the actor update, so leave room for both (max_inflight, "
                     "gpu_memory_utilization)")
        rollout["mode"] = "sync"
    data["run_dir"] = str(workdir / "run")
    data.setdefault("logging", {}).update({"tensorboard": False, "wandb": False, "progress_bar": False})
    cfg = from_dict(TrainConfig, data, where=f"config {config_path!r} (dry run)")
    world, tp, pp, dp = _layout(cfg, rollout_ranks)

    # shrink the batch, keeping every micro-batch at its worst (see the module docstring)
    b, n = cfg.batch, cfg.rollout.n or 1
    name = cfg.algorithm.name
    longest = (getattr(cfg.algorithm, name).max_response_tokens if name in ("spo_chain", "spo_tree")
               else cfg.rollout.max_response_tokens)  # the segment algorithms sample with their own
    seq_len = cfg.data.prompt.max_prompt_tokens + longest
    rows = max(1, b.max_tokens_per_micro_batch // seq_len) if b.max_tokens_per_micro_batch else b.micro_batch_size
    per_rank_prompts = max(1, math.ceil(pp * rows / n))
    mini = dp * per_rank_prompts
    batch = data.setdefault("batch", {})
    batch.update({"mini_batch_size": mini, "train_batch_size": 2 * mini, "epochs": 1})
    if cfg.algorithm.name == "spo":
        spo["gen_batch_size"] = 4 * mini
    notes.append(f"batch: {2 * mini} prompts x {n} (2 mini-batches; per rank {pp} micro-batch(es) of {rows} x "
                 f"{seq_len} tokens each, the configured worst case) instead of {b.train_batch_size}")
    cfg = from_dict(TrainConfig, data, where=f"config {config_path!r} (dry run)")
    return cfg, data, notes, rollout_ranks


# ----------------------------------------------------------------------------- one role


def _worst_prompts(cfg, dp_rank: int, dp: int) -> list:
    """algorithm.spo.gen_batch_size prompts of max_prompt_tokens tokens whose value-store keys all belong to this
    rank's shard (key mod dp == dp_rank), so the store's exchanges route only to this rank, which
    the fake group reproduces exactly."""
    from megatron_spo.training.rollouts import Prompt

    count = max(cfg.algorithm.spo.gen_batch_size if cfg.algorithm.name == "spo" else 0, cfg.batch.train_batch_size)
    length = cfg.data.prompt.max_prompt_tokens
    return [Prompt(key=dp_rank + dp * (i + 1), raw=f"dry-run prompt {i}", token_ids=[5 + (i + t) % 97 for t in range(length)],
                   answer="1" if i % 2 == 0 else "0") for i in range(count)]


def run_role(config_file: str, rank: int, out_file: str, rollout_ranks: int = 0) -> None:
    """One rank of the simulated cluster: build, step, checkpoint state; write the measurements.
    With `rollout_ranks`, a trainer rank of a disaggregated job: its world is the trainers, and
    its engine stand-in takes the weights through the real broadcast packing (`rollout.remote`)."""
    from megatron_spo import platform
    from megatron_spo.config import from_dict, load_yaml
    from megatron_spo.dry_run import substitutes
    from megatron_spo.dry_run.audit import Audit
    from megatron_spo.training.config import TrainConfig

    cfg = from_dict(TrainConfig, load_yaml(config_file), where=config_file)
    world, tp, pp, dp = _layout(cfg, rollout_ranks)
    platform.enter_simulation(platform.Simulation(world_size=world, rank=rank, gpus_per_node=cfg.dry_run.gpus_per_node))
    from megatron_spo.models.hf_config import load_model_spec
    from megatron_spo.training.trainer import Trainer, TrainerParts

    spec = load_model_spec(cfg.model.hf_dir)
    dp_rank = (rank // tp) % dp
    audit = Audit()
    platform.observe_storage_resizes(audit.resized)
    engine = substitutes.WorstCaseEngine(vocab_size=spec.vocab_size, max_model_len=cfg.rollout.engine.max_model_len,
                                         live_bytes=lambda: audit.live,
                                         broadcast_bucket_mb=cfg.rollout.weight_sync.bucket_mb if rollout_ranks else None)
    phases: dict[str, dict[str, float]] = {}
    measured = lambda name, fn: _measured(name, fn, audit, phases)  # noqa: E731
    t_start = time.perf_counter()
    with audit:
        parts = TrainerParts(tokenizer=substitutes.SilentTokenizer(), prompts=_worst_prompts(cfg, dp_rank, dp),
                             load_model=substitutes.shapes_only_loader(cfg.model.hf_dir), engine=engine,
                             scorer=substitutes.AlternatingScorer(), rollout_standalone=True)
        trainer = Trainer(cfg, parts=parts)
        par = trainer.parallel
        assert (par.rank, par.dp_rank) == (rank, dp_rank), (par.rank, par.dp_rank, rank, dp_rank)
        _store_longest_previous_responses(trainer, cfg, parts.prompts)
        t_built = time.perf_counter()
        actor = trainer.actor
        logits_bytes = _largest_logits_bytes(actor)
        trainer.logprobs = measured("forward-only log-probs (old / reference / drift)", trainer.logprobs)
        actor.train_step = measured("actor update (forward + backward + optimizer)", actor.train_step)
        trainer.algorithm.objective = _MeasuredLoss(trainer.algorithm.objective, audit, phases)
        from megatron_spo.rollout import weight_sync

        weight_sync.sync_weights = measured("weight export to the engine", weight_sync.sync_weights)
        static_before = audit.live
        metrics = trainer.train_step()
        t_step = time.perf_counter()
        params = [p for chunk in actor.raw_chunks for p in chunk.parameters()]
        param_bytes = Audit.storage_bytes(params)
        grad_bytes = Audit.storage_bytes([getattr(p, "main_grad", None) for p in params])
        optimizer_bytes = Audit.storage_bytes(_optimizer_tensors(actor.optimizer, exclude=params))
        with audit.measure() as ckpt:
            state = trainer.actor_state.sharded_state_dicts()
        checkpoint_keys = len(state)
        del state
        static_after = audit.live
    seconds = {"build": t_built - t_start, "step": t_step - t_built, "total": time.perf_counter() - t_start}
    result: dict[str, Any] = {
        "rank": rank, "world": world, "tp": tp, "pp": pp, "dp": dp, "dp_rank": dp_rank,
        "pp_rank": par.pp_rank, "tp_rank": par.tp_rank,
        "attention": platform.attention_backend_name(),
        "dtype": str(actor.raw_chunks[0].config.params_dtype).replace("torch.", ""),
        "distributed_optimizer": platform.supports_distributed_optimizer(),
        "param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes,
        "static_before_step": static_before, "static_after_step": static_after,
        "logits_bytes": logits_bytes[0], "checkpoint_peak_above": ckpt.peak_above, "checkpoint_keys": checkpoint_keys,
        "phases": phases, "engine_synced_bytes": engine.synced_bytes, "engine_synced_tensors": engine.synced_tensors,
        "broadcast_buckets": engine.broadcast_buckets, "broadcast_bucket_bytes": engine.broadcast_bucket_bytes,
        "live_at_generate": engine.live_at_generate, "colocation_events": trainer.colocation.events,
        "substitutions": dict(audit.substitutions), "seconds": seconds,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)},
        "param_numel": sum(p.numel() for p in params),
        "hf_numel": sum(math.prod(shape) for shape, _ in substitutes.hf_shapes(cfg.model.hf_dir).values()),
    }
    Path(out_file).write_text(json.dumps(result, indent=1))


def _measured(name: str, fn, audit, phases: dict[str, dict[str, float]]):
    """`fn`, with each call's time added to `phases[name]` and its memory peak above its start
    kept there when it is the largest yet."""

    def wrapped(*args, **kwargs):
        with audit.measure() as m:
            t = time.perf_counter()
            result = fn(*args, **kwargs)
        ph = phases.setdefault(name, {"peak_above": 0, "base": 0, "seconds": 0.0, "calls": 0})
        if m.peak_above >= ph["peak_above"]:
            ph["peak_above"], ph["base"] = m.peak_above, m.base
        ph["seconds"] += time.perf_counter() - t
        ph["calls"] += 1
        return result

    return wrapped


def _store_longest_previous_responses(trainer, cfg, prompts) -> None:
    """SPO with rho from KL drift, in the steady state: every prompt has a previous response of the
    longest length, so the KL-drift pass runs at its worst (and every micro-batch has the same shape,
    which a pipeline needs when stages cannot exchange shapes, see platform.model_parallel_overrides)."""
    import numpy as np

    store = getattr(trainer.algorithm, "store", None)  # SPO's value store
    if store is None or cfg.algorithm.spo.rho_mode != "kl":
        return
    keys = np.array(sorted({p.key for p in prompts}), dtype=np.int64)
    longest = cfg.rollout.max_response_tokens
    store.store_responses(keys, [[7] * longest] * len(keys), [[-1.0] * longest] * len(keys))


def _largest_logits_bytes(actor) -> list[int]:
    """A one-item list that forward hooks on the last stage's output layer keep at the size, in
    bytes, of the largest logits tensor made so far."""
    logits_bytes = [0]
    for chunk in actor.raw_chunks:
        if getattr(chunk, "output_layer", None) is not None and chunk.post_process:
            chunk.output_layer.register_forward_hook(
                lambda mod, inp, out: logits_bytes.__setitem__(
                    0, max(logits_bytes[0], out[0].numel() * out[0].element_size())))
    return logits_bytes


class _MeasuredLoss:
    """The trainer's objective, with the peak of its own buffers (log-softmax over the vocabulary
    shard, entropy, ratios) measured on each call."""

    def __init__(self, objective, audit, phases):
        self.objective, self.audit, self.phases = objective, audit, phases

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, logits, mb):
        with self.audit.measure() as m:
            out = self.objective(logits, mb)
        ph = self.phases.setdefault("loss buffers (log-probs, entropy, ratios)",
                                    {"peak_above": 0, "base": 0, "seconds": 0.0, "calls": 0})
        ph["peak_above"] = max(ph["peak_above"], m.peak_above)
        ph["calls"] += 1
        return out


def _optimizer_tensors(optimizer, *, exclude) -> list:
    """Tensors the optimizer owns: its state (Adam moments) and master weights that are not the
    model's own parameters, across Megatron's wrappers (chained / mixed-precision / distributed)."""
    import torch

    excluded = {t.untyped_storage()._cdata for t in exclude}
    found = []
    stack = [optimizer]
    seen = set()
    while stack:
        opt = stack.pop()
        if id(opt) in seen:
            continue
        seen.add(id(opt))
        stack.extend(getattr(opt, "chained_optimizers", []) or [])
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            stack.append(inner)
        if isinstance(opt, torch.optim.Optimizer):
            for group in opt.param_groups:
                found.extend(p for p in group["params"] if p.untyped_storage()._cdata not in excluded)
            for state in opt.state.values():
                found.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return found


# ----------------------------------------------------------------------------- the driver


def dry_run(config_path: str | None, overrides: list[str], *, out=sys.stdout) -> int:
    """`train --dry-run`: every role in its own process, then the plan; returns the exit code."""
    from megatron_spo.dry_run.plan import MemoryPlan

    with tempfile.TemporaryDirectory(prefix="megatron-spo-dry-run-") as tmp:
        workdir = Path(tmp)
        cfg, data, notes, rollout_ranks = prepare_config(config_path, overrides, workdir)
        world, tp, pp, dp = _layout(cfg, rollout_ranks)
        import yaml

        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(data, sort_keys=False))
        print(f"dry run: {cfg.dry_run.nodes} node(s) x {cfg.dry_run.gpus_per_node} GPUs of "
              f"{cfg.dry_run.gpu_memory_gib:g} GiB = world {world + rollout_ranks}: "
              + (f"{world} trainer ranks (" if rollout_ranks else "") + f"TP {tp} x PP {pp} x DP {dp}"
              + (f") + {rollout_ranks} rollout ranks" if rollout_ranks else "")
              + f", rollout TP {cfg.rollout.engine.tensor_parallel_size}", file=out, flush=True)
        for note in notes:
            print(f"  {note}", file=out)
        results = []
        for rank, role in role_ranks(world, tp, pp, value_store=cfg.algorithm.name == "spo").items():
            result_file = workdir / f"rank{rank}.json"
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "megatron_spo.dry_run.runner", str(config_file), str(rank), str(result_file),
                 str(rollout_ranks)],
                capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if proc.returncode != 0:
                print(proc.stdout[-4000:], file=out)
                reason = _last_error_line(proc.stderr)
                print(proc.stderr[-8000:], file=sys.stderr)
                raise UserError(f"dry run failed on rank {rank} ({role}): {reason}")
            result = json.loads(result_file.read_text())
            result["role"] = role
            result["wall_seconds"] = time.perf_counter() - t
            results.append(result)
            print(f"  rank {rank} ({role}): ok in {result['wall_seconds']:.1f} s", file=out, flush=True)
        plan = MemoryPlan.from_results(cfg, results, rollout_ranks=rollout_ranks)
        print(plan.render(), file=out)
        over = plan.over_budget()
        if cfg.dry_run.report_file:
            from megatron_spo import atomic

            atomic.write_json(Path(cfg.dry_run.report_file), {
                "roles": results, "over_budget": over, "notes": notes,
                "plan": {r.rank: {"items": r.items, "phases": {k: v[0] for k, v in r.phases.items()}} for r in plan.roles},
            })
        if over and cfg.dry_run.require_fit:
            raise UserError(over)
    return 0


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line:
            return line.strip().removeprefix("[rank0]: ")
    return lines[-1] if lines else "no output"


if __name__ == "__main__":
    run_role(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
