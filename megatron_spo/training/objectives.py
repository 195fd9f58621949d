"""The per-algorithm training objectives in the actor's loss contract.

`Actor.train_step` calls `loss_fn(logits, micro_batch)` and expects `(loss_sum, count, metrics)`:
Megatron sums `loss_sum` gradients over micro-batches and data-parallel ranks and divides once by
the global `count`. Each objective here therefore returns a *sum* and the count that turns it into
the algorithm's mean, so the result does not depend on how a mini-batch is cut into micro-batches
or spread over ranks:

    ppo      (spo, grpo)       token-mean (count = response tokens) or seq-mean (count = sequences)
                               of PPO clip - entropy_coef * entropy + kl_coef * KL(k1/k2/k3)
    segment  (spo_chain/tree)  token mean over the probability-masked tokens of the PPO-clip term,
                               plus kl_coef * (per-sequence k3 sum, averaged over sequences); the
                               second mean is rescaled by the global mini-batch's masked tokens /
                               sequences (`TrainBatch.mini_batch_tokens / mini_batch_sequences`)
    soft     (soft_spo)        mean over sequences of the soft-Q loss

Deliberate difference from the segment authors: their token mean is per micro-batch; ours is over
the whole mini-batch (the same thing with one micro-batch). Their advantage whitening is per
micro-batch too; ours is over the step unless `whiten_scope: micro_batch`, which whitens here, per
micro-batch (`algorithms.segment_loss` says why the step is the default).

Each objective reads a `training.batch.TrainBatch` micro-batch (its fields say what they hold)
and names how its metric sums are reported (`REPORTED`: sum -> metric, divided by the count).
`as_loss_fn` adapts an objective to the actor's micro-batch mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig, segment_loss_terms, whiten_masked
from megatron_spo.training.algorithms.soft_spo import SoftSPOConfig, soft_spo_loss
from megatron_spo.training.batch import TrainBatch
from megatron_spo.training.logprobs import vocab_parallel_logprobs
from megatron_spo.training.losses import aggregate, kl_penalty, ppo_clip_loss


@dataclasses.dataclass(kw_only=True)
class PPOObjective:
    """PPO-clip (dual clip) with optional entropy bonus and KL to the reference (spo, grpo).
    `config`: `training.config.PolicyLossConfig`."""

    config: Any
    temperature: float = 1.0
    tp_group: object = None

    REPORTED = {"pg_loss_sum": "actor/pg_loss", "clipped_sum": "actor/clip_fraction",
                "approx_kl_sum": "actor/approx_kl", "entropy_sum": "actor/entropy", "kl_ref_sum": "actor/kl_ref"}

    def __call__(self, logits: torch.Tensor, mb: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        c = self.config
        lp, entropy = vocab_parallel_logprobs(logits, mb.targets, tp_group=self.tp_group,
                                              temperature=self.temperature, with_entropy=True)
        lp, entropy = lp[:, :-1], entropy[:, :-1]
        width = lp.shape[1]
        mask = mb.response_mask[:, :width]
        if c.loss_agg == "seq-mean":
            weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
            count = (mask.sum(1) > 0).sum().to(lp.dtype)
        else:
            weights = mask
            count = mask.sum()
        # without old log-probs the step makes one update on fresh samples: pi_old is this forward's
        old = mb.old_logprobs[:, :width] if mb.old_logprobs is not None else lp.detach()
        out = ppo_clip_loss(lp, old, mb.advantages[:, :width], weights,
                            clip_ratio_low=c.clip_ratio_low, clip_ratio_high=c.clip_ratio_high,
                            clip_ratio_c=c.clip_ratio_c, loss_agg="token-mean", denominator=1.0,
                            token_weights=None if mb.is_weights is None else mb.is_weights[:, :width])
        loss = out.loss
        entropy_sum = aggregate(entropy if c.entropy_coef else entropy.detach(), weights, "token-mean",
                                denominator=1.0)
        if c.entropy_coef:
            loss = loss - c.entropy_coef * entropy_sum
        metrics = {
            "pg_loss_sum": out.loss.detach(),
            "clipped_sum": out.clip_fraction * count,
            "approx_kl_sum": out.approx_kl * count,
            "entropy_sum": entropy_sum.detach(),
            "tokens": mb.lengths.sum().float(),
        }
        if c.kl_coef:
            kl_sum = aggregate(kl_penalty(lp, mb.ref_logprobs[:, :width], c.kl_estimator), weights,
                               "token-mean", denominator=1.0)
            loss = loss + c.kl_coef * kl_sum
            metrics["kl_ref_sum"] = kl_sum.detach()
        return loss, count, metrics


@dataclasses.dataclass(kw_only=True)
class SegmentObjective:
    """PPO clip on segment advantages over the probability-masked tokens plus the k3 KL
    (spo_chain, spo_tree); with `whiten_scope: micro_batch` it whitens each micro-batch first.
    `config`: `algorithms.segment_loss.SegmentLossConfig`."""

    config: SegmentLossConfig
    temperature: float = 1.0
    tp_group: object = None

    REPORTED = PPOObjective.REPORTED

    def __call__(self, logits: torch.Tensor, mb: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, entropy = vocab_parallel_logprobs(logits, mb.targets, tp_group=self.tp_group,
                                              temperature=self.temperature, with_entropy=True)
        lp, entropy = lp[:, :-1], entropy[:, :-1].detach()
        width = lp.shape[1]
        mask = mb.response_mask[:, :width]
        old = mb.old_logprobs[:, :width]
        advantages = mb.advantages[:, :width]
        if self.config.whiten_advantages and self.config.whiten_scope == "micro_batch":
            # the authors' scope: this micro-batch's masked tokens (prepare left them raw)
            advantages = whiten_masked(advantages, mask.bool(), eps=self.config.whiten_eps) * mask
        use_kl = self.config.kl_coef > 0
        terms = segment_loss_terms(lp, old, advantages, mask.bool(), self.config,
                                   ref_logprobs=mb.ref_logprobs[:, :width] if use_kl else None)
        count = mask.sum()
        pg_sum = terms.pg.sum()
        loss = pg_sum
        metrics = {
            "pg_loss_sum": pg_sum.detach(),
            "clipped_sum": terms.clipped.sum(),
            "approx_kl_sum": (0.5 * (lp.detach() - old).square() * mask).sum(),
            "entropy_sum": (entropy * mask).sum(),
            "tokens": mb.lengths.sum().float(),
        }
        if use_kl:
            # kl_coef * sum_seq(sum_t kl) / n_seq == kl_coef * scale * sum(kl) / n_masked_tokens, with
            # scale = masked tokens / sequences of the whole mini-batch
            scale = mb.mini_batch_tokens / mb.mini_batch_sequences.clamp(min=1)
            kl_sum = (terms.kl.sum(1) * scale).sum()
            loss = loss + self.config.kl_coef * kl_sum
            metrics["kl_ref_sum"] = terms.kl.sum().detach()
        return loss, count, metrics


@dataclasses.dataclass(kw_only=True)
class SoftObjective:
    config: SoftSPOConfig
    tp_group: object = None

    REPORTED = {"pg_loss_sum": "actor/pg_loss", "soft_q_sum": "soft/q_terminal",
                "soft_log_ratio_sum": "soft/log_ratio_sum"}

    def __call__(self, logits: torch.Tensor, mb: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, _ = vocab_parallel_logprobs(logits, mb.targets, tp_group=self.tp_group)
        lp = lp[:, :-1]
        width = lp.shape[1]
        mask = mb.response_mask[:, :width]
        live = (mask.sum(1) > 0).to(lp.dtype)  # padding rows of an empty rank carry nothing
        out = soft_spo_loss(lp, mb.ref_logprobs[:, :width], mask, mb.rewards, mb.q0, self.config)
        loss_sum = (out.per_sequence_loss * live).sum()
        metrics = {
            "pg_loss_sum": loss_sum.detach(),
            "soft_q_sum": (out.q_terminal * live).sum(),
            "soft_log_ratio_sum": (out.advantage_sum * live).sum() / self.config.beta,
            "tokens": mb.lengths.sum().float(),
        }
        return loss_sum, live.sum(), metrics


def as_loss_fn(objective):
    """The actor's loss contract (`loss_fn(logits, mapping)`) for an objective of a TrainBatch."""
    return lambda logits, mb: objective(logits, TrainBatch.from_tensors(mb))
