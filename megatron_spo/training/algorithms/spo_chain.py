"""Segment Policy Optimization, chain variant (Guo et al. 2025, seed 003), as a trainer algorithm.

Each response is cut at probability-guided points; K continuations from each cut point's token
prefix give Monte-Carlo values of the boundaries, hence one advantage per segment
(`segment_chain`); responses and continuations cut by length score `truncated_reward` (the
authors' 0), and the stop token ending a response carries no gradient (`loss.train_on_eos`).
The continuations need the actor's old log-probs (the cut points are where the old policy was
unsure), so they run after the old-policy pass, on the rollout group that generated the prompt.
Training: the probability mask, whitening and PPO-clip of `segment_loss`.
"""

from __future__ import annotations

from megatron_spo.training.algorithms.base import Algorithm, AlgorithmSetup
from megatron_spo.training.batch import pad_right, per_token
from megatron_spo.training.rollouts import Rollout, Sampling


class SegmentAlgorithm(Algorithm):
    """What SPO-chain and SPO-tree share: their own sampling settings and the segment objective
    over raw per-token advantages (`Rollout.token_advantages`)."""

    def __init__(self, config, *, batch, tp_group=None):
        self.config = config
        self.sampling = Sampling(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                 max_tokens=config.max_response_tokens)
        self.train_batch_size = batch.train_batch_size
        self.needs_reference = config.loss.kl_coef > 0
        from megatron_spo.training.objectives import SegmentObjective

        self.objective = SegmentObjective(config=config.loss, temperature=self.sampling.temperature,
                                          tp_group=tp_group)

    def prepare(self, ctx, rollout, batch, old):
        """Advantages on the probability-masked tokens, whitened over the step (or raw, for the
        objective to whiten each micro-batch: `loss.whiten_scope`); only those tokens carry gradient."""
        from megatron_spo.training.algorithms.segment_loss import prepare_segment_batch

        raw = per_token(rollout.contexts, rollout.token_advantages, old)
        adv, loss_mask = prepare_segment_batch(raw, old, batch.target_mask, self.config.loss,
                                               reduce_fn=ctx.reduce_sum)
        return batch.replace(advantages=pad_right(adv), response_mask=pad_right(loss_mask.float())), adv


class SPOChain(SegmentAlgorithm):
    name = "spo_chain"
    keeps_engine_after_generation = True  # the continuations run after the old-policy pass

    def __init__(self, config, *, rollout, batch, tp_group=None):
        super().__init__(config, batch=batch, tp_group=tp_group)
        self.n = rollout.n

    @classmethod
    def from_config(cls, cfg, setup: AlgorithmSetup) -> SPOChain:
        return cls(cfg.algorithm.spo_chain, rollout=cfg.rollout, batch=cfg.batch, tp_group=setup.tp_group)

    def generate(self, ctx, batch):
        """`n` scored responses to each prompt, as every algorithm's, but scored and masked as the
        authors': a response cut by length gets `truncated_reward`, its stop token no gradient
        unless `loss.train_on_eos` (`segment_chain`, `segment_loss`)."""
        from megatron_spo.training import rollouts

        seeds = ctx.seeds(len(batch))
        scorer = rollouts.PromptScorer(ctx.scorer, ctx.tokenizer, [p.answer for p in batch])
        return ctx.distributed_rollout(len(batch), lambda mine: rollouts.generate(
            ctx.engine, ctx.tokenizer, scorer, batch, mine, n=self.n, sampling=self.sampling, seeds=seeds,
            truncated_reward=self.config.truncated_reward, train_on_stop_token=self.config.loss.train_on_eos))

    def after_old_logprobs(self, ctx, rollout, old, batch_size):
        """Per-token segment advantages of this DP rank's sequences from K continuations at each
        cut point. The rollout group that generated a prompt's sequences continues them: the
        replica first sends it the actor's old log-probs (and the sequences, which a group outside
        the replica no longer holds), then it sends the advantages back."""
        from megatron_spo.training.rollouts import attach_chain_advantages

        old_rows = [old[i, len(c) - 1 : len(c) - 1 + len(r)].tolist()
                    for i, (c, r) in enumerate(zip(rollout.contexts, rollout.responses))]
        seeds = self.sequence_seeds(ctx, rollout, batch_size)
        plan = ctx.plan([i % ctx.dp for i in range(batch_size)])
        rows: dict[int, list[int]] = {}
        for row, i in enumerate(rollout.prompt_index):
            rows.setdefault(i, []).append(row)
        held = {i: (part, [old_rows[r] for r in rows.get(i, [])], [seeds[r] for r in rows.get(i, [])])
                for i, part in rollout.split(plan.results.wanted_by(ctx.rank)).items()}
        inputs = ctx.exchange(held, plan.inputs)  # the positions this rank's engine continues
        work = Rollout.concat([inputs[i][0] for i in plan.generate])
        work.generated_tokens, work.grader_failures, work.token_advantages = 0, 0.0, []
        if len(work):
            attach_chain_advantages(work, ctx.engine, ctx.scorer, ctx.tokenizer, self.config,
                                    [lp for i in plan.generate for lp in inputs[i][1]],
                                    [seed for i in plan.generate for seed in inputs[i][2]])
        done = {i: (part.token_advantages, part.generated_tokens, part.grader_failures)
                for i, part in work.split(plan.generate).items()}
        results = ctx.exchange(done, plan.results)
        rollout.token_advantages = [adv for i in sorted(results) for adv in results[i][0]]
        rollout.generated_tokens += sum(tokens for _, tokens, _ in results.values())
        rollout.grader_failures += sum(failures for _, _, failures in results.values())

    def sequence_seeds(self, ctx, rollout, batch_size: int) -> list[int]:
        """Continuations of the n responses to one prompt must differ: the j-th response to
        prompt i is seeded by position i * n + j, not by its prompt."""
        seeds = ctx.seeds(batch_size * self.n, salt=31)
        nth: dict[int, int] = {}
        out = []
        for i in rollout.prompt_index:
            out.append(seeds[i * self.n + nth.get(i, 0)])
            nth[i] = nth.get(i, 0) + 1
        return out
