"""The RL training loop: Single-stream Policy Optimization, GRPO as the baseline, and the other
published SPOs (Segment Policy Optimization chain / tree, Soft Policy Optimization).

One step, on every rank (SPMD under torchrun), reads as the algorithm does:

    sample prompts (spo: from the value store, a pool of gen_batch_size, batch of
      train_batch_size; the others: the next train_batch_size prompts)
    -> sync the actor's weights into the rollout engine
    -> build this rank's sequences (`training.rollouts`: generate and score; spo_chain adds
       continuations from cut points, spo_tree grows trees, soft_spo adds off-policy sequences)
    -> old-policy (and reference) log-probs
    -> advantages (spo: r - p_hat, p_hat read before this step's update, normalised over the
       global batch; grpo: group mean / std; spo_chain / spo_tree: segment values, probability
       mask, whitening; soft_spo: none, the loss regresses soft Q onto the reward)
    -> update the actor (mini-batches x epochs, the algorithm's objective, `training.objectives`)
    -> spo: KL drift D of each prompt's previous response -> rho -> value-store update
    -> periodic evaluation -> checkpoint

Prompts of a step are split over data-parallel ranks (DP rank d trains on positions d, d + dp,
...); each prompt is generated once, by one rollout group (an engine over
`rollout.tensor_parallel_size` consecutive ranks), and its sequences are sent to every rank of the
model replica that trains on it (`rollout.placement`). Sampling seeds derive from (seed, step,
prompt position), so generation does not depend on how the batch is split, and a resumed run
repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megatron_spo import atomic, platform
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import load_tokenizer
from megatron_spo.training.config import TrainConfig
from megatron_spo.training.rollouts import Prompt, Rollout, Sampling, step_seed

STATE_FILE = "trainer_state.json"


def load_prompts(files: list[str], prompt_key: str, answer_key: str, tokenizer, prompt_config) -> tuple[list[Prompt], int]:
    """Every record of `files` as a Prompt (skipping over-long ones); returns (prompts, skipped).

    Keys may be dotted (`reward_model.ground_truth`); a prompt's value-store identity is its last
    user message, as `megatron-spo values estimate` keys its offline values."""
    from megatron_spo.rollout.prompts import build_prompts
    from megatron_spo.rollout.records import field, load_records, raw_user_prompt
    from megatron_spo.value import prompt_key as key_of

    records = []
    for path in files:
        for i, record in enumerate(load_records(path)):
            if field(record, prompt_key) is None or field(record, answer_key) is None:
                raise UserError(f"{path}: record {i} has no {prompt_key!r} or {answer_key!r} key (has {sorted(record)})")
            records.append(record)
    if not records:
        raise UserError(f"no records in {', '.join(files)}")
    raws = [raw_user_prompt(field(r, prompt_key)) for r in records]
    built = build_prompts([field(r, prompt_key) for r in records], tokenizer, prompt_config)
    prompts = [
        Prompt(key=key_of(raws[b.index]), raw=raws[b.index], token_ids=b.token_ids,
               answer=str(field(records[b.index], answer_key)))
        for b in built.prompts
    ]
    if not prompts:  # nothing to train on: say so, instead of drawing from an empty pool forever
        raise UserError(
            f"data.train_files: all {len(records)} prompts of {', '.join(files)} were skipped: longer than "
            f"data.prompt.max_prompt_tokens={prompt_config.max_prompt_tokens} tokens (raise it, or set "
            f"data.prompt.overlong=truncate)")
    return prompts, len(built.skipped)


@dataclasses.dataclass(kw_only=True)
class TrainerParts:
    """Components a caller supplies instead of the ones `Trainer` builds from the config (the GPU
    dry run: no tokenizer, data or weights on disk, no engine). None = build from the config."""

    tokenizer: Any = None
    prompts: list[Prompt] | None = None
    load_model: Callable | None = None
    """(path, parallel, dtype=, seed=[, recompute=, sequence_parallel=]) -> (spec, chunks, bridge);
    default `load_pretrained`."""
    engine: Any = None
    scorer: Any = None
    rollout_standalone: bool = False
    """No peer ranks exist (the dry run's simulated rank): this rank generates everything its
    replica trains on itself, and no rollout results are exchanged."""


class Trainer:
    """Builds every component from a TrainConfig and runs steps."""

    def __init__(self, config: TrainConfig, *, parts: TrainerParts | None = None):
        from megatron_spo.models.checkpoint import hf_side_dir_of, load_pretrained
        from megatron_spo.rollout.engine import make_engine
        from megatron_spo.rollout.scoring import ScoringPool
        from megatron_spo.training.actor import Actor, OptimizerSettings

        self._parts = parts = parts or TrainerParts()
        self.config = cfg = config
        self.algorithm = cfg.algorithm.name
        self.dp = cfg.check_world_size(platform.launch_world_size())
        self.parallel = par = platform.init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
        self.is_main = par.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self._lock = self._lock_run_dir()
        self.n = cfg.rollout.n or 1
        dtype = platform.resolve_dtype(cfg.model.dtype)
        load_model = parts.load_model or load_pretrained

        self.side_dir = hf_side_dir_of(cfg.model.hf_dir)
        self.tokenizer = parts.tokenizer or load_tokenizer(str(self.side_dir))
        if parts.prompts is not None:
            self.prompts, skipped = parts.prompts, 0
        else:
            self.prompts, skipped = load_prompts(cfg.data.train_files, cfg.data.prompt_key, cfg.data.answer_key,
                                                 self.tokenizer, cfg.data.prompt)
        self.prompts_skipped = skipped
        if skipped and par.rank == 0:
            print(f"data: {skipped} of {skipped + len(self.prompts)} prompts skipped: longer than "
                  f"data.prompt.max_prompt_tokens={cfg.data.prompt.max_prompt_tokens}", flush=True)
        if not self.prompts:
            raise UserError("no training prompts: the data (or TrainerParts.prompts) is empty")
        spec, chunks, bridge = load_model(cfg.model.hf_dir, par, dtype=dtype, seed=cfg.seed,
                                          recompute=cfg.parallel.recompute,
                                          sequence_parallel=cfg.parallel.sequence_parallel_enabled)
        o = cfg.optimizer
        self.actor = Actor(spec, chunks, bridge, par, OptimizerSettings(
            lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip, warmup_steps=o.warmup_steps,
            decay_steps=(cfg.total_steps - o.warmup_steps) if (cfg.total_steps and o.schedule != "constant") else None,
            decay_style=o.schedule, use_distributed_optimizer=o.distributed,
        ))
        self.reference = None
        if self._needs_reference():
            from megatron_spo.training.reference import ReferenceModel

            self.reference = ReferenceModel(cfg.model.hf_dir, par, dtype=dtype, seed=cfg.seed, load=load_model,
                                            sequence_parallel=cfg.parallel.sequence_parallel_enabled)
        self.engine = parts.engine or make_engine(
            cfg.rollout.engine_config(str(self.side_dir), seed=cfg.seed, load_weights=False))
        self.placement = self._rollout_placement()
        self.colocation = self._colocation()
        self.scorer = parts.scorer or ScoringPool(cfg.rollout.reward)
        self.store = self._build_value_store()
        self.sampling = self._sampling()
        self.objective = self._objective()
        self.q0: dict[int, float] = {}  # soft_spo: soft value of each prompt under the reference
        self.reference_tokens = 0  # soft_spo: tokens sampled from the reference for Q0
        self.replay: list[dict] = []  # soft_spo: this rank's recent policy sequences
        self.offpolicy = self._load_offpolicy()
        self.step = 0
        self.cursor = 0  # position in the shuffled prompt order
        self.epoch = 0
        self.sample_rng = np.random.default_rng(cfg.seed)
        self.generated_tokens = 0
        self._order = self._epoch_order(0)
        self._resume()
        self.logger = self._make_logger()

    # ------------------------------------------------------------------ setup

    def _lock_run_dir(self):
        """Rank 0 locks the run directory for this run (`training.run_lock`); every rank learns
        the outcome, so a second run on the same directory stops with one line on all of them."""
        from megatron_spo.training.run_lock import RunDirLock

        lock, holder = None, None
        if self.is_main:
            lock = RunDirLock(self.run_dir)
            holder = lock.acquire()
        if self.parallel.world_size > 1:
            box = [holder]
            torch.distributed.broadcast_object_list(box, src=0, group=self.parallel.host_group)
            holder = box[0]
        if holder:
            raise UserError(f"run_dir {self.run_dir} is in use by another run ({holder}): wait for it to end, "
                            f"or give this run another run_dir")
        return lock

    def _colocation(self):
        from megatron_spo.training.colocation import Colocation
        from megatron_spo.training.offload import ModelOffloader

        models = [ModelOffloader(self.actor.chunks, self.actor.optimizer, caches=[self.actor.bridge])]
        if self.reference is not None:
            models.append(ModelOffloader(self.reference.chunks, caches=[self.reference.bridge]))
        roll = self.config.rollout
        return Colocation(self.engine, models, sleep_engine=roll.enable_sleep_mode, offload_models=roll.offload_actor)

    def _needs_reference(self) -> bool:
        a = self.config.algorithm
        return {"spo": self.config.loss.kl_coef > 0, "grpo": self.config.loss.kl_coef > 0,
                "spo_chain": a.spo_chain.loss.kl_coef > 0, "spo_tree": a.spo_tree.loss.kl_coef > 0,
                "soft_spo": True}[self.algorithm]

    def _sampling(self) -> Sampling:
        """The algorithm's sampling settings; the loss reads log-probs at the same temperature."""
        a, r = self.config.algorithm, self.config.rollout
        if self.algorithm in ("spo_chain", "spo_tree"):
            c = getattr(a, self.algorithm)
            return Sampling(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_tokens=c.max_response_tokens)
        return Sampling(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_response_tokens)

    @property
    def loss_temperature(self) -> float:
        """Temperature of every actor / reference log-prob: the sampling one (PPO ratios and the
        segment probability mask are about the sampling distribution), except soft_spo, whose
        soft Q is defined on the policy itself (off-policy samples may come from anywhere)."""
        return 1.0 if self.algorithm == "soft_spo" else self.sampling.temperature

    def _objective(self):
        from megatron_spo.training.objectives import PPOObjective, SegmentObjective, SoftObjective

        a, loss, tp_group = self.config.algorithm, self.config.loss, self.parallel.tp_group
        if self.algorithm in ("spo_chain", "spo_tree"):
            return SegmentObjective(config=getattr(a, self.algorithm).loss, temperature=self.loss_temperature,
                                    tp_group=tp_group)
        if self.algorithm == "soft_spo":
            return SoftObjective(config=a.soft_spo, tp_group=tp_group)
        return PPOObjective(clip_ratio_low=loss.clip_ratio_low, clip_ratio_high=loss.clip_ratio_high,
                            clip_ratio_c=loss.clip_ratio_c, loss_agg=loss.loss_agg, kl_coef=loss.kl_coef,
                            kl_estimator=loss.kl_estimator, entropy_coef=loss.entropy_coef,
                            temperature=self.loss_temperature, tp_group=tp_group)

    def _load_offpolicy(self) -> list:
        from megatron_spo.training.algorithms.soft_spo import load_offpolicy_jsonl

        if self.algorithm != "soft_spo":
            return []
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        samples = [s for path in self.config.algorithm.soft_spo.offpolicy_files
                   for s in load_offpolicy_jsonl(path, tokenize=encode)]
        for s in samples:
            if s.ground_truth is None and "q0" not in s.extra:
                raise UserError(f"{s.extra['source']}: an off-policy sequence needs its prompt's 'answer' "
                                "(to estimate Q0 from reference samples) or a 'q0' value")
        return samples

    def _rollout_placement(self):
        """Rollout groups of `rollout.tensor_parallel_size` ranks (one engine each) and the actor
        replicas they serve (`rollout.placement`), checked against Megatron's own rank layout."""
        from megatron_spo.rollout.placement import RolloutPlacement

        par = self.parallel
        placement = RolloutPlacement.build(
            par.world_size, self.config.rollout.tensor_parallel_size, tp=par.tp, pp=par.pp,
            spmd=getattr(self.engine, "spmd", False), standalone=self._parts.rollout_standalone)
        if placement.replicas[par.dp_rank][par.pp_rank * par.tp + par.tp_rank] != par.rank:
            raise RuntimeError(f"rank {par.rank} (tp {par.tp_rank}, dp {par.dp_rank}, pp {par.pp_rank}) is not where "
                               "rollout.placement expects Megatron's tp-dp-pp rank order to put it")
        return placement

    def _build_value_store(self):
        from megatron_spo.value import ValueStore

        cfg = self.config
        keys = np.unique(np.array([p.key for p in self.prompts], dtype=np.int64))
        group = self.parallel.host_dp_group if self.dp > 1 else None
        if cfg.algorithm.name != "spo":
            return None
        if cfg.spo.offline_values:
            # from_offline_values prints what it matched, what it filled with the prior, what it dropped
            return ValueStore.from_offline_values(cfg.spo.offline_values, cfg.spo,
                                                  dataset_prompts=[p.raw for p in self.prompts], group=group)
        return ValueStore.from_keys(keys, cfg.spo, group=group)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.prompts))
        if self.config.data.shuffle:
            np.random.default_rng(self.config.seed + 7919 * (epoch + 1)).shuffle(order)
        return order

    def _make_logger(self):
        from megatron_spo.config import to_dict
        from megatron_spo.training.metrics import MetricsLogger

        log = self.config.logging
        return MetricsLogger(
            self.run_dir, jsonl=log.metrics_jsonl, tensorboard=log.tensorboard, wandb=log.wandb,
            wandb_project=log.wandb_project, wandb_run_name=log.wandb_run_name,
            config=to_dict(self.config), resume_step=self.step if self.step else None, enabled=self.is_main,
        )

    # ------------------------------------------------------------------ the step

    def _next_prompts(self) -> list[Prompt]:
        """The step's global batch: SPO draws from a pool by weight; GRPO takes the next prompts."""
        cfg = self.config
        take = cfg.batch.gen_batch_size if self.algorithm == "spo" else cfg.batch.train_batch_size
        pool = []
        while len(pool) < take:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            chunk = self._order[self.cursor : self.cursor + take - len(pool)]
            self.cursor += len(chunk)
            pool.extend(self.prompts[i] for i in chunk)
        if self.algorithm != "spo":
            return pool
        pool_keys = np.array([p.key for p in pool], dtype=np.int64)
        batch = min(cfg.batch.train_batch_size, len(np.unique(pool_keys)))
        chosen = self.store.sample(pool_keys, batch, self.sample_rng)
        return [pool[i] for i in chosen]

    def _seeds(self, count: int, salt: int = 0) -> list[int]:
        return [step_seed(self.config.seed + salt, self.step, i) for i in range(count)]

    def _generation_plan(self, batch_size: int):
        """This rank's part in generating the step's prompts: the DP rank d trains on positions
        d, d + dp, ...; each is generated once, by one rollout group (`rollout.placement`)."""
        return self.placement.plan([i % self.dp for i in range(batch_size)], self.parallel.rank)

    def _exchange(self, held: dict, route) -> dict:
        from megatron_spo.rollout.placement import exchange

        return exchange(held, route, self.parallel.rank, self.parallel.host_group)

    def _build_rollout(self, batch: list[Prompt]) -> Rollout:
        """This DP rank's sequences for the step (see `training.rollouts`), identical on every
        rank of its model replica: generated where `rollout.placement` puts each prompt, then
        sent to the replica's ranks."""
        from megatron_spo.rollout.agent_loop import AgentLoopConfig
        from megatron_spo.training import rollouts

        cfg = self.config
        plan = self._generation_plan(len(batch))
        mine = plan.generate  # the prompts this rank's engine generates (none off a group's leader, hf)
        seeds = self._seeds(len(batch))
        if self.algorithm == "spo_tree":
            rollout = rollouts.tree_rollout(self.engine, self.scorer, self.tokenizer, batch, mine,
                                            cfg.algorithm.spo_tree, seeds)
        else:
            agent = None
            if cfg.rollout.agent == "tool":
                agent = AgentLoopConfig.from_rollout(cfg.rollout, temperature=self.sampling.temperature,
                                                     top_p=self.sampling.top_p,
                                                     max_response_length=self.sampling.max_tokens)
            scorer = rollouts.PromptScorer(self.scorer, self.tokenizer, [p.answer for p in batch])
            rollout = rollouts.generate(self.engine, self.tokenizer, scorer, batch, mine, n=self.n,
                                        sampling=self.sampling, seeds=seeds, agent_config=agent)
        parts = self._exchange(rollout.split(mine), plan.results)
        rollout = Rollout.concat([parts[i] for i in sorted(parts)])
        if self.algorithm == "soft_spo":
            # the training reward is shifted; episode_rewards (reported) keep the task's
            rollout.rewards = [r + cfg.algorithm.soft_spo.reward_offset for r in rollout.rewards]
            self._add_offpolicy(rollout, batch)
        return rollout

    def _continue_chains(self, rollout: Rollout, batch_size: int, old_rows: list[list[float]],
                         sequence_seeds: list[int]) -> None:
        """spo_chain: per-token segment advantages of this DP rank's sequences from K continuations
        at each cut point. The rollout group that generated a prompt's sequences continues them:
        the replica first sends it the actor's old log-probs (and the sequences, which a group
        outside the replica no longer holds), then it sends the advantages back."""
        from megatron_spo.training.rollouts import attach_chain_advantages

        plan = self._generation_plan(batch_size)
        rows: dict[int, list[int]] = {}
        for row, i in enumerate(rollout.prompt_index):
            rows.setdefault(i, []).append(row)
        held = {i: (part, [old_rows[r] for r in rows.get(i, [])], [sequence_seeds[r] for r in rows.get(i, [])])
                for i, part in rollout.split(plan.results.wanted_by(self.parallel.rank)).items()}
        inputs = self._exchange(held, plan.inputs)  # the positions this rank's engine continues
        work = Rollout.concat([inputs[i][0] for i in plan.generate])
        work.generated_tokens, work.grader_failures, work.token_advantages = 0, 0.0, []
        if len(work):
            attach_chain_advantages(work, self.engine, self.scorer, self.tokenizer, self.config.algorithm.spo_chain,
                                    [lp for i in plan.generate for lp in inputs[i][1]],
                                    [seed for i in plan.generate for seed in inputs[i][2]])
        done = {i: (part.token_advantages, part.generated_tokens, part.grader_failures)
                for i, part in work.split(plan.generate).items()}
        results = self._exchange(done, plan.results)
        rollout.token_advantages = [adv for i in sorted(results) for adv in results[i][0]]
        rollout.generated_tokens += sum(tokens for _, tokens, _ in results.values())
        rollout.grader_failures += sum(failures for _, _, failures in results.values())

    # ------------------------------------------------------------------ soft-SPO sources and Q0

    def _offpolicy_draw(self) -> list:
        """External sequences of this step (same draw on every rank)."""
        count = min(self.config.algorithm.soft_spo.offpolicy_per_step, len(self.offpolicy))
        if not count:
            return []
        rng = np.random.default_rng([self.config.seed, self.step, 1])
        return [self.offpolicy[i] for i in sorted(rng.choice(len(self.offpolicy), count, replace=False))]

    def _add_offpolicy(self, rollout: Rollout, batch: list[Prompt]) -> None:
        """soft_spo: this rank's share of the external sequences, then replayed sequences; the
        fresh policy sequences go into the replay buffer; every sequence gets its prompt's Q0."""
        soft = self.config.algorithm.soft_spo
        fresh = [dict(key=p.key, context=c, response=r, mask=m, reward=w)
                 for p, c, r, m, w in zip(rollout.prompts, rollout.contexts, rollout.responses, rollout.masks,
                                         rollout.rewards)]
        for sample in self._offpolicy_draw()[self.parallel.dp_rank :: self.dp]:
            prompt = Prompt(key=sample.prompt_key, raw=sample.prompt_text or "", token_ids=sample.prompt_token_ids,
                            answer=sample.ground_truth or "")
            rollout.add(-1, prompt, sample.prompt_token_ids, sample.response_token_ids, sample.response_mask,
                        sample.response_logprobs, sample.reward)
        if soft.replay_per_step and self.replay:
            rng = np.random.default_rng([self.config.seed, self.step, 2, self.parallel.dp_rank])
            picks = rng.choice(len(self.replay), min(soft.replay_per_step, len(self.replay)), replace=False)
            for i in sorted(picks):
                old = self.replay[i]
                prompt = Prompt(key=old["key"], raw="", token_ids=old["context"], answer="")
                rollout.add(-1, prompt, old["context"], old["response"], old["mask"],
                            [float("nan")] * len(old["response"]), old["reward"])
        if soft.replay_buffer_size:
            self.replay = (self.replay + fresh)[-soft.replay_buffer_size :]
        rollout.q0 = [self.q0[p.key] for p in rollout.prompts]

    def _fill_q0(self, batch: list[Prompt]) -> None:
        """soft_spo: Q0 of the step's prompts not seen before, from samples of the reference
        (loaded into the engine for this; the caller syncs the actor back). Computed once per
        prompt (the reference is frozen), split over the rollout groups, shared by all ranks."""
        from megatron_spo.rollout.weight_sync import sync_weights
        from megatron_spo.training import rollouts
        from megatron_spo.training.algorithms.soft_spo import estimate_prompt_q0

        soft = self.config.algorithm.soft_spo
        needed: dict[int, tuple[list[int], str]] = {}
        for p in batch:
            if p.key not in self.q0:
                needed.setdefault(p.key, (p.token_ids, p.answer))
        for s in self._offpolicy_draw():
            if s.prompt_key in self.q0 or s.prompt_key in needed:
                continue
            if "q0" in s.extra:
                self.q0[s.prompt_key] = s.extra["q0"]
            else:
                needed[s.prompt_key] = (s.prompt_token_ids, s.ground_truth)
        if not needed:
            return
        keys = sorted(needed)
        self.colocation.for_sync()
        sync_weights(self.engine, self.reference.export_hf(), self.config.rollout.weight_sync)
        self.colocation.for_generation()
        plan = self.placement.plan([None] * len(keys), self.parallel.rank)  # every rank needs every Q0
        mine = [keys[i] for i in plan.generate]
        scorer = rollouts.PromptScorer(self.scorer, self.tokenizer, [needed[k][1] for k in mine],
                                       offset=soft.reward_offset)
        seeds = [step_seed(self.config.seed + 17, 0, k % (2**31 - 1)) for k in mine]
        counting = rollouts.CountingEngine(self.engine)
        values = estimate_prompt_q0([needed[k][0] for k in mine], counting, scorer, soft, prompt_seeds=seeds)
        # the tokens of the whole call ride with its first prompt, so they are counted once
        found = {i: (value, counting.tokens if j == 0 else 0)
                 for j, (i, value) in enumerate(zip(plan.generate, values))}
        found = self._exchange(found, plan.results)
        self.q0.update({keys[i]: value for i, (value, _) in found.items()})
        self.reference_tokens += sum(tokens for _, tokens in found.values())

    # ------------------------------------------------------------------ tensors

    def _sequences(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Right-padded context+response ids (N, T), targets, and the response mask (N, T).

        The mask sits on the positions that *predict* response tokens (position t predicts t+1);
        tool-output tokens stay 0. With no sequences the tensors have 0 rows (T = 2).
        """
        pad = self.tokenizer.pad_token_id or 0
        length = max([len(c) + len(r) for c, r in zip(rollout.contexts, rollout.responses)], default=2)
        n = len(rollout)
        ids = torch.full((n, length), pad, dtype=torch.long)
        mask = torch.zeros(n, length)
        for row, (c, r, m) in enumerate(zip(rollout.contexts, rollout.responses, rollout.masks)):
            seq = c + r
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, len(c) - 1 : len(seq) - 1] = torch.tensor(m, dtype=torch.float32)
        lengths = torch.tensor([len(c) + len(r) for c, r in zip(rollout.contexts, rollout.responses)], dtype=torch.long)
        return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "response_mask": mask, "lengths": lengths}

    def _per_token(self, rollout: Rollout, values: list[list[float]], like: torch.Tensor) -> torch.Tensor:
        """Per-response-token lists -> (N, T-1) aligned with the logprob positions."""
        out = torch.zeros_like(like)
        for row, (c, v) in enumerate(zip(rollout.contexts, values)):
            out[row, len(c) - 1 : len(c) - 1 + len(v)] = torch.tensor(v, dtype=out.dtype)
        return out

    def _logprobs(self, model, seq: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward-only log-probs of the sequences, batched like the update (token budget or rows)."""
        input_ids = seq["input_ids"]
        if input_ids.shape[0] == 0:
            return torch.zeros(0, input_ids.shape[1] - 1)
        batch = self.config.batch
        return model.logprobs(input_ids, micro_batch_size=batch.micro_batch_size, temperature=self.loss_temperature,
                              lengths=seq["lengths"], max_tokens=batch.max_tokens_per_micro_batch)["logprobs"]

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, group=self.parallel.host_dp_group)
        return tensor

    # ------------------------------------------------------------------ the step

    def train_step(self) -> dict[str, float]:
        from megatron_spo.rollout.weight_sync import sync_weights

        cfg = self.config
        t0 = time.perf_counter()
        batch = self._next_prompts()
        keys = np.array([p.key for p in batch], dtype=np.int64)
        p_hat_all = self.store.p_hat(keys) if self.store is not None else None  # before any update
        if self.algorithm == "soft_spo":
            self._fill_q0(batch)

        self.colocation.for_sync()
        sync = sync_weights(self.engine, self.actor.export_hf(), cfg.rollout.weight_sync)
        t_gen = time.perf_counter()
        self.colocation.for_generation()
        rollout = self._build_rollout(batch)
        # spo_chain generates its continuations after the old-policy pass: the engine stays awake
        self.colocation.for_training(keep_engine=self.algorithm == "spo_chain")
        seq = self._sequences(rollout)
        mask = seq["response_mask"][:, :-1]
        # one update per step on fresh samples: the policy is still the old one when the loss runs,
        # so the loss takes its own detached log-probs as pi_old and this pass is skipped
        on_policy_single_update = (self.algorithm in ("spo", "grpo") and cfg.batch.epochs == 1
                                   and cfg.batch.train_batch_size == cfg.batch.mini_batch_size)
        old = None if on_policy_single_update else self._logprobs(self.actor, seq)
        if self.algorithm == "spo_chain":
            old_rows = [old[i, len(c) - 1 : len(c) - 1 + len(r)].tolist()
                        for i, (c, r) in enumerate(zip(rollout.contexts, rollout.responses))]
            # continuations of the n responses to one prompt must differ: seed by sequence, not prompt
            seeds = self._seeds(len(batch) * self.n, salt=31)
            nth: dict[int, int] = {}
            sequence_seeds = []
            for i in rollout.prompt_index:  # the j-th response to prompt i takes seed i * n + j
                sequence_seeds.append(seeds[i * self.n + nth.get(i, 0)])
                nth[i] = nth.get(i, 0) + 1
            self._continue_chains(rollout, len(batch), old_rows, sequence_seeds)
            self.colocation.for_training()
        gen_seconds = time.perf_counter() - t_gen
        ref = self._logprobs(self.reference, seq) if self.reference is not None else None

        rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
        data = dict(seq)
        if old is not None:
            data["old_logprobs"] = _pad_right(old)
            engine_lp = self._per_token(rollout, rollout.logprobs, old)
            finite = mask * torch.isfinite(engine_lp)
            mismatch = self._reduce_sum(torch.stack([((engine_lp.nan_to_num() - old).abs() * finite).sum(),
                                                     finite.sum()]))
        if ref is not None:
            data["ref_logprobs"] = _pad_right(ref)
        adv = self._advantages(rollout, data, old if old is not None else torch.zeros_like(mask), mask, rewards,
                               p_hat_all)

        t_train = time.perf_counter()
        update = self._update_actor(data, self._mini_batch_of(rollout))
        train_seconds = time.perf_counter() - t_train

        value_metrics = self._update_values(rollout, rewards) if self.store is not None else {}
        self.step += 1
        generated = self._reduce_sum(torch.tensor([float(rollout.generated_tokens)]))[0].item()
        self.generated_tokens += int(generated)
        episodes = torch.tensor(rollout.episode_rewards, dtype=torch.float64)
        totals = self._reduce_sum(torch.tensor([episodes.sum().item(), float(episodes.numel()),
                                                float((episodes > 0).sum()), rollout.grader_failures,
                                                float(len(rollout)), float(sum(map(len, rollout.responses)))],
                                               dtype=torch.float64))
        adv_stats, adv_abs_max = self._advantage_stats(adv, data["response_mask"])
        metrics = {
            "reward/mean": totals[0].item() / max(totals[1].item(), 1),
            "train/accuracy": totals[2].item() / max(totals[1].item(), 1),
            "reward/grader_failures": totals[3].item(),
            "rollout/generated_tokens": generated,
            "rollout/total_generated_tokens": self.generated_tokens,
            "rollout/train_sequences": totals[4].item(),
            "rollout/response_length": totals[5].item() / max(totals[4].item(), 1),
            "perf/gen_tokens_per_s": generated / max(gen_seconds, 1e-9),
            "perf/train_tokens_per_s": update.pop("tokens", 0.0) / max(train_seconds, 1e-9),
            "perf/weight_sync_s": sync.seconds,
            "perf/colocation_s": self.colocation.take_seconds(),  # offload / onload / sleep / wake
            "perf/weight_sync_gb_per_s": sync.gb_per_s,
            "perf/step_s": time.perf_counter() - t0,
            "advantage/mean": adv_stats[0].item() / max(adv_stats[1].item(), 1.0),
            "advantage/abs_max": adv_abs_max.item(),
            "data/epoch": float(self.epoch),
        }
        if old is not None:
            # |log pi_engine - log pi_actor| per response token: ~0 when the engine runs the same
            # weights at temperature 1 (a sync bug or a precision gap shows here first)
            metrics["rollout/logprob_mismatch"] = mismatch[0].item() / max(mismatch[1].item(), 1.0)
        if self.algorithm == "soft_spo":
            metrics["rollout/reference_tokens"] = float(self.reference_tokens)
        if p_hat_all is not None:
            metrics.update({"p_hat/mean": float(p_hat_all.mean()), "p_hat/std": float(p_hat_all.std()),
                            "p_hat/min": float(p_hat_all.min()), "p_hat/max": float(p_hat_all.max())})
        metrics.update(update)
        metrics.update(value_metrics)
        return metrics

    def _advantages(self, rollout: Rollout, data: dict, old: torch.Tensor, mask: torch.Tensor,
                    rewards: torch.Tensor, p_hat_all) -> torch.Tensor | None:
        """Fills the objective's inputs into `data`; returns the per-token advantages for the
        statistics (None for soft_spo, which has none)."""
        from megatron_spo.training.advantages import grpo_advantages, spo_advantages
        from megatron_spo.training.algorithms.segment_loss import prepare_segment_batch

        a = self.config.algorithm
        if self.algorithm == "spo":
            p_hat = torch.tensor(p_hat_all[rollout.prompt_index], dtype=torch.float32)
            adv = spo_advantages(rewards, p_hat, mask, eps=a.spo_advantage_eps,
                                 normalize=a.normalize_advantages, reduce_sum=self._reduce_sum)
        elif self.algorithm == "grpo":
            adv = grpo_advantages(rewards, torch.tensor(rollout.prompt_index), mask, eps=a.grpo_eps,
                                  norm_by_std=a.grpo_norm_by_std)
        elif self.algorithm in ("spo_chain", "spo_tree"):
            raw = self._per_token(rollout, rollout.token_advantages, old)
            adv, loss_mask = prepare_segment_batch(raw, old, mask, getattr(a, self.algorithm).loss,
                                                   reduce_fn=self._reduce_sum)
            data["response_mask"] = _pad_right(loss_mask.float())  # only these tokens carry gradient
        else:  # soft_spo
            data["rewards"] = rewards
            data["q0"] = torch.tensor(rollout.q0, dtype=torch.float32)
            return None
        data["advantages"] = _pad_right(adv)
        return adv

    def _advantage_stats(self, adv: torch.Tensor | None, response_mask: torch.Tensor):
        """(sum, count) of per-sequence mean advantages over DP, and the global |max|."""
        if adv is None:
            return torch.zeros(2), torch.zeros(())
        mask = response_mask[:, :-1]
        has = mask.sum(1) > 0
        adv_seq = ((adv * mask).sum(1) / mask.sum(1).clamp(min=1))[has]
        stats = self._reduce_sum(torch.stack([adv_seq.sum(), torch.tensor(float(adv_seq.numel()))]))
        abs_max = adv_seq.abs().max() if adv_seq.numel() else torch.zeros(())
        if self.dp > 1:
            torch.distributed.all_reduce(abs_max, op=torch.distributed.ReduceOp.MAX, group=self.parallel.host_dp_group)
        return stats, abs_max

    def _mini_batch_of(self, rollout: Rollout) -> list[int]:
        """Mini-batch of each sequence: mini-batch k holds every sequence of the global batch's
        prompts [k m, (k+1) m), m = batch.mini_batch_size, whichever rank holds them, so the
        split does not depend on DP. Sequences from outside the batch (soft-SPO's file and replay
        sequences) are spread evenly over the mini-batches."""
        cfg = self.config.batch
        parts = cfg.train_batch_size // cfg.mini_batch_size
        extra = [row for row, i in enumerate(rollout.prompt_index) if i < 0]
        out = [i // cfg.mini_batch_size if i >= 0 else 0 for i in rollout.prompt_index]
        for j, row in enumerate(extra):
            out[row] = j * parts // len(extra)
        return out

    def _update_actor(self, data: dict[str, torch.Tensor], mini_batch_of: list[int]) -> dict[str, float]:
        """Optimizer steps over mini-batches x epochs; returns the step's actor metrics.

        Every rank takes the same number of mini-batches per epoch (train_batch_size /
        mini_batch_size); a rank without sequences in one (spo_tree drops edges) trains a
        masked-out row, so collectives line up. A mini-batch whose global mask is empty is
        skipped (its loss would divide by zero)."""
        from megatron_spo.training.logprobs import microbatches, microbatches_by_tokens

        cfg = self.config
        budget = cfg.batch.max_tokens_per_micro_batch
        parts = cfg.batch.train_batch_size // cfg.batch.mini_batch_size
        owner = torch.tensor(mini_batch_of, dtype=torch.long)
        sums: dict[str, float] = {}
        updates = skipped_empty = 0
        for _ in range(cfg.batch.epochs):
            for part in range(parts):
                rows = torch.nonzero(owner == part).flatten()
                mini = {k: v[rows] for k, v in data.items()}
                counts = self._reduce_sum(torch.tensor([float(mini["response_mask"].sum()), float(len(rows))]))
                if counts[0] == 0:
                    skipped_empty += 1
                    continue
                # segment KL: per-sequence sums averaged over the mini-batch's sequences
                mini["kl_scale"] = torch.full((len(rows),), float(counts[0] / counts[1]))
                if not len(rows):
                    mini = _blank_row(mini)
                mbs = (microbatches_by_tokens(mini, mini["lengths"], budget) if budget
                       else microbatches(mini, cfg.batch.micro_batch_size))
                m = self.actor.train_step(mbs, self.objective)
                updates += 1
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
        count = max(sums.pop("count", 0.0), 1.0)
        updates = max(updates, 1)
        per_count = {"pg_loss_sum": "actor/pg_loss", "clipped_sum": "actor/clip_fraction",
                     "approx_kl_sum": "actor/approx_kl", "entropy_sum": "actor/entropy", "kl_ref_sum": "actor/kl_ref"}
        out = {name: sums[key] / count for key, name in per_count.items() if key in sums}
        out.update({
            "actor/grad_norm": sums.get("grad_norm", 0.0) / updates,
            "actor/lr": sums.get("lr", 0.0) / updates,
            "actor/skipped_steps": sums.get("skipped", 0.0),
            "actor/empty_mini_batches": float(skipped_empty),
            "tokens": sums.get("tokens", 0.0),
        })
        if "soft_q_sum" in sums:
            out["soft/q_terminal"] = sums["soft_q_sum"] / count
            out["soft/log_ratio_sum"] = sums["soft_log_ratio_sum"] / count
        return out

    def _update_values(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """rho from the KL drift of each prompt's previous response, then the posterior update."""
        from megatron_spo.value.tracker import kl_drift, rho_from_drift

        cfg = self.config.spo
        keys = np.array([p.key for p in rollout.prompts], dtype=np.int64)
        rewards_np = rewards.clamp(0, 1).numpy().astype(np.float64)
        if cfg.rho_mode == "constant":
            rho = np.full(keys.shape, cfg.rho)
            drift = np.zeros(keys.shape)
        else:
            stored = self.store.stored_responses(keys)
            prev_ids, prev_old, prev_mask = stored.padded(self.tokenizer.pad_token_id or 0)
            have = stored.present
            # new logprobs of the stored responses and of this step's responses, in one pass
            prev_responses = [prev_ids[i, : int(prev_mask[i].sum())].tolist() for i in range(len(keys))]
            contexts = rollout.contexts + rollout.contexts
            both = self._sequences(Rollout(contexts=contexts, responses=prev_responses + rollout.responses,
                                           masks=[[1] * len(r) for r in prev_responses + rollout.responses]))
            lp = self._logprobs(self.actor, both)
            resp_mask = both["response_mask"][:, :-1].bool()
            new_prev = [lp[i][resp_mask[i]] for i in range(len(keys))]
            new_cur = [lp[len(keys) + i][resp_mask[len(keys) + i]] for i in range(len(keys))]
            drift = np.zeros(len(keys))
            if len(keys) and prev_old.numel():
                new_padded = torch.zeros_like(prev_old)
                for i, values in enumerate(new_prev):
                    new_padded[i, : values.numel()] = values
                drift = np.asarray(kl_drift(prev_old, new_padded, prev_mask), dtype=np.float64)
                drift[~np.asarray(have, dtype=bool)] = 0.0
            rho = rho_from_drift(drift, cfg)
            self.store.store_responses(keys, rollout.responses, [v.tolist() for v in new_cur])
        self.store.update(keys, rewards_np, rho)
        stats = self._reduce_sum(torch.tensor([float(rho.sum()), float(drift.sum()), float(len(keys))],
                                              dtype=torch.float64))
        n = max(stats[2].item(), 1.0)
        return {"rho/mean": stats[0].item() / n, "kl_drift/mean": stats[1].item() / n}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, pass@k and maj@k of the current policy (generation split over the
        rollout groups, as in training)."""
        from megatron_spo.rollout.records import load_records
        from megatron_spo.rollout.weight_sync import sync_weights
        from megatron_spo.training.eval_cli import EvalSettings, evaluate

        cfg, par = self.config, self.parallel
        if not cfg.eval_files:
            return {}
        if not hasattr(self, "_eval_records"):
            self._eval_records = [r for path in cfg.eval_files for r in load_records(path)]
        self.colocation.for_sync()
        sync_weights(self.engine, self.actor.export_hf(), cfg.rollout.weight_sync)
        self.colocation.for_generation()
        e = cfg.eval
        settings = EvalSettings(
            n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, seed=cfg.seed, ks=e.ks,
            max_tokens=e.max_response_tokens or cfg.rollout.max_response_tokens,
            prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key, prompt=cfg.data.prompt,
        )
        result = evaluate(self.engine, self.tokenizer, self._eval_records, settings, pool=self.scorer,
                          rank=par.rank, world_size=par.world_size, group=par.host_group,
                          rollout_tp=cfg.rollout.tensor_parallel_size)
        self.colocation.for_training()
        metrics = [{f"eval/{k}": float(v) for k, v in result.get("overall", {}).items()}]
        if par.world_size > 1:  # rank 0 gathered the grades; every rank reports the same metrics
            torch.distributed.broadcast_object_list(metrics, src=0, group=par.host_group)
        return metrics[0]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """model + optimizer + scheduler + value store + sampler + RNG + step, atomically."""
        from megatron_spo.models.checkpoint import save_mcore_checkpoint, save_optimizer_checkpoint

        par = self.parallel
        root = self.config.checkpoint_dir
        final = root / f"step_{self.step:08d}"
        save_mcore_checkpoint(self.actor.raw_chunks, par, final / "model", hf_side_dir=self.side_dir,
                              architecture=self.actor.spec.architecture,
                              dtype=self.actor.raw_chunks[0].config.params_dtype, overwrite=True)
        # everything below lands in a temporary sibling first; the state file is written last and
        # its presence is what marks the checkpoint complete
        _fault_injection_pause(self.step)
        # Adam moments and fp32 master weights too (the distributed optimizer's shards of them),
        # keyed by the model's sharded tensors; `optimizer.state_dict()` alone lacks them
        save_optimizer_checkpoint(self.actor.optimizer, self.actor.raw_chunks, par, final / "optimizer")
        rank_dir = final / "ranks"
        rank_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(rank_dir / f"rank{par.rank:05d}.pt", _torch_bytes({
            "scheduler": self.actor.scheduler.state_dict(),
            "actor_steps": self.actor.steps,
            "torch_rng": torch.get_rng_state(),
            "replay": self.replay,
        }))
        if self.store is not None:
            # the store shards over DP ranks; every model-parallel rank of a DP rank holds the same
            # shard, so the first TP/PP rank of each writes it
            self.store.save(final / "value_store")
        _barrier(par)
        if par.rank == 0:
            atomic.write_json(final / STATE_FILE, {
                "step": self.step, "cursor": self.cursor, "epoch": self.epoch,
                "generated_tokens": self.generated_tokens,
                "sample_rng": self.sample_rng.bit_generator.state,
                "world_size": par.world_size, "tp": par.tp, "pp": par.pp,
                "q0": {str(k): v for k, v in sorted(self.q0.items())}, "reference_tokens": self.reference_tokens,
            })
            self._prune_checkpoints()
        _barrier(par)
        return final

    def checkpoint_state_dicts(self) -> dict:
        """The sharded (dist_checkpointing) state dicts a checkpoint saves: the actor's model chunks
        and its optimizer (the GPU dry run builds them on the simulated ranks)."""
        from megatron_spo.models.checkpoint import _sharded_state_dict, optimizer_sharded_state_dict

        chunks = self.actor.raw_chunks
        return {**_sharded_state_dict(chunks),
                **optimizer_sharded_state_dict(self.actor.optimizer, chunks, is_loading=False)}

    def _prune_checkpoints(self) -> None:
        complete = complete_checkpoints(self.config.checkpoint_dir)
        for old in complete[: -self.config.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.config.checkpoint_dir.glob("step_*"):
            if partial not in complete and partial.name != f"step_{self.step:08d}":
                shutil.rmtree(partial, ignore_errors=True)

    def _resume(self) -> None:
        from megatron_spo.models.checkpoint import load_mcore_checkpoint, load_optimizer_checkpoint
        from megatron_spo.value import ValueStore

        if self.config.checkpoint.resume == "never":
            return
        complete = complete_checkpoints(self.config.checkpoint_dir)
        if not complete:
            return
        latest = complete[-1]
        state = json.loads((latest / STATE_FILE).read_text())
        par = self.parallel
        if (state["world_size"], state["tp"], state["pp"]) != (par.world_size, par.tp, par.pp):
            raise UserError(
                f"checkpoint {latest} was written at world {state['world_size']} TP {state['tp']} PP {state['pp']}; "
                f"resume it with the same layout (convert its model/ to start a new run at another layout)"
            )
        load_mcore_checkpoint(self.actor.raw_chunks, latest / "model")
        load_optimizer_checkpoint(self.actor.optimizer, self.actor.raw_chunks, latest / "optimizer")
        rank_state = torch.load(latest / "ranks" / f"rank{par.rank:05d}.pt", weights_only=False)
        self.actor.scheduler.load_state_dict(rank_state["scheduler"])
        self.actor.steps = rank_state["actor_steps"]
        torch.set_rng_state(rank_state["torch_rng"])
        self.replay = rank_state.get("replay", [])
        self.q0 = {int(k): v for k, v in state.get("q0", {}).items()}
        self.reference_tokens = state.get("reference_tokens", 0)
        if self.store is not None:
            self.store = ValueStore.load(latest / "value_store", self.config.spo,
                                         group=self.parallel.host_dp_group if self.dp > 1 else None)
        self.step, self.cursor, self.epoch = state["step"], state["cursor"], state["epoch"]
        self.generated_tokens = state["generated_tokens"]
        self.sample_rng.bit_generator.state = state["sample_rng"]
        self._order = self._epoch_order(self.epoch)
        if self.is_main:
            print(f"resumed from {latest} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ driver

    def fit(self) -> dict[str, float]:
        cfg = self.config
        total = cfg.total_steps or cfg.total_epochs * max(1, len(self.prompts) // cfg.batch.train_batch_size)
        if self.is_main:
            from megatron_spo.config import save_config

            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
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
        self.logger.close()
        self.scorer.close()
        self.engine.shutdown()
        if self._lock is not None:
            self._lock.release()


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories whose state file exists (written last), oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).is_file())


def _blank_row(mini: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One fully masked 2-token row with `mini`'s keys: a rank without sequences still takes part
    in the step's collectives and adds nothing to the loss or gradients."""
    row = {k: torch.zeros((1, 2) if v.dim() >= 2 else (1,), dtype=v.dtype) for k, v in mini.items()}
    row["lengths"] = torch.full((1,), 2, dtype=mini["lengths"].dtype)
    return row


def _pad_right(values: torch.Tensor) -> torch.Tensor:
    """(N, T-1) per-position values -> (N, T), zero in the last column (aligned with input_ids)."""
    return torch.nn.functional.pad(values, (0, 1))


def _torch_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fault_injection_pause(step: int) -> None:
    """Crash-safety testing: with MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT=<step>, the checkpoint of that
    step stalls for a minute after its model is written, so a test can kill the run mid-write."""
    if os.environ.get("MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT") == str(step):
        time.sleep(60)


def _barrier(par) -> None:
    if par.world_size > 1:
        torch.distributed.barrier()


def _progress(total: int, start: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
