"""The RL training loop, the same for every algorithm.

One step, on every rank (SPMD under torchrun):

    choose the step's prompts                  (the algorithm: value store, or the data order)
    algorithm's pre-generation work            (e.g. read p_hat; soft SPO: Q0 from the reference)
    sync the actor's weights into the engine
    generate and score this rank's sequences   (the algorithm; `training.rollouts`)
    old-policy (and reference) log-probs
    the objective's inputs                     (the algorithm: advantages, masks, soft values)
    update the actor                           (`training.update`: mini-batches x epochs)
    algorithm's post-update work               (e.g. SPO: KL drift -> rho -> posterior update)
    step metrics -> periodic evaluation -> checkpoint

An algorithm is one object behind the protocol of `training.algorithms.base`; the trainer knows
none by name. Prompts of a step are split over data-parallel ranks (DP rank d trains on positions
d, d + dp, ...); each prompt is generated once, by one rollout group (an engine over
`rollout.engine.tensor_parallel_size` consecutive ranks), and its sequences are sent to every rank
of the model replica that trains on it (`rollout.placement`). Sampling seeds derive from (seed,
step, prompt position), so generation does not depend on how the batch is split, and a resumed
run repeats an uninterrupted one exactly (`training.checkpointing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from megatron_spo import platform
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import load_tokenizer
from megatron_spo.training.batch import TrainBatch, pad_right
from megatron_spo.training.config import TrainConfig
from megatron_spo.training.rollouts import Prompt


@dataclasses.dataclass(kw_only=True)
class TrainerParts:
    """Components a caller supplies instead of the ones `Trainer` builds from the config (tests,
    the GPU dry run: no tokenizer, data or weights on disk, no engine). None = from the config."""

    tokenizer: Any = None
    prompts: list[Prompt] | None = None
    load_model: Callable | None = None
    """(path, parallel, dtype=, seed=[, recompute=, sequence_parallel=]) -> (spec, chunks, bridge);
    default `load_pretrained`."""
    engine: Any = None
    """A rollout engine (`rollout.types.RolloutEngine`); default `make_engine(rollout.engine)`."""
    scorer: Any = None
    """A scoring pool (`score(texts, answers)`, `close()`); default `ScoringPool(rollout.reward)`."""
    algorithm: Any = None
    """An algorithm object (`training.algorithms.base`), or a callable taking an
    `AlgorithmSetup` and returning one; default `algorithms.build(config, setup)`."""
    rollout_standalone: bool = False
    """No peer ranks exist (the dry run's simulated rank): this rank generates everything its
    replica trains on itself, and no rollout results are exchanged."""


class Trainer:
    """Builds every component from a TrainConfig (or takes them from `parts`) and runs steps."""

    def __init__(self, config: TrainConfig, *, parts: TrainerParts | None = None):
        from megatron_spo.models.checkpoint import hf_side_dir_of
        from megatron_spo.rollout.scoring import ScoringPool
        from megatron_spo.training.data import PromptOrder

        parts = parts or TrainerParts()
        self.config = cfg = config
        self.dp = cfg.check_world_size(platform.launch_world_size())
        self.parallel = par = platform.init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp,
                                                        rollout_ranks=cfg.parallel.rollout_ranks)
        self.is_main = par.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self._lock, self._continues = _claim_run_dir(cfg, par)
        self.side_dir = hf_side_dir_of(cfg.model.hf_dir)
        self.tokenizer = parts.tokenizer or load_tokenizer(str(self.side_dir))
        self.prompts = parts.prompts if parts.prompts is not None else self._load_prompts()
        self.order = PromptOrder(self.prompts, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.algorithm = self._build_algorithm(parts.algorithm)
        self.total_steps = cfg.run_steps(len(self.prompts), self.algorithm.prompts_per_step)
        self._build_models(parts.load_model)
        self.engine = parts.engine or self._make_engine()
        self.placement = self._rollout_placement(parts.rollout_standalone)
        self.colocation = self._colocation()
        self.scorer = parts.scorer or ScoringPool(cfg.rollout.reward)
        self.step = 0
        self.generated_tokens = 0
        self.checkpointer = self._checkpointer()
        self._resume()
        self.logger = self._make_logger()
        self._eval_records = None
        self.async_rollouts = self._start_async() if cfg.rollout.mode == "async" else None

    # ------------------------------------------------------------------ setup

    def _load_prompts(self) -> list[Prompt]:
        from megatron_spo.training.data import load_prompts

        d = self.config.data
        prompts, skipped = load_prompts(d.train_files, d.prompt_key, d.answer_key, self.tokenizer, d.prompt)
        if skipped and self.is_main:
            print(f"data: {skipped} of {skipped + len(prompts)} prompts skipped: longer than "
                  f"data.prompt.max_prompt_tokens={d.prompt.max_prompt_tokens}", flush=True)
        return prompts

    def _build_algorithm(self, given):
        from megatron_spo.training import algorithms
        from megatron_spo.training.algorithms.base import AlgorithmSetup

        par = self.parallel
        setup = AlgorithmSetup(prompts=self.prompts, tokenizer=self.tokenizer, tp_group=par.tp_group,
                               dp_group=par.host_dp_group if self.dp > 1 else None, dp=self.dp, dp_rank=par.dp_rank)
        if given is None:
            return algorithms.build(self.config, setup)
        return given(setup) if callable(given) and not hasattr(given, "prepare") else given

    def _build_models(self, load_model) -> None:
        from megatron_spo.models.checkpoint import load_pretrained
        from megatron_spo.training.actor import Actor

        cfg, par = self.config, self.parallel
        load_model = load_model or load_pretrained
        dtype = platform.resolve_dtype(cfg.model.dtype)
        sp = cfg.parallel.sequence_parallel_enabled
        spec, chunks, bridge = load_model(cfg.model.hf_dir, par, dtype=dtype, seed=cfg.seed,
                                          recompute=cfg.parallel.recompute, sequence_parallel=sp)
        self.actor = Actor(spec, chunks, bridge, par, cfg.optimizer, total_steps=cfg.optimizer_steps(self.total_steps))
        self.reference = None
        if self.algorithm.needs_reference:
            from megatron_spo.training.reference import ReferenceModel

            self.reference = ReferenceModel(cfg.model.hf_dir, par, dtype=dtype, seed=cfg.seed, load=load_model,
                                            sequence_parallel=sp)

    def _make_engine(self):
        """This rank's engine; with parallel.rollout_ranks, a handle on its rollout rank's
        (`rollout.remote`: the job's rank (trainer ranks) + i serves trainer rank i)."""
        from megatron_spo.rollout.engine import make_engine
        from megatron_spo.rollout.remote import RemoteEngine

        cfg = self.config
        if cfg.parallel.rollout_ranks:
            return RemoteEngine(platform.rollout_channels(cfg.parallel.rollout_ranks), cfg.rollout.weight_sync)
        return make_engine(cfg.rollout.engine_config(str(self.side_dir), seed=cfg.seed, load_weights=False))

    def _rollout_placement(self, standalone: bool):
        """Rollout groups of `rollout.engine.tensor_parallel_size` ranks (one engine each) and the
        actor replicas they serve, checked against Megatron's own rank layout."""
        from megatron_spo.rollout.placement import RolloutPlacement

        par = self.parallel
        placement = RolloutPlacement.build(
            par.world_size, self.config.rollout.engine.tensor_parallel_size, tp=par.tp, pp=par.pp,
            spmd=getattr(self.engine, "spmd", False), standalone=standalone)
        if placement.replicas[par.dp_rank][par.pp_rank * par.tp + par.tp_rank] != par.rank:
            raise RuntimeError(f"rank {par.rank} (tp {par.tp_rank}, dp {par.dp_rank}, pp {par.pp_rank}) is not where "
                               "rollout.placement expects Megatron's tp-dp-pp rank order to put it")
        return placement

    def _colocation(self):
        from megatron_spo.training.colocation import Colocation
        from megatron_spo.training.offload import ModelOffloader

        models = [ModelOffloader(self.actor.chunks, self.actor.optimizer, caches=[self.actor.bridge])]
        if self.reference is not None:
            models.append(ModelOffloader(self.reference.chunks, caches=[self.reference.bridge]))
        roll = self.config.rollout
        return Colocation(self.engine, models, sleep_engine=roll.engine.enable_sleep_mode,
                          offload_models=roll.offload_actor)

    def _checkpointer(self):
        from megatron_spo.training.checkpointing import ActorState, Checkpointer, RNGState

        self.actor_state, self._rng_state = ActorState(self.actor, self.side_dir), RNGState()
        return Checkpointer(self.config.checkpoint_dir, self.parallel, keep_last=self.config.checkpoint.keep_last)

    def _stateful(self) -> tuple[dict, dict]:
        """(sharded, small) parts of a checkpoint."""
        sharded = {"actor": self.actor_state, **self.algorithm.sharded_state()}
        small = {"actor": self.actor_state, "order": self.order, "algorithm": self.algorithm, "rng": self._rng_state}
        return sharded, small

    def _resume(self) -> None:
        if not self._continues:
            return
        sharded, small = self._stateful()
        info = self.checkpointer.load_latest(sharded=sharded, small=small)
        if info is None:
            return
        self.step, self.generated_tokens = info["step"], info["generated_tokens"]
        if self.is_main:
            print(f"resumed from {info['path']} at step {self.step}", flush=True)

    def _make_logger(self):
        from megatron_spo.config import to_dict
        from megatron_spo.training.metrics import MetricsLogger

        log = self.config.logging
        return MetricsLogger(
            self.run_dir, jsonl=log.metrics_jsonl, tensorboard=log.tensorboard, wandb=log.wandb,
            wandb_project=log.wandb_project, wandb_run_name=log.wandb_run_name,
            config=to_dict(self.config), enabled=self.is_main,
            # a continued run's rows after its checkpoint (all, before the first) are dropped
            resume_step=(self.step or -1) if self._continues else None,
        )

    # ------------------------------------------------------------------ the step

    def context(self):
        """What the algorithm may use during the current step."""
        from megatron_spo.rollout.placement import exchange
        from megatron_spo.training.algorithms.base import StepContext

        par = self.parallel
        return StepContext(
            step=self.step, seed=self.config.seed, dp=self.dp, dp_rank=par.dp_rank, rank=par.rank,
            tokenizer=self.tokenizer, engine=self.engine, scorer=self.scorer,
            plan=lambda owners: self.placement.plan(owners, par.rank),
            exchange=lambda held, route: exchange(held, route, par.rank, par.host_group),
            dp_group=par.host_dp_group if self.dp > 1 else None, logprobs=self.logprobs,
            actor=self.actor, reference=self.reference, load_engine_weights=self._load_engine_weights,
            pad_id=self.tokenizer.pad_token_id or 0)

    def logprobs(self, model, batch: TrainBatch) -> torch.Tensor:
        """Forward-only (N, T - 1) log-probs, batched like the update (token budget or rows), at
        the algorithm's loss temperature."""
        if len(batch) == 0:
            return torch.zeros(0, batch.input_ids.shape[1] - 1)
        b = self.config.batch
        return model.logprobs(batch.input_ids, micro_batch_size=b.micro_batch_size,
                              temperature=self.algorithm.loss_temperature, lengths=batch.lengths,
                              max_tokens=b.max_tokens_per_micro_batch)["logprobs"]

    def _load_engine_weights(self, named_tensors):
        from megatron_spo.rollout.weight_sync import sync_weights

        self.colocation.for_sync()
        result = sync_weights(self.engine, named_tensors, self.config.rollout.weight_sync)
        self.colocation.for_generation()
        return result

    def train_step(self) -> dict[str, float]:
        from megatron_spo.training import step_metrics
        from megatron_spo.training.update import mini_batch_of, update_actor

        algo, cfg, ctx = self.algorithm, self.config, self.context()
        t0 = time.perf_counter()
        if self.async_rollouts is None:
            prompts = algo.choose_prompts(self.order)
            algo.before_generation(ctx, prompts)
            sync = self._load_engine_weights(self.actor.export_hf())
            t_gen = time.perf_counter()
            rollout = algo.generate(ctx, prompts)
            gen_seconds = time.perf_counter() - t_gen  # generation and grading only, not the old pass
            self.colocation.for_training(keep_engine=algo.keeps_engine_after_generation)
            taken = None
        else:
            taken, rollout, prompts, gen_seconds = self._take_async()
            algo.before_generation(ctx, prompts)  # p_hat when the trajectory is trained
        batch = TrainBatch.from_rollout(rollout, ctx.pad_id)
        stale = None if taken is None else self._stale_tokens(taken, rollout, batch)
        # every rank agrees on the old pass (its metrics are collective), stale tokens on any rank or none
        any_stale = stale is not None and ctx.reduce_max(torch.tensor([float(stale.any())]))[0].item() > 0
        needs_old = algo.needs_old_logprobs(cfg.batch) or any_stale
        old = self.logprobs(self.actor, batch) if needs_old else None
        if algo.keeps_engine_after_generation:
            t_more = time.perf_counter()
            algo.after_old_logprobs(ctx, rollout, old, len(prompts))
            gen_seconds += time.perf_counter() - t_more
            self.colocation.for_training()
        ref = self.logprobs(self.reference, batch) if self.reference is not None else None
        sequences = batch.replace(old_logprobs=None if old is None else pad_right(old),
                                  ref_logprobs=None if ref is None else pad_right(ref))
        train_batch, advantages = algo.prepare(ctx, rollout, sequences, old)
        if stale is not None and old is not None and bool(stale.any()):
            train_batch = train_batch.replace(is_weights=pad_right(self._behaviour_weights(rollout, batch, old, stale)))

        t_train = time.perf_counter()
        owner = mini_batch_of(rollout.prompt_index, cfg.batch.train_batch_size, cfg.batch.mini_batch_size)
        update = update_actor(self.actor, algo.objective, train_batch, owner, cfg.batch, ctx.reduce_sum)
        train_seconds = time.perf_counter() - t_train
        algorithm_metrics = algo.after_update(ctx, rollout)
        if self.async_rollouts is not None:
            sync = self._advance_async()

        self.step += 1
        generated = ctx.reduce_sum(torch.tensor([float(rollout.generated_tokens)]))[0].item()
        self.generated_tokens += int(generated)
        metrics = step_metrics.rollout_metrics(rollout, ctx.reduce_sum)
        metrics.update({
            "rollout/generated_tokens": generated, "rollout/total_generated_tokens": self.generated_tokens,
            "perf/gen_tokens_per_s": generated / max(gen_seconds, 1e-9),
            "perf/train_tokens_per_s": update.pop("tokens", 0.0) / max(train_seconds, 1e-9),
            "perf/weight_sync_s": sync.seconds,
            "perf/colocation_s": self.colocation.take_seconds(),  # offload / onload / sleep / wake
            "perf/weight_sync_gb_per_s": sync.gb_per_s, "perf/step_s": time.perf_counter() - t0,
            "data/epoch": float(self.order.epoch),
        })
        metrics.update(step_metrics.advantage_metrics(advantages, train_batch, ctx.reduce_sum, ctx.reduce_max))
        if old is not None:
            metrics["rollout/logprob_mismatch"] = step_metrics.logprob_mismatch(rollout, batch, old, ctx.reduce_sum)
        if taken is not None:
            metrics.update(self._async_metrics(ctx, taken, stale, time.perf_counter() - t0))
            # generation overlaps training: its rate is the stream's, and the step's wait is its own metric
            metrics["perf/gen_tokens_per_s"] = metrics["async/stream_tokens_per_s"]
            metrics["async/wait_s"] = gen_seconds
        return {**metrics, **update, **algorithm_metrics}

    # ------------------------------------------------------------------ async rollout (rollout.mode=async)

    def _start_async(self):
        """The background stream of `rollout.mode: async` (`training.async_rollout`), once the
        engine holds the actor's weights (version 0)."""
        from megatron_spo.training.async_rollout import AsyncRollouts, LockedScorer

        cfg, par = self.config, self.parallel
        if cfg.batch.train_batch_size % self.dp:
            raise UserError(f"rollout.mode=async: batch.train_batch_size ({cfg.batch.train_batch_size} prompts) must be "
                            f"divisible by the data-parallel size {self.dp}: each rank trains whole prompts' groups")
        self._load_engine_weights(self.actor.export_hf())
        self.scorer = LockedScorer(self.scorer)
        self._prompts_by_key = {p.key: p for p in self.prompts}
        agent = None
        if self.algorithm.agent is not None:
            from megatron_spo.rollout.agent_loop import AgentLoop

            agent = AgentLoop(self.engine, self.tokenizer, self.algorithm.agent)
        return AsyncRollouts(self.engine, self.tokenizer, self.scorer, sampling=self.algorithm.sampling,
                             config=cfg.rollout, seed=cfg.seed, per_rank=cfg.batch.train_batch_size // self.dp,
                             dp=self.dp, dp_rank=par.dp_rank, dp_group=par.host_dp_group if self.dp > 1 else None,
                             agent=agent, first_draw=self.step, n=self.algorithm.n)

    def _take_async(self):
        """(trajectories, this rank's Rollout of them, the step's global prompts, seconds waited)."""
        stream = self.async_rollouts
        stream.top_up(self.algorithm, self.order)
        taken, waited = stream.take()
        rollout, prompts = stream.rollout_of(taken, self._prompts_by_key)
        rollout.grader_failures = float(stream.counts.get("dropped_grader", 0))
        return taken, rollout, prompts, waited

    def _advance_async(self):
        box = []
        self.async_rollouts.advance(lambda: box.append(self._load_engine_weights(self.actor.export_hf())))
        return box[0]

    def _stale_tokens(self, taken, rollout, batch: TrainBatch) -> torch.Tensor:
        """(N, T - 1) True on response tokens sampled by an older version than the current one."""
        from megatron_spo.training.batch import per_token

        version = self.async_rollouts.version
        lag = [[float(v < version) for v in t.versions] for t in taken]
        return per_token(rollout.contexts, lag, batch.target_mask).bool() & batch.target_mask.bool()

    def _behaviour_weights(self, rollout, batch: TrainBatch, old: torch.Tensor, stale: torch.Tensor) -> torch.Tensor:
        from megatron_spo.training.async_rollout import behaviour_weights
        from megatron_spo.training.batch import per_token

        roll = self.config.rollout
        behaviour = per_token(rollout.contexts, rollout.logprobs, old)
        return behaviour_weights(old, behaviour, stale, roll.off_policy_correction, roll.is_cap)

    def _async_metrics(self, ctx, taken, stale, step_seconds: float) -> dict[str, float]:
        """async/*: the stream's counts this step, summed over DP ranks, and the staleness of
        what was trained."""
        counts = self.async_rollouts.take_counts()
        version = self.async_rollouts.version - 1  # the version this step trained from
        lags = [version - t.version for t in taken]
        names = ["refills", "dropped_stale", "dropped_grader", "restarted", "outstanding", "generated_tokens"]
        local = [float(counts.get(n, 0.0)) for n in names]
        local += [float(sum(lags)), float(len(lags)), float(stale.sum()) if stale is not None else 0.0,
                  float(sum(len(t.response) for t in taken))]
        total = ctx.reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        lag_max = ctx.reduce_max(torch.tensor([float(max(lags, default=0))]))[0].item()
        out = {f"async/{n}": v for n, v in zip(names[:5], total[:5])}
        out["async/staleness_mean"] = total[6] / max(total[7], 1.0)
        out["async/staleness_max"] = lag_max
        out["async/stale_token_fraction"] = total[8] / max(total[9], 1.0)
        out["async/stream_tokens_per_s"] = total[5] / max(step_seconds, 1e-9)
        return out

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, pass@k and maj@k of the current policy (`training.evaluation`;
        generation split over the rollout groups, as in training; with `rollout.agent: tool`, each
        sample a whole tool-using trajectory, graded on what the model wrote)."""
        from megatron_spo.rollout.records import load_records
        from megatron_spo.training.evaluation import evaluate_policy

        cfg = self.config
        if not cfg.eval_files:
            return {}
        if self._eval_records is None:
            self._eval_records = [r for path in cfg.eval_files for r in load_records(path)]
        # async mode: the stream waits between two decoding steps while the engine evaluates
        with self.async_rollouts.paused() if self.async_rollouts is not None else contextlib.nullcontext():
            self._load_engine_weights(self.actor.export_hf())
            engine = self.engine
            if self.algorithm.agent is not None:  # the tool agent: evaluated with its tools, as it trains
                from megatron_spo.rollout.agent_loop import AgentEngine

                engine = AgentEngine(self.engine, self.tokenizer, self.algorithm.agent)
            metrics = evaluate_policy(engine, self.tokenizer, self._eval_records, cfg, pool=self.scorer,
                                      parallel=self.parallel)
        self.colocation.for_training()
        return metrics

    def save_checkpoint(self) -> Path:
        """Everything the run needs to continue exactly (`training.checkpointing`), atomically."""
        sharded, small = self._stateful()
        return self.checkpointer.save(self.step, sharded=sharded, small=small,
                                      info={"generated_tokens": self.generated_tokens})

    # ------------------------------------------------------------------ driver

    def fit(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train until `total_steps` (or `total_epochs`, or `max_generated_tokens`), evaluating and
        checkpointing on their cadences; `on_step(step, metrics)` runs after each step's logging
        and checkpoint. Returns the last step's metrics (with the final evaluation)."""
        cfg, total = self.config, self.total_steps
        progress = _progress(total, self.step, enabled=self.is_main and cfg.logging.progress_bar)
        last: dict[str, float] = {}
        if cfg.eval.before_train and self.step == 0:
            self.logger.log(0, self.evaluate())
        budget = cfg.max_generated_tokens
        while self.step < total and not (budget and self.generated_tokens >= budget):
            metrics = self.train_step()
            if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                metrics.update(self.evaluate())
            self.logger.log(self.step, metrics)
            last = metrics
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step, metrics)
        if progress is not None:
            progress.close()
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps and last:
            final_eval = self.evaluate()  # the last step was not an evaluation step
            self.logger.log(self.step, final_eval)
            last.update(final_eval)
        return last

    def export_hf(self, out_dir: str | Path) -> Path:
        from megatron_spo.models.checkpoint import save_hf_checkpoint

        dtype = self.actor.raw_chunks[0].config.params_dtype
        return save_hf_checkpoint(self.actor.export_hf(dtype=dtype), out_dir, hf_side_dir=self.side_dir,
                                  dtype=dtype, write=self.is_main, overwrite=True)

    def close(self) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.close()
        self.logger.close()
        self.scorer.close()
        self.engine.shutdown()
        if self._lock is not None:
            self._lock.release()


def _claim_run_dir(config: TrainConfig, par):
    """Rank 0 locks the run directory for this run (`training.run_lock`) and claims it
    (`training.run_dir`); every rank learns the outcome, so a refusal is one line on all of them.
    Returns (the lock, whether the run continues the directory's run)."""
    from megatron_spo.training.checkpointing import complete_checkpoints
    from megatron_spo.training.run_dir import claim
    from megatron_spo.training.run_lock import RunDirLock

    run_dir = Path(config.run_dir)
    lock, verdict = None, (None, False)
    if par.rank == 0:
        lock = RunDirLock(run_dir)
        holder = lock.acquire()
        if holder:
            verdict = (f"run_dir {run_dir} is in use by another run ({holder}): wait for it to end, "
                       f"or give this run another run_dir", False)
        else:
            done = complete_checkpoints(config.checkpoint_dir)
            verdict = claim(run_dir, config, resume_step=int(done[-1].name.split("_")[1]) if done else 0)
    if par.world_size > 1:
        box = [verdict]
        torch.distributed.broadcast_object_list(box, src=0, group=par.host_group)
        verdict = box[0]
    if verdict[0]:
        if lock is not None:
            lock.release()
        raise UserError(verdict[0])
    return lock, verdict[1]


def _progress(total: int, start: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
