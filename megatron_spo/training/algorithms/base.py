"""The algorithm protocol: what the trainer asks of an RL algorithm, and what it gives it.

`Trainer.train_step` is the same story for every algorithm:

    prompts  = algorithm.choose_prompts(order)          which prompts this step trains on
    algorithm.before_generation(ctx, prompts)           e.g. read p_hat, estimate Q0
    (the actor's weights go to the engine)
    rollout  = algorithm.generate(ctx, prompts)         this rank's sequences, scored
    old      = actor log-probs, if algorithm.needs_old_logprobs(...)
    algorithm.after_old_logprobs(ctx, rollout, old)     e.g. SPO-chain's continuations
    batch, advantages = algorithm.prepare(ctx, rollout, batch, old)   the objective's inputs
    (the actor trains on `batch` with algorithm.objective)
    metrics  = algorithm.after_update(ctx, rollout)     e.g. SPO's value-store update

An algorithm subclasses `Algorithm` (or implements the same members) and is given to the trainer
by `algorithms.build` from the config, or directly (`TrainerParts.algorithm`): the trainer has no
algorithm-specific code. What an algorithm may touch during a step comes in the `StepContext`:
the engine, the scorer, the placement of generation over ranks, collectives over data-parallel
ranks, and forward-only log-probs; what it must keep across steps it returns from `state_dict`
(small, per rank) and `sharded_state` (directories written collectively, e.g. the value store),
which the checkpoint saves and restores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from megatron_spo.training.batch import TrainBatch
from megatron_spo.training.rollouts import Prompt, Rollout, Sampling, step_seed


@dataclasses.dataclass(kw_only=True)
class StepContext:
    """What an algorithm may use during one step (the trainer builds one per step)."""

    step: int
    """Steps completed before this one."""
    seed: int
    """The run's seed."""
    dp: int
    """Data-parallel size: the global batch is split over this many model replicas."""
    dp_rank: int
    rank: int = 0
    """This process's global rank."""
    tokenizer: Any
    engine: Any
    """The rollout engine (`rollout.types.RolloutEngine`), awake and synced with the actor."""
    scorer: Any
    """The scoring pool (`rollout.scoring.ScoringPool`)."""
    plan: Callable[[Sequence[int | None]], Any]
    """`plan(owners)` -> this rank's `rollout.placement.Plan` for positions trained by these DP
    ranks (None: every rank needs the result)."""
    exchange: Callable[[dict, Any], dict]
    """`exchange(held, route)`: move per-position results along a `Route` (collective)."""
    dp_group: Any = None
    """CPU group over the data-parallel ranks (None at DP 1)."""
    logprobs: Callable[[Any, TrainBatch], torch.Tensor]
    """`logprobs(model, batch)` -> (N, T - 1) forward-only log-probs at the loss temperature."""
    actor: Any
    reference: Any = None
    """The frozen initial policy, when the algorithm needs one."""
    load_engine_weights: Callable[[Any], None] | None = None
    """Load other weights (named HF tensors) into the engine and make it ready to generate; the
    trainer syncs the actor back before its own generation."""
    pad_id: int = 0

    def seeds(self, count: int, salt: int = 0) -> list[int]:
        """Sampling seeds of positions 0..count-1 of this step: independent of how the batch is
        split over ranks, so a resumed run repeats an uninterrupted one."""
        return [step_seed(self.seed + salt, self.step, i) for i in range(count)]

    def distributed_rollout(self, batch_size: int, make: Callable[[list[int]], Rollout]) -> Rollout:
        """This DP rank's sequences for positions 0..batch_size-1 (DP rank d trains positions
        d, d + dp, ...): `make(positions)` generates the positions this rank's engine runs, and
        the results travel to the ranks of the replica that trains on them."""
        plan = self.plan([i % self.dp for i in range(batch_size)])
        rollout = make(plan.generate)
        parts = self.exchange(rollout.split(plan.generate), plan.results)
        return Rollout.concat([parts[i] for i in sorted(parts)])

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (a copy; the tensor itself at DP 1)."""
        return self._all_reduce(tensor, torch.distributed.ReduceOp.SUM)

    def reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, torch.distributed.ReduceOp.MAX)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.dp > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=op, group=self.dp_group)
        return tensor


@dataclasses.dataclass(kw_only=True)
class AlgorithmSetup:
    """What `build` needs to make an algorithm from the config, besides the config itself."""

    prompts: list[Prompt]
    tokenizer: Any
    tp_group: Any = None
    """The tensor-parallel group of the vocabulary-parallel log-softmax (None: Megatron's)."""
    dp_group: Any = None
    """CPU group over data-parallel ranks (None at DP 1), for sharded algorithm state."""
    dp: int = 1
    dp_rank: int = 0


class Algorithm:
    """The protocol, with the defaults most algorithms share (n responses per prompt from the
    data order, old log-probs always, no reference, no state). Subclasses set `name`,
    `sampling`, `objective` and implement `prepare`."""

    name: str = "algorithm"
    n: int = 1
    """Responses per prompt."""
    sampling: Sampling
    """How it samples; the loss reads log-probs at `loss_temperature`."""
    objective: Any
    """`objective(logits, batch: TrainBatch) -> (loss_sum, count, metric sums)`, with a
    `REPORTED` map from metric sums to reported names (`training.objectives`)."""
    needs_reference: bool = False
    keeps_engine_after_generation: bool = False
    """True when the engine generates again after the old-policy pass (SPO-chain)."""
    train_batch_size: int = 1
    agent: Any = None
    """`rollout.agent_loop.AgentLoopConfig` of the tool agent, or None for single-turn."""

    @property
    def loss_temperature(self) -> float:
        return self.sampling.temperature

    @property
    def prompts_per_step(self) -> int:
        """Prompts of the data order a step consumes (`choose_prompts`); an epoch is a pass over
        the training prompts, so it lasts len(prompts) / prompts_per_step steps."""
        return self.train_batch_size

    def choose_prompts(self, order) -> list[Prompt]:
        """The step's global batch, from `order` (`training.data.PromptOrder`)."""
        return order.take(self.train_batch_size)

    def choose_async_prompts(self, order, count: int, *, exclude) -> list[Prompt]:
        """rollout.mode=async: up to `count` prompts, none of whose keys is in `exclude` (in
        flight); drawn the same on every rank. Only group-free algorithms can stream."""
        from megatron_spo.errors import UserError

        raise UserError(f"rollout.mode=async: algorithm {self.name!r} does not stream; use rollout.mode=sync")

    def before_generation(self, ctx: StepContext, batch: list[Prompt]) -> None:
        """Runs before the actor's weights reach the engine (async mode: when the batch is
        trained, before its update)."""

    def generate(self, ctx: StepContext, batch: list[Prompt]) -> Rollout:
        """`n` scored responses (single turn, or the tool agent) to each prompt this rank trains."""
        from megatron_spo.training import rollouts

        seeds = ctx.seeds(len(batch))
        scorer = rollouts.PromptScorer(ctx.scorer, ctx.tokenizer, [p.answer for p in batch])
        return ctx.distributed_rollout(len(batch), lambda mine: rollouts.generate(
            ctx.engine, ctx.tokenizer, scorer, batch, mine, n=self.n, sampling=self.sampling, seeds=seeds,
            agent_config=self.agent))

    def needs_old_logprobs(self, batch_config) -> bool:
        """Whether the trainer runs the old-policy pass (`batch.old_logprobs` is None otherwise)."""
        return True

    def after_old_logprobs(self, ctx: StepContext, rollout: Rollout, old: torch.Tensor | None,
                           batch_size: int) -> None:
        """Runs after the old-policy pass, with the engine still awake if
        `keeps_engine_after_generation`."""

    def prepare(self, ctx: StepContext, rollout: Rollout, batch: TrainBatch,
                old: torch.Tensor | None) -> tuple[TrainBatch, torch.Tensor | None]:
        """The objective's inputs added to `batch` (which holds the sequences and, where computed,
        old and reference log-probs); also the (N, T - 1) per-token advantages for the step's
        statistics, or None when the algorithm has none."""
        raise NotImplementedError

    def after_update(self, ctx: StepContext, rollout: Rollout) -> dict[str, float]:
        """Runs after the actor update; returns the algorithm's own metrics of the step."""
        return {}

    def state_dict(self) -> dict:
        """Small per-rank state the checkpoint keeps (pickled)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def sharded_state(self) -> dict[str, Any]:
        """Name -> object with `save(directory)` / `load(directory)` (collective) for state too
        large for `state_dict`."""
        return {}


def single_update_on_fresh_samples(batch_config) -> bool:
    """One optimizer step per rollout: the policy is still the old one when the loss runs, so the
    loss takes its own detached log-probs as pi_old and the old-policy pass can be skipped."""
    return batch_config.epochs == 1 and batch_config.train_batch_size == batch_config.mini_batch_size
