"""Single-stream Policy Optimization (Xu & Ding, arXiv 2509.13232; the authors' verl recipe).

One response per prompt. Each prompt keeps a Beta posterior of its success rate in the value store
(`megatron_spo.value`); a step

1. draws its prompts from a pool of the next `gen_batch_size` prompts of the data order, weighted
   by the posterior (prioritised sampling: `ValueStore.sample`);
2. reads p_hat of those prompts *before* any update of this step (the authors' order);
3. trains on advantages r - p_hat, normalised over the global batch (`spo_advantages`);
4. after the actor update, measures each prompt's KL drift D: the mean over the model-written
   tokens (`drift_tokens`; the authors count tool output too) of the response stored at the
   prompt's previous visit, of |log pi_old - log pi_new|, with pi_old the log-probs stored then
   and pi_new the actor now; the forgetting factor rho = f(D)
   (`value.tracker.rho_from_drift`, or a constant), then the posterior update with reward r and
   rho; this step's response and its new log-probs are stored for the next visit.

Rewards must lie in [0, 1]: the posterior is a Beta of a success rate (a fractional reward counts
as a partial success), and the advantage uses the same reward. A reward outside (e.g. a custom
reward in {-1, 1}) stops the run with one line instead of training against a tracker that
silently clamps it; rescale such a reward in the reward function.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_spo.training.algorithms.base import Algorithm, AlgorithmSetup, single_update_on_fresh_samples
from megatron_spo.training.algorithms.grpo import ppo_objective, rollout_sampling, tool_agent
from megatron_spo.training.batch import TrainBatch, pad_right


class SPO(Algorithm):
    name = "spo"

    def __init__(self, config, store, *, rollout, batch, seed: int, tp_group=None):
        self.config, self.store = config, store
        self.n = 1
        self.sampling = rollout_sampling(rollout)
        self.agent = tool_agent(rollout, self.sampling)
        self.train_batch_size = batch.train_batch_size
        self.needs_reference = config.loss.kl_coef > 0
        self.objective = ppo_objective(config.loss, self.sampling.temperature, tp_group)
        self.rng = np.random.default_rng(seed)
        self.p_hat: np.ndarray | None = None  # of the step's prompts, read before its update

    @classmethod
    def from_config(cls, cfg, setup: AlgorithmSetup) -> SPO:
        from megatron_spo.value import ValueStore

        spo = cfg.algorithm.spo
        if spo.offline_values:
            # from_offline_values prints what it matched, what it filled with the prior, what it dropped
            store = ValueStore.from_offline_values(spo.offline_values, spo, group=setup.dp_group,
                                                   dataset_prompts=[p.raw for p in setup.prompts],
                                                   strip_suffix=cfg.data.prompt.answer_format_suffix)
        else:
            keys = np.unique(np.array([p.key for p in setup.prompts], dtype=np.int64))
            store = ValueStore.from_keys(keys, spo, group=setup.dp_group)
        return cls(spo, store, rollout=cfg.rollout, batch=cfg.batch, seed=cfg.seed, tp_group=setup.tp_group)

    # ------------------------------------------------------------------ the step

    @property
    def prompts_per_step(self) -> int:
        return self.config.gen_batch_size  # the pool, as the authors' dataloader batch

    def choose_prompts(self, order):
        pool = order.take(self.config.gen_batch_size)
        pool_keys = np.array([p.key for p in pool], dtype=np.int64)
        size = min(self.train_batch_size, len(np.unique(pool_keys)))
        return [pool[i] for i in self.store.sample(pool_keys, size, self.rng)]

    def choose_async_prompts(self, order, count: int, *, exclude):
        """rollout.mode=async: `count` prompts (at most a batch) drawn as `choose_prompts` draws,
        from the next pool without the prompts in `exclude` (in flight); with nothing in flight,
        the same draw."""
        pool = [p for p in order.take(self.config.gen_batch_size) if p.key not in exclude]
        pool_keys = np.array([p.key for p in pool], dtype=np.int64)
        size = min(count, len(np.unique(pool_keys)))
        return [pool[i] for i in self.store.sample(pool_keys, size, self.rng)] if size else []

    def before_generation(self, ctx, batch):
        # sync: before generation; async: when the batch is trained (the trainer calls it then)
        self.p_hat = self.store.p_hat(np.array([p.key for p in batch], dtype=np.int64))

    def needs_old_logprobs(self, batch_config) -> bool:
        return not single_update_on_fresh_samples(batch_config)

    def prepare(self, ctx, rollout, batch, old):
        from megatron_spo.training.advantages import spo_advantages

        rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
        _refuse_rewards_outside_unit_interval(ctx, rewards)
        p_hat = torch.tensor(self.p_hat[rollout.prompt_index], dtype=torch.float32)
        adv = spo_advantages(rewards, p_hat, batch.target_mask, eps=self.config.advantage_eps,
                             normalize=self.config.normalize_advantages, reduce_sum=ctx.reduce_sum)
        return batch.replace(advantages=pad_right(adv)), adv

    def after_update(self, ctx, rollout):
        keys = np.array([p.key for p in rollout.prompts], dtype=np.int64)
        rewards = np.asarray(rollout.rewards, dtype=np.float32).astype(np.float64)  # in [0, 1]: `prepare` checked
        if self.config.rho_mode == "constant":
            rho, drift = np.full(keys.shape, self.config.rho), np.zeros(keys.shape)
        else:
            rho, drift = self._rho_from_drift(ctx, rollout, keys)
        self.store.update(keys, rewards, rho)
        stats = ctx.reduce_sum(torch.tensor([float(rho.sum()), float(drift.sum()), float(len(keys))],
                                            dtype=torch.float64))
        n = max(stats[2].item(), 1.0)
        p = self.p_hat
        return {"p_hat/mean": float(p.mean()), "p_hat/std": float(p.std()), "p_hat/min": float(p.min()),
                "p_hat/max": float(p.max()), "rho/mean": stats[0].item() / n, "kl_drift/mean": stats[1].item() / n}

    def _rho_from_drift(self, ctx, rollout, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rho of each prompt from the KL drift of its previous response; stores this step's
        responses with their new log-probs for the next visit (NaN on tool-output tokens when
        `drift_tokens` is `model`, so the next drift leaves them out)."""
        from megatron_spo.value.tracker import kl_drift, rho_from_drift

        stored = self.store.stored_responses(keys)
        prev_ids, prev_old, prev_mask = stored.padded(ctx.pad_id)
        prev = [prev_ids[i, : int(prev_mask[i].sum())].tolist() for i in range(len(keys))]
        # new log-probs of the stored responses and of this step's responses, in one pass
        responses = prev + rollout.responses
        both = TrainBatch.from_sequences(rollout.contexts + rollout.contexts, responses,
                                         [[1] * len(r) for r in responses], ctx.pad_id)
        lp = ctx.logprobs(ctx.actor, both)
        mask = both.target_mask.bool()
        new_prev = [lp[i][mask[i]] for i in range(len(keys))]
        new_cur = [lp[len(keys) + i][mask[len(keys) + i]] for i in range(len(keys))]
        if self.config.drift_tokens == "model":
            new_cur = [torch.where(torch.tensor(m, dtype=torch.bool), v, float("nan")) if len(m) else v
                       for v, m in zip(new_cur, rollout.masks)]
        drift = np.zeros(len(keys))
        if len(keys) and prev_old.numel():
            new_padded = torch.zeros_like(prev_old)
            for i, values in enumerate(new_prev):
                new_padded[i, : values.numel()] = values
            counted = prev_mask & torch.isfinite(prev_old)  # NaN: a tool-output token (model tokens only)
            drift = np.asarray(kl_drift(prev_old.nan_to_num(), new_padded, counted), dtype=np.float64)
            drift[~np.asarray(stored.present, dtype=bool)] = 0.0
        self.store.store_responses(keys, rollout.responses, [v.tolist() for v in new_cur])
        return rho_from_drift(drift, self.config), drift

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"sample_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["sample_rng"]

    def sharded_state(self) -> dict:
        return {"value_store": _StoreState(self)}


def _refuse_rewards_outside_unit_interval(ctx, rewards: torch.Tensor) -> None:
    """One line on every rank (agreed over DP, so no rank waits in a collective) when a reward is
    outside [0, 1] or not finite."""
    bad = ~(torch.isfinite(rewards) & (rewards >= 0) & (rewards <= 1))
    count = int(ctx.reduce_sum(torch.tensor([float(bad.sum())]))[0])
    if count:
        from megatron_spo.errors import UserError

        example = f" (e.g. {rewards[bad][0].item():g})" if bad.any() else ""
        raise UserError(f"algorithm spo: {count} reward(s) outside [0, 1] this step{example}; the value tracker's "
                        "Beta posterior needs rewards in [0, 1]: rescale the reward (rollout.reward.function) "
                        "or use algorithm.name=grpo")


class _StoreState:
    """The value store in a checkpoint: sharded over DP ranks, written by the first TP/PP rank of
    each (`ValueStore.save`); loading replaces the algorithm's store."""

    def __init__(self, algorithm: SPO):
        self.algorithm = algorithm

    def save(self, directory) -> None:
        self.algorithm.store.save(directory)

    def load(self, directory) -> None:
        from megatron_spo.value import ValueStore

        old = self.algorithm.store
        self.algorithm.store = ValueStore.load(directory, self.algorithm.config, group=old.group)
