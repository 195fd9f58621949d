"""The per-GPU memory plan of a dry run, from what each role measured (`runner.run_role`).

Items are measured as live accelerator bytes (`audit.Audit`): parameters, gradients and optimizer
state are the distinct storages behind the model's parameters, their `main_grad` buffers and the
optimizer's state and master weights; the transient items are peaks above the resident bytes
while that piece of the step ran. The rollout engine is not executed here: vLLM reserves
`rollout.engine.gpu_memory_utilization` of the GPU for its weights, activations and KV cache, and that
reservation is what the plan counts; its weights are the HF checkpoint's parameters in the
engine's dtype, divided over the rollout TP group.

Phases, in the order of a colocated step (`training.colocation`):
- `weight sync`: the actor resident + the export's buffers + the engine's weights (the whole
  reservation when the engine does not sleep);
- `rollout`: what the trainer still held on the GPU while the engine generated (measured at the
  engine's `generate`: the whole actor, or next to nothing with `rollout.offload_actor`) + the
  engine's reservation;
- `training`: the actor resident + the larger of the update and the forward-only log-prob passes
  + the engine's reservation unless it sleeps (`rollout.engine.enable_sleep_mode`, level 2: weights
  and KV cache freed). An asleep vLLM still keeps its CUDA graphs and allocator overhead, which
  this plan does not count.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30

UPDATE = "actor update (forward + backward + optimizer)"
FORWARD = "forward-only log-probs (old / reference / drift)"
EXPORT = "weight export to the engine"
LOSS = "loss buffers (log-probs, entropy, ratios)"

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class RolePlan:
    rank: int
    role: str
    items: dict[str, float]  # name -> bytes
    phases: dict[str, tuple[float, str]]  # phase -> (bytes, largest item)
    seconds: float


@dataclasses.dataclass
class MemoryPlan:
    budget_gib: float
    roles: list[RolePlan]
    header: list[str]
    footer: list[str]

    @classmethod
    def from_results(cls, cfg, results: list[dict], *, rollout_ranks: int = 0) -> "MemoryPlan":
        """The plan of the measured roles; with `rollout_ranks` (disaggregated placement) the
        trainer roles hold no engine and a computed rollout-rank column holds it instead."""
        r0 = results[0]
        roll = cfg.rollout
        eng = roll.engine
        budget = cfg.dry_run.gpu_memory_gib * GIB
        roles = []
        for r in results:
            ph = r["phases"]
            peak = lambda name: float(ph.get(name, {}).get("peak_above", 0))  # noqa: E731
            static = r["static_after_step"]
            other = static - r["param_bytes"] - r["grad_bytes"] - r["optimizer_bytes"]
            loss = peak(LOSS)
            activations = max(peak(UPDATE) - r["logits_bytes"] - loss, 0.0)
            # the whole HF model in the engine's dtype, sharded over the rollout TP group
            engine_weights = r["hf_numel"] * _DTYPE_BYTES.get(eng.dtype, 2) / max(eng.tensor_parallel_size, 1)
            if eng.name == "vllm":
                engine_total = eng.gpu_memory_utilization * budget
            else:
                engine_total = engine_weights
            if rollout_ranks:  # the engine lives on the rollout ranks
                engine_weights = engine_total = 0.0
            items = {
                "parameters (" + r["dtype"] + ")": r["param_bytes"],
                "gradients (fp32 buffer)": r["grad_bytes"],
                "optimizer state + master weights" + (" (DP-sharded)" if r["distributed_optimizer"] else ""):
                    r["optimizer_bytes"],
                "other resident (bridge gather buffers, RoPE)": other,
                "activations, largest micro-batch": activations,
                "logits (b, s, V/tp)": r["logits_bytes"],
                "loss buffers (log-softmax, entropy)": loss,
                "forward-only log-prob pass (peak)": peak(FORWARD),
                "weight export buffers (peak)": peak(EXPORT),
                "checkpoint state dict (peak)": r["checkpoint_peak_above"],
                "rollout engine: weights": engine_weights,
                "rollout engine: KV cache + activations": max(engine_total - engine_weights, 0.0),
                "trainer's GPU state while the engine generates": r["live_at_generate"],
            }
            training_extra = max(peak(UPDATE), peak(FORWARD))
            sleeps = eng.enable_sleep_mode
            engine_at_sync = engine_weights if sleeps else engine_total
            engine_training = 0.0 if sleeps else engine_total
            phases = {
                "weight sync": (static + peak(EXPORT) + engine_at_sync,
                                _largest({**_resident(items), "weight export buffers": peak(EXPORT),
                                          "rollout engine: weights" if sleeps else "rollout engine (reserved)":
                                              engine_at_sync})),
                "rollout": (r["live_at_generate"] + engine_total,
                            _largest({"rollout engine (reserved)": engine_total,
                                      "trainer's GPU state while the engine generates" + (
                                          "" if roll.offload_actor else " (the actor, not offloaded)"):
                                          r["live_at_generate"]})),
                "training": (static + training_extra + engine_training,
                             _largest({**_resident(items), "activations + logits + loss buffers": peak(UPDATE),
                                       "rollout engine (awake, not asleep)": engine_training})),
            }
            if rollout_ranks:
                items["weight broadcast bucket"] = float(r["broadcast_bucket_bytes"])
            roles.append(RolePlan(r["rank"], r["role"], items, phases, r["wall_seconds"]))
        if rollout_ranks:
            roles.append(_rollout_rank_plan(cfg, results, rollout_ranks, budget, list(roles[0].items)))
        header = _header(cfg, r0)
        subs: dict[str, int] = {}
        for r in results:
            for k, v in r["substitutions"].items():
                subs[k] = subs.get(k, 0) + v
        footer = ["collectives: data from other ranks is taken to equal this rank's (fake process group); with "
                  "PP > 1 the export plan other stages send is this stage's, so export buffers are approximate"]
        if eng.enable_sleep_mode and eng.name == "vllm":
            footer.append("an asleep vLLM engine is counted as 0 GiB: its CUDA graphs and allocator overhead are not in this plan")
        if subs:
            footer.append("substituted (a GPU value read back on the host; the step continued with the stand-in):")
            footer += [f"  {count:4d} x {what}" for what, count in sorted(subs.items(), key=lambda kv: -kv[1])[:12]]
            if len(subs) > 12:
                footer.append(f"  ... and {len(subs) - 12} more sites")
        return cls(cfg.dry_run.gpu_memory_gib, roles, header, footer)

    def render(self) -> str:
        names = list(self.roles[0].items)
        width = max(len(n) for n in names + ["phase peak: training"]) + 2
        cols = [f"rank {r.rank}" for r in self.roles]
        lines = list(self.header)
        lines.append("".ljust(width) + "".join(c.rjust(12) for c in cols))
        for name in names:
            lines.append(name.ljust(width) + "".join(f"{r.items[name] / GIB:12.2f}" for r in self.roles))
        for phase in self.roles[0].phases:
            row = f"phase peak: {phase}".ljust(width)
            for r in self.roles:
                value = r.phases[phase][0] / GIB
                row += f"{value:11.2f}{'!' if value > self.budget_gib else ' '}"
            lines.append(row)
        lines.append("seconds".ljust(width) + "".join(f"{r.seconds:12.1f}" for r in self.roles))
        for r in self.roles:
            lines.append(f"rank {r.rank}: {r.role}")
        over = self.over_budget()
        lines.append(f"DOES NOT FIT: {over}" if over else f"fits: every phase of every role within {self.budget_gib:g} GiB")
        lines += self.footer
        return "\n".join(lines)

    def over_budget(self) -> str | None:
        """One line naming the phase most over the budget and its largest item, or None."""
        worst = max(((value, phase, largest, r.rank) for r in self.roles
                     for phase, (value, largest) in r.phases.items()), default=None)
        if worst is None or worst[0] <= self.budget_gib * GIB:
            return None
        value, phase, largest, rank = worst
        return (f"phase '{phase}' on rank {rank} needs {_gib(value)} GiB > {self.budget_gib:g} GiB "
                f"(dry_run.gpu_memory_gib); largest item: {largest}")


def _header(cfg, r0: dict) -> list[str]:
    """The plan's first lines: how it was measured, the layer spec, optimizer, engine, colocation."""
    eng, roll = cfg.rollout.engine, cfg.rollout
    return [
        f"memory plan per GPU (GiB; budget {cfg.dry_run.gpu_memory_gib:g}), measured from live accelerator tensors "
        f"on the simulated ranks",
        f"layer spec: {'Transformer Engine' if r0['attention'] == 'transformer-engine' else 'local (torch-native; Transformer Engine is not importable without CUDA): norms and activations unfused, an upper bound on TE'}; "
        f"attention counted as flash attention (no T x T scores)",
        f"optimizer: {'Megatron distributed (state sharded over DP ' + str(r0['dp']) + ')' if r0['distributed_optimizer'] else 'Megatron (unsharded)'}; "
        f"rollout engine {eng.name}: " + (f"reserves gpu_memory_utilization {eng.gpu_memory_utilization:g} of the GPU "
                                             f"(not executed; from the config)" if eng.name == "vllm" else "weights only"),
        f"colocation: engine sleeps while the actor trains: {'yes' if eng.enable_sleep_mode else 'NO (rollout.engine.enable_sleep_mode)'}; "
        f"actor offloaded while the engine generates: {'yes' if roll.offload_actor else 'NO (rollout.offload_actor)'}",
    ]


def _rollout_rank_plan(cfg, results: list[dict], rollout_ranks: int, budget: float, names: list[str]) -> RolePlan:
    """The first rollout rank of a disaggregated job, counted (not executed): the engine (its
    weights, and vLLM's reservation) and the largest weight bucket it receives."""
    eng = cfg.rollout.engine
    weights = results[0]["hf_numel"] * _DTYPE_BYTES.get(eng.dtype, 2)
    total = eng.gpu_memory_utilization * budget if eng.name == "vllm" else weights
    bucket = float(max(r["broadcast_bucket_bytes"] for r in results))
    items = {name: 0.0 for name in names}
    items.update({"rollout engine: weights": weights, "rollout engine: KV cache + activations": max(total - weights, 0.0),
                  "weight broadcast bucket": bucket})
    engine = "rollout engine (reserved)"
    phases = {"weight sync": (total + bucket, _largest({engine: total, "weight broadcast bucket": bucket})),
              "rollout": (total, _largest({engine: total})),
              "training": (total, _largest({engine: total}))}
    trainers = cfg.dry_run.world_size - rollout_ranks
    return RolePlan(trainers, f"rollout rank (first of {rollout_ranks}): the engine only; counted from the config, "
                              "not executed", items, phases, 0.0)


def _resident(items: dict[str, float]) -> dict[str, float]:
    keep = ("parameters", "gradients", "optimizer", "other resident")
    return {k: v for k, v in items.items() if k.startswith(keep)}


def _largest(items: dict[str, float]) -> str:
    name, value = max(items.items(), key=lambda kv: kv[1])
    return f"{name} ({_gib(value)} GiB)"


def _gib(nbytes: float) -> str:
    """Bytes as GiB, one decimal, or two significant digits below 0.1 GiB (tiny models)."""
    gib = nbytes / GIB
    return f"{gib:.1f}" if gib >= 0.1 else f"{gib:.2g}"
