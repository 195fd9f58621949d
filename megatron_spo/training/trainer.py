"""The RL training loop: Single-stream Policy Optimization, with GRPO as the baseline.

One step, on every rank (SPMD under torchrun), reads as the algorithm does:

    sample prompts from the value store (pool of gen_batch_size, batch of train_batch_size)
    -> sync the actor's weights into the rollout engine -> generate -> score
    -> advantages (SPO: r - p_hat, p_hat read before this step's update, normalised over the
       global batch; GRPO: group mean / std over rollout.n responses per prompt)
    -> update the actor (mini-batches x epochs, PPO clip with dual clip, token-mean)
    -> KL drift D of each prompt's previous response -> rho -> value-store update
    -> periodic evaluation -> checkpoint

Prompts of a step are split over data-parallel ranks; each rank generates with its own engine.
Sampling seeds derive from (seed, step, prompt position), so generation does not depend on how
the batch is split, and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_spo import atomic, platform
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import load_tokenizer
from megatron_spo.training.config import TrainConfig

STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class Prompt:
    """A training prompt: its value-store key, token ids and ground truth."""

    key: int
    raw: str
    token_ids: list[int]
    answer: str


@dataclasses.dataclass
class Rollout:
    """This rank's share of a step: one entry per sequence (prompt + one response)."""

    prompt_index: list[int]
    """Position of each sequence's prompt in the step's global batch."""
    prompts: list[Prompt]
    responses: list[list[int]]
    texts: list[str]
    finish: list[str]
    logprobs: list[list[float]]
    """The engine's log-probs of the sampled tokens (for the training/inference mismatch metric)."""


def load_prompts(files: list[str], prompt_key: str, answer_key: str, tokenizer, prompt_config) -> tuple[list[Prompt], int]:
    """Every record of `files` as a Prompt (skipping over-long ones); returns (prompts, skipped)."""
    from megatron_spo.rollout.estimate import load_records
    from megatron_spo.rollout.prompts import build_prompts
    from megatron_spo.value import prompt_key as key_of

    records = []
    for path in files:
        for i, record in enumerate(load_records(path)):
            if prompt_key not in record or answer_key not in record:
                raise UserError(f"{path}: record {i} has no {prompt_key!r} or {answer_key!r} key (has {sorted(record)})")
            records.append(record)
    if not records:
        raise UserError(f"no records in {', '.join(files)}")
    raws = [r[prompt_key] if isinstance(r[prompt_key], str) else r[prompt_key][-1]["content"] for r in records]
    built = build_prompts([r[prompt_key] for r in records], tokenizer, prompt_config)
    prompts = [
        Prompt(key=key_of(raws[b.index]), raw=raws[b.index], token_ids=b.token_ids, answer=str(records[b.index][answer_key]))
        for b in built.prompts
    ]
    return prompts, len(built.skipped)


class Trainer:
    """Builds every component from a TrainConfig and runs steps."""

    def __init__(self, config: TrainConfig):
        from megatron_spo.models.checkpoint import hf_side_dir_of, load_pretrained
        from megatron_spo.rollout.engine import make_engine
        from megatron_spo.rollout.scoring import ScoringPool
        from megatron_spo.training.actor import Actor, OptimizerSettings

        self.config = cfg = config
        if cfg.algorithm.name not in ("spo", "grpo"):
            raise UserError(
                f"algorithm.name: {cfg.algorithm.name!r} runs through the library functions in "
                "megatron_spo.training.algorithms; the trainer loop drives spo and grpo"
            )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = cfg.check_world_size(world)
        self.parallel = par = platform.init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
        self.is_main = par.rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.n = cfg.rollout.n or 1
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[cfg.model.dtype]

        self.side_dir = hf_side_dir_of(cfg.model.hf_dir)
        self.tokenizer = load_tokenizer(str(self.side_dir))
        self.prompts, skipped = load_prompts(cfg.data.train_files, cfg.data.prompt_key, cfg.data.answer_key,
                                             self.tokenizer, cfg.data.prompt)
        self.prompts_skipped = skipped
        spec, chunks, bridge = load_pretrained(cfg.model.hf_dir, par, dtype=dtype, seed=cfg.seed)
        o = cfg.optimizer
        self.actor = Actor(spec, chunks, bridge, par, OptimizerSettings(
            lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip, warmup_steps=o.warmup_steps,
            decay_steps=(cfg.total_steps - o.warmup_steps) if (cfg.total_steps and o.schedule != "constant") else None,
            decay_style=o.schedule,
        ))
        self.engine = make_engine(cfg.rollout.engine_config(str(self.side_dir), seed=cfg.seed, load_weights=False))
        self.scorer = ScoringPool(cfg.rollout.reward)
        self.store = self._build_value_store()
        self.step = 0
        self.cursor = 0  # position in the shuffled prompt order
        self.epoch = 0
        self.sample_rng = np.random.default_rng(cfg.seed)
        self.generated_tokens = 0
        self._order = self._epoch_order(0)
        self._resume()
        self.logger = self._make_logger()

    # ------------------------------------------------------------------ setup

    def _build_value_store(self):
        from megatron_spo.value import ValueStore

        cfg = self.config
        keys = np.unique(np.array([p.key for p in self.prompts], dtype=np.int64))
        group = self.parallel.dp_group if self.dp > 1 else None
        if cfg.algorithm.name != "spo":
            return None
        if cfg.spo.offline_values:
            store = ValueStore.from_offline_values(cfg.spo.offline_values, cfg.spo, dataset_prompts=[p.raw for p in self.prompts], group=group)
            if self.is_main:
                print(f"value store: {store.num_prompts} prompts, {store.num_missing} missing from "
                      f"{cfg.spo.offline_values} (policy: {cfg.spo.missing})", flush=True)
            return store
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
        take = cfg.batch.gen_batch_size if cfg.algorithm.name == "spo" else cfg.batch.train_batch_size
        pool = []
        while len(pool) < take:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            chunk = self._order[self.cursor : self.cursor + take - len(pool)]
            self.cursor += len(chunk)
            pool.extend(self.prompts[i] for i in chunk)
        if cfg.algorithm.name != "spo":
            return pool
        pool_keys = np.array([p.key for p in pool], dtype=np.int64)
        batch = min(cfg.batch.train_batch_size, len(np.unique(pool_keys)))
        chosen = self.store.sample(pool_keys, batch, self.sample_rng)
        return [pool[i] for i in chosen]

    def _generate(self, batch: list[Prompt]) -> Rollout:
        from megatron_spo.rollout.types import GenerationRequest, SamplingParams

        cfg, par = self.config, self.parallel
        mine = list(range(par.dp_rank, len(batch), self.dp))  # prompts of this DP rank
        r = cfg.rollout
        requests = [
            GenerationRequest(
                prompt_token_ids=batch[i].token_ids,
                params=SamplingParams(
                    n=self.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    max_tokens=r.max_response_tokens, seed=_seed(cfg.seed, self.step, i),
                ),
            )
            for i in mine
        ]
        results = self.engine.generate(requests) if requests else []
        rollout = Rollout([], [], [], [], [], [])
        for i, result in zip(mine, results):
            for completion in result.completions:
                rollout.prompt_index.append(i)
                rollout.prompts.append(batch[i])
                rollout.responses.append(list(completion.token_ids))
                rollout.texts.append(completion.text if completion.text is not None
                                     else self.tokenizer.decode(completion.token_ids))
                rollout.finish.append(completion.finish_reason)
                rollout.logprobs.append(list(completion.logprobs))
        return rollout

    def _sequences(self, prompts: list[Prompt], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+response ids (N, T), targets, and the response mask (N, T).

        The mask sits on the positions that *predict* response tokens (position t predicts t+1).
        """
        pad = self.tokenizer.pad_token_id or 0
        length = max(len(p.token_ids) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), length)
        for row, (p, r) in enumerate(zip(prompts, responses)):
            seq = p.token_ids + r
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, len(p.token_ids) - 1 : len(seq) - 1] = 1.0
        lengths = torch.tensor([len(p.token_ids) + len(r) for p, r in zip(prompts, responses)])
        return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "response_mask": mask, "lengths": lengths}

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, group=self.parallel.dp_group)
        return tensor

    def train_step(self) -> dict[str, float]:
        from megatron_spo.rollout.weight_sync import sync_weights
        from megatron_spo.training.advantages import grpo_advantages, spo_advantages

        cfg, par = self.config, self.parallel
        t0 = time.perf_counter()
        batch = self._next_prompts()
        keys = np.array([p.key for p in batch], dtype=np.int64)
        p_hat_all = self.store.p_hat(keys) if self.store is not None else None  # before any update

        sync = sync_weights(self.engine, self.actor.export_hf(), cfg.rollout.weight_sync)
        t_gen = time.perf_counter()
        rollout = self._generate(batch)
        gen_seconds = time.perf_counter() - t_gen
        scored = self.scorer.score(rollout.texts, [p.answer for p in rollout.prompts])
        rewards = torch.tensor(scored.scores, dtype=torch.float32)

        seq = self._sequences(rollout.prompts, rollout.responses)
        old = self.actor.logprobs(seq["input_ids"], micro_batch_size=cfg.batch.micro_batch_size)["logprobs"]
        mask = seq["response_mask"][:, :-1]
        engine_lp = torch.zeros_like(old)
        for row, (p, lps) in enumerate(zip(rollout.prompts, rollout.logprobs)):
            engine_lp[row, len(p.token_ids) - 1 : len(p.token_ids) - 1 + len(lps)] = torch.tensor(lps)
        mismatch = self._reduce_sum(torch.stack([((engine_lp - old).abs() * mask).sum(), mask.sum()]))
        if cfg.algorithm.name == "spo":
            p_hat = torch.tensor(p_hat_all[rollout.prompt_index], dtype=torch.float32)
            adv = spo_advantages(rewards, p_hat, mask, eps=cfg.algorithm.spo_advantage_eps,
                                 normalize=cfg.algorithm.normalize_advantages, reduce_sum=self._reduce_sum)
        else:
            adv = grpo_advantages(rewards, torch.tensor(rollout.prompt_index), mask, eps=cfg.algorithm.grpo_eps,
                                  norm_by_std=cfg.algorithm.grpo_norm_by_std)

        t_train = time.perf_counter()
        update = self._update_actor(seq, old, adv)
        train_seconds = time.perf_counter() - t_train

        value_metrics = self._update_values(rollout, rewards) if self.store is not None else {}
        self.step += 1
        generated = self._reduce_sum(torch.tensor([float(sum(len(r) for r in rollout.responses))]))[0].item()
        self.generated_tokens += int(generated)
        totals = self._reduce_sum(torch.tensor([rewards.sum().item(), float(rewards.numel()), float((rewards > 0).sum()),
                                                scored.metrics.get("reward/failures_error", 0.0)
                                                + scored.metrics.get("reward/failures_timeout", 0.0)
                                                + scored.metrics.get("reward/failures_nonfinite", 0.0)]))
        adv_seq = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,) per-sequence advantage
        adv_stats = self._reduce_sum(torch.stack([adv_seq.sum(), torch.tensor(float(adv_seq.numel()))]))
        adv_abs_max = adv_seq.abs().max() if adv_seq.numel() else torch.zeros(())
        if self.dp > 1:
            torch.distributed.all_reduce(adv_abs_max, op=torch.distributed.ReduceOp.MAX, group=par.dp_group)
        metrics = {
            "reward/mean": totals[0].item() / max(totals[1].item(), 1),
            "train/accuracy": totals[2].item() / max(totals[1].item(), 1),
            "reward/grader_failures": totals[3].item(),
            "rollout/generated_tokens": generated,
            "rollout/total_generated_tokens": self.generated_tokens,
            "rollout/response_length": generated / max(totals[1].item(), 1),
            "perf/gen_tokens_per_s": generated / max(gen_seconds, 1e-9),
            "perf/train_tokens_per_s": update.pop("tokens", 0.0) / max(train_seconds, 1e-9),
            "perf/weight_sync_s": sync.seconds,
            "perf/weight_sync_gb_per_s": sync.gb_per_s,
            "perf/step_s": time.perf_counter() - t0,
            "advantage/mean": adv_stats[0].item() / max(adv_stats[1].item(), 1.0),
            "advantage/abs_max": adv_abs_max.item(),
            "data/epoch": float(self.epoch),
            # |log pi_engine - log pi_actor| per response token: ~0 when the engine runs the same
            # weights at temperature 1 (a sync bug or a precision gap shows here first)
            "rollout/logprob_mismatch": mismatch[0].item() / max(mismatch[1].item(), 1.0),
        }
        if p_hat_all is not None:
            metrics.update({"p_hat/mean": float(p_hat_all.mean()), "p_hat/std": float(p_hat_all.std()),
                            "p_hat/min": float(p_hat_all.min()), "p_hat/max": float(p_hat_all.max())})
        metrics.update(update)
        metrics.update(value_metrics)
        return metrics

    def _update_actor(self, seq: dict[str, torch.Tensor], old: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
        """PPO-clip updates over mini-batches; returns the step's actor metrics (token means)."""
        from megatron_spo.training.logprobs import microbatches, microbatches_by_tokens

        cfg = self.config
        budget = cfg.batch.max_tokens_per_micro_batch
        data = {**seq, "old_logprobs": _pad_right(old), "advantages": _pad_right(adv)}
        n_local = seq["input_ids"].shape[0]
        steps_per_epoch = cfg.batch.train_batch_size // cfg.batch.mini_batch_size
        per_mini = max(1, n_local // steps_per_epoch)
        sums: dict[str, float] = {}
        for _ in range(cfg.batch.epochs):
            for start in range(0, n_local, per_mini):
                mini = {k: v[start : start + per_mini] for k, v in data.items()}
                mbs = (microbatches_by_tokens(mini, mini["lengths"], budget) if budget
                       else microbatches(mini, cfg.batch.micro_batch_size))
                m = self.actor.train_step(mbs, self._policy_loss)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
        count = max(sums.pop("count", 0.0), 1.0)
        updates = max(1, cfg.batch.epochs * ((n_local + per_mini - 1) // per_mini))
        out = {
            "actor/pg_loss": sums.get("pg_loss_sum", 0.0) / count,
            "actor/clip_fraction": sums.get("clipped_sum", 0.0) / count,
            "actor/approx_kl": sums.get("approx_kl_sum", 0.0) / count,
            "actor/grad_norm": sums.get("grad_norm", 0.0) / updates,
            "actor/lr": sums.get("lr", 0.0) / updates,
            "actor/skipped_steps": sums.get("skipped", 0.0),
            "tokens": sums.get("tokens", 0.0),
        }
        return out

    def _policy_loss(self, logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Sum over this micro-batch's response tokens of the PPO-clip loss (Actor divides by the
        global token count, giving token-mean over the whole mini-batch)."""
        from megatron_spo.training.losses import ppo_clip_loss
        from megatron_spo.training.logprobs import vocab_parallel_logprobs

        lp, _ = vocab_parallel_logprobs(logits, mb["targets"])
        lp = lp[:, :-1]
        mask = mb["response_mask"][:, :-1]
        old, adv = mb["old_logprobs"][:, : lp.shape[1]], mb["advantages"][:, : lp.shape[1]]
        loss_cfg = self.config.loss
        if loss_cfg.loss_agg == "seq-mean":
            per_seq = mask.sum(1).clamp(min=1)
            weights = mask / per_seq.unsqueeze(1)
            count = torch.tensor(float((mask.sum(1) > 0).sum()))
        else:
            weights = mask
            count = mask.sum()
        out = ppo_clip_loss(lp, old, adv, weights, clip_ratio_low=loss_cfg.clip_ratio_low,
                            clip_ratio_high=loss_cfg.clip_ratio_high, clip_ratio_c=loss_cfg.clip_ratio_c,
                            loss_agg="token-mean", denominator=1.0)
        n_tokens = mask.sum()
        metrics = {
            "pg_loss_sum": out.loss.detach(),
            "clipped_sum": out.clip_fraction * (count if loss_cfg.loss_agg == "token-mean" else n_tokens),
            "approx_kl_sum": out.approx_kl * count,
            "tokens": mb["lengths"].sum().float(),
        }
        return out.loss, count, metrics

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
            both = self._sequences(rollout.prompts + rollout.prompts, prev_responses + rollout.responses)
            lp = self.actor.logprobs(both["input_ids"], micro_batch_size=self.config.batch.micro_batch_size)["logprobs"]
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
        """Held-out accuracy, pass@k and maj@k of the current policy (generation split over DP)."""
        from megatron_spo.rollout.estimate import load_records
        from megatron_spo.rollout.weight_sync import sync_weights
        from megatron_spo.training.eval_cli import EvalSettings, evaluate

        cfg, par = self.config, self.parallel
        if not cfg.eval_files:
            return {}
        if not hasattr(self, "_eval_records"):
            self._eval_records = [r for path in cfg.eval_files for r in load_records(path)]
        sync_weights(self.engine, self.actor.export_hf(), cfg.rollout.weight_sync)
        e = cfg.eval
        settings = EvalSettings(
            n=e.n, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, seed=cfg.seed, ks=e.ks,
            max_tokens=e.max_response_tokens or cfg.rollout.max_response_tokens,
            prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key, prompt=cfg.data.prompt,
        )
        result = evaluate(self.engine, self.tokenizer, self._eval_records, settings, pool=self.scorer,
                          rank=par.dp_rank, world_size=self.dp, group=par.dp_group if self.dp > 1 else None)
        return {f"eval/{k}": float(v) for k, v in result.get("overall", {}).items()}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """model + optimizer + scheduler + value store + sampler + RNG + step, atomically."""
        from megatron_spo.models.checkpoint import save_mcore_checkpoint

        par = self.parallel
        root = self.config.checkpoint_dir
        final = root / f"step_{self.step:08d}"
        save_mcore_checkpoint(self.actor.raw_chunks, par, final / "model", hf_side_dir=self.side_dir,
                              architecture=self.actor.spec.architecture,
                              dtype=self.actor.raw_chunks[0].config.params_dtype, overwrite=True)
        # everything below lands in a temporary sibling first; the state file is written last and
        # its presence is what marks the checkpoint complete
        _fault_injection_pause(self.step)
        rank_dir = final / "ranks"
        rank_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(rank_dir / f"rank{par.rank:05d}.pt", _torch_bytes({
            "optimizer": self.actor.optimizer.state_dict(),
            "scheduler": self.actor.scheduler.state_dict(),
            "actor_steps": self.actor.steps,
            "torch_rng": torch.get_rng_state(),
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
            })
            self._prune_checkpoints()
        _barrier(par)
        return final

    def _prune_checkpoints(self) -> None:
        complete = complete_checkpoints(self.config.checkpoint_dir)
        for old in complete[: -self.config.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.config.checkpoint_dir.glob("step_*"):
            if partial not in complete and partial.name != f"step_{self.step:08d}":
                shutil.rmtree(partial, ignore_errors=True)

    def _resume(self) -> None:
        from megatron_spo.models.checkpoint import load_mcore_checkpoint
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
        rank_state = torch.load(latest / "ranks" / f"rank{par.rank:05d}.pt", weights_only=False)
        self.actor.optimizer.load_state_dict(rank_state["optimizer"])
        self.actor.scheduler.load_state_dict(rank_state["scheduler"])
        self.actor.steps = rank_state["actor_steps"]
        torch.set_rng_state(rank_state["torch_rng"])
        if self.store is not None:
            self.store = ValueStore.load(latest / "value_store", self.config.spo,
                                         group=self.parallel.dp_group if self.dp > 1 else None)
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
        while self.step < total:
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


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories whose state file exists (written last), oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).is_file())


def _seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + (step + 1) * 10_007 + index) % (2**31 - 1)


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
