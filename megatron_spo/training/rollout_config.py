"""`rollout:` of the train config: how sequences are generated, scored, and (in async mode) streamed.

`rollout.mode: sync` (the default) generates each step's batch to its last token, then trains.
`rollout.mode: async` streams (`training.async_rollout`): the engine keeps `max_inflight`
sequences generating in a background thread, refilling a slot as soon as a sequence finishes,
while the trainer trains on finished trajectories; a trajectory is trained at most
`max_staleness` policy versions after the version that started it, and tokens sampled by an
older policy are reweighted against their behaviour log-probs (`off_policy_correction`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_spo.errors import UserError
from megatron_spo.rollout.engine import EngineConfig
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.rollout.sandbox import SandboxConfig
from megatron_spo.rollout.weight_sync import WeightSyncConfig


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """The rollout engine: name (`hf`, transformers, the CPU default; or `vllm`), dtype, context
    and batch limits, rollout TP, memory and sleep (colocation) settings. Its model is
    model.hf_dir and its seed the run's `seed` (`engine_config` fills them in)."""
    n: int | None = None
    """Responses per prompt. None = the algorithm's: 1 for spo (single stream), 8 for grpo (the
    authors' GRPO baseline), 1 for the others. Resolved when the config is built."""
    temperature: float = 1.0
    """Training sampling temperature (the authors' / verl default: sample the policy itself)."""
    top_p: float = 1.0
    """Training nucleus mass; 1.0 = off (on-policy sampling)."""
    top_k: int = -1
    """Training top-k; -1 = off."""
    max_response_tokens: int = 16384
    """New tokens per response at most (the authors' 16k for Qwen3-8B)."""
    agent: Literal["single_turn", "tool"] = "single_turn"
    """single_turn: one completion per prompt; tool: the ReTool-style code-interpreter loop."""
    max_assistant_turns: int = 8
    """tool agent: assistant turns per trajectory at most (the authors' 8)."""
    max_tool_response_tokens: int = 256
    """tool agent: interpreter output is truncated to this many tokens (the authors' 256)."""
    max_concurrent_tools: int = 8
    """tool agent: sandbox executions running at once on each rank (threads, each driving a
    sandbox process); more when tool calls mostly wait (I/O, slow services) rather than compute."""
    offload_actor: bool = False
    """Colocation: the actor's (and the reference's) weights, gradients and optimizer state go
    to host memory while the engine generates, and come back before the actor computes (verl's
    param / grad / optimizer offload): the KV cache gets the actor's static memory, for a
    device-host round trip of that state each step. Bit-exact."""
    mode: Literal["sync", "async"] = "sync"
    """sync: each step generates its batch to the last token, then trains. async: generation
    streams in the background and the trainer takes finished trajectories (`training.async_rollout`;
    algorithm spo, or grpo with its group barrier in the buffer; one rank per model replica,
    engine TP 1)."""
    max_inflight: int = 256
    """async: sequences the engine decodes at once; a finished one frees its slot for the next
    queued prompt (continuous batching)."""
    max_staleness: int = 0
    """async: a trajectory is trained at most this many policy versions after the version that
    sampled its first token; older ones are dropped (counted) and their prompt released. 0 =
    on-policy: trains exactly as `mode: sync`."""
    partial_rollout: bool = False
    """async: at a weight update, true lets in-flight sequences finish under the new weights (each
    token's version is recorded); false aborts them and generates them again from their prompt
    under the new weights (the tokens so far are discarded and counted), so every trajectory
    comes from one policy."""
    off_policy_correction: Literal["decoupled", "tis", "none"] = "tis"
    """async: weight of a token sampled by an older policy than the step's proximal one (the
    actor before the update): tis, min(pi_prox / pi_behav, is_cap) (truncated importance
    sampling, verl's and AReaL's async recipes); decoupled, the uncapped ratio (decoupled PPO,
    Hilton et al. 2022, AReaL); none, 1. Tokens sampled by the current policy weigh 1."""
    is_cap: float = 2.0
    """async, tis: the cap C of the truncated importance weight."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """How responses are scored (math grader by default)."""
    weight_sync: WeightSyncConfig = dataclasses.field(default_factory=WeightSyncConfig)
    """Actor -> engine weight transfer."""
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    """Code execution for the tool agent."""

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for RL sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_response_tokens < 1 or self.max_assistant_turns < 1 or self.max_tool_response_tokens < 1 \
                or self.max_concurrent_tools < 1:
            raise ValueError("max_response_tokens, max_assistant_turns, max_tool_response_tokens and "
                             "max_concurrent_tools must be >= 1")
        if self.max_inflight < 1:
            raise UserError(f"rollout.max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_staleness < 0:
            raise UserError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.is_cap <= 0:
            raise UserError(f"rollout.is_cap must be > 0, got {self.is_cap}")

    def engine_config(self, model_dir: str, *, seed: int = 0, load_weights: bool = True) -> EngineConfig:
        """The complete `EngineConfig`: the `engine` section with the program's model directory
        (model.hf_dir), seed and whether to load weights filled in."""
        return dataclasses.replace(self.engine, model=model_dir, seed=seed, load_weights=load_weights)


def check_async(config) -> None:
    """Refuse `rollout.mode: async` where this release does not stream (one line each)."""
    r = config.rollout
    if config.parallel.rollout_ranks and r.mode != "async":
        raise UserError(f"parallel.rollout_ranks={config.parallel.rollout_ranks}: rollout-only ranks stream while the "
                        "trainer trains, which needs rollout.mode=async (a synchronous step would leave one side idle)")
    if r.mode != "async":
        return
    if config.algorithm.name not in ("spo", "grpo"):
        raise UserError(f"rollout.mode=async: algorithm {config.algorithm.name!r} does not stream: its samples are "
                        "built from continuations or trees of one policy; use spo or grpo, or rollout.mode=sync")
    if config.parallel.tp != 1 or config.parallel.pp != 1 or r.engine.tensor_parallel_size != 1:
        raise UserError("rollout.mode=async: each rank streams its own trajectories, so it needs parallel.tp=1, "
                        "parallel.pp=1 and rollout.engine.tensor_parallel_size=1 (data parallelism is fine)")
    if r.offload_actor or r.engine.enable_sleep_mode:
        raise UserError("rollout.mode=async: the engine generates while the actor trains, so neither can give its "
                        "memory to the other: set rollout.offload_actor=false and rollout.engine.enable_sleep_mode=false")
    if config.algorithm.name == "spo" and \
            config.algorithm.spo.gen_batch_size < config.batch.train_batch_size * (r.max_staleness + 2):
        raise UserError(f"rollout.mode=async: algorithm.spo.gen_batch_size ({config.algorithm.spo.gen_batch_size}) must "
                        f"be >= batch.train_batch_size x (rollout.max_staleness + 2) = "
                        f"{config.batch.train_batch_size * (r.max_staleness + 2)}: prompts in flight are not drawn "
                        "again, so a pool must still hold a batch besides them")


def check_rollout_ranks(config, world_size: int) -> int:
    """Refuse a `parallel.rollout_ranks` placement that cannot be laid out on `world_size` ranks
    (one line each); return the trainers' world (world_size - rollout_ranks)."""
    k = config.parallel.rollout_ranks
    if not k:
        return world_size
    trainers = world_size - k
    if trainers != k:
        raise UserError(f"parallel.rollout_ranks={k} on a world of {world_size} ranks leaves {trainers} trainer ranks: "
                        f"each trainer rank streams from one rollout rank of its own, so launch 2 x {k} = {2 * k} "
                        f"ranks (or set parallel.rollout_ranks={world_size // 2} on an even world)")
    return trainers
