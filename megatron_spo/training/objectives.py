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
                               second mean uses `kl_scale` = masked tokens / sequences of the global
                               mini-batch, precomputed by the trainer
    soft     (soft_spo)        mean over sequences of the soft-Q loss

Deliberate difference from the segment authors: their token mean is per micro-batch; ours is over
the whole mini-batch (the same thing with one micro-batch).

Micro-batch keys (all (b, s) aligned with `input_ids`, position t scoring token t+1):
`targets`, `response_mask` (1 on tokens that carry gradient), `old_logprobs` (ppo: absent when
the step makes a single update on fresh samples, then pi_old is the forward's own), `advantages`,
`ref_logprobs` (when a reference is used), `rewards` / `q0` / `kl_scale` ((b,)).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig, segment_loss_terms
from megatron_spo.training.algorithms.soft_spo import SoftSPOConfig, soft_spo_loss
from megatron_spo.training.logprobs import vocab_parallel_logprobs
from megatron_spo.training.losses import aggregate, kl_penalty, ppo_clip_loss


@dataclasses.dataclass(kw_only=True)
class PPOObjective:
    clip_ratio_low: float
    clip_ratio_high: float
    clip_ratio_c: float
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    temperature: float = 1.0
    tp_group: object = None

    def __call__(self, logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, entropy = vocab_parallel_logprobs(logits, mb["targets"], tp_group=self.tp_group,
                                              temperature=self.temperature, with_entropy=True)
        lp, entropy = lp[:, :-1], entropy[:, :-1]
        width = lp.shape[1]
        mask = mb["response_mask"][:, :width]
        if self.loss_agg == "seq-mean":
            weights = mask / mask.sum(1, keepdim=True).clamp(min=1)
            count = (mask.sum(1) > 0).sum().to(lp.dtype)
        else:
            weights = mask
            count = mask.sum()
        # without old log-probs the step makes one update on fresh samples: pi_old is this forward's
        old = mb["old_logprobs"][:, :width] if "old_logprobs" in mb else lp.detach()
        out = ppo_clip_loss(lp, old, mb["advantages"][:, :width], weights,
                            clip_ratio_low=self.clip_ratio_low, clip_ratio_high=self.clip_ratio_high,
                            clip_ratio_c=self.clip_ratio_c, loss_agg="token-mean", denominator=1.0)
        loss = out.loss
        entropy_sum = aggregate(entropy if self.entropy_coef else entropy.detach(), weights, "token-mean",
                                denominator=1.0)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy_sum
        metrics = {
            "pg_loss_sum": out.loss.detach(),
            "clipped_sum": out.clip_fraction * count,
            "approx_kl_sum": out.approx_kl * count,
            "entropy_sum": entropy_sum.detach(),
            "tokens": mb["lengths"].sum().float(),
        }
        if self.kl_coef:
            kl_sum = aggregate(kl_penalty(lp, mb["ref_logprobs"][:, :width], self.kl_estimator), weights,
                               "token-mean", denominator=1.0)
            loss = loss + self.kl_coef * kl_sum
            metrics["kl_ref_sum"] = kl_sum.detach()
        return loss, count, metrics


@dataclasses.dataclass(kw_only=True)
class SegmentObjective:
    config: SegmentLossConfig
    temperature: float = 1.0
    tp_group: object = None

    def __call__(self, logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, entropy = vocab_parallel_logprobs(logits, mb["targets"], tp_group=self.tp_group,
                                              temperature=self.temperature, with_entropy=True)
        lp, entropy = lp[:, :-1], entropy[:, :-1].detach()
        width = lp.shape[1]
        mask = mb["response_mask"][:, :width]
        use_kl = self.config.kl_coef > 0
        terms = segment_loss_terms(lp, mb["old_logprobs"][:, :width], mb["advantages"][:, :width], mask.bool(),
                                   self.config, ref_logprobs=mb["ref_logprobs"][:, :width] if use_kl else None)
        count = mask.sum()
        pg_sum = terms.pg.sum()
        loss = pg_sum
        metrics = {
            "pg_loss_sum": pg_sum.detach(),
            "clipped_sum": terms.clipped.sum(),
            "approx_kl_sum": (0.5 * (lp.detach() - mb["old_logprobs"][:, :width]).square() * mask).sum(),
            "entropy_sum": (entropy * mask).sum(),
            "tokens": mb["lengths"].sum().float(),
        }
        if use_kl:
            # kl_coef * sum_seq(sum_t kl) / n_seq == kl_coef * kl_scale * sum(kl) / n_masked_tokens
            kl_sum = (terms.kl.sum(1) * mb["kl_scale"]).sum()
            loss = loss + self.config.kl_coef * kl_sum
            metrics["kl_ref_sum"] = terms.kl.sum().detach()
        return loss, count, metrics


@dataclasses.dataclass(kw_only=True)
class SoftObjective:
    config: SoftSPOConfig
    tp_group: object = None

    def __call__(self, logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        lp, _ = vocab_parallel_logprobs(logits, mb["targets"], tp_group=self.tp_group)
        lp = lp[:, :-1]
        width = lp.shape[1]
        mask = mb["response_mask"][:, :width]
        live = (mask.sum(1) > 0).to(lp.dtype)  # padding rows of an empty rank carry nothing
        out = soft_spo_loss(lp, mb["ref_logprobs"][:, :width], mask, mb["rewards"], mb["q0"], self.config)
        loss_sum = (out.per_sequence_loss * live).sum()
        metrics = {
            "pg_loss_sum": loss_sum.detach(),
            "soft_q_sum": (out.q_terminal * live).sum(),
            "soft_log_ratio_sum": (out.advantage_sum * live).sum() / self.config.beta,
            "tokens": mb["lengths"].sum().float(),
        }
        return loss_sum, live.sum(), metrics
