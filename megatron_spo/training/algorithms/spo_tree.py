"""Segment Policy Optimization, tree variant (Guo et al. 2025, seed 003), as a trainer algorithm.

A tree per prompt grown level by level with fixed-length segments (`segment_tree`); node values
are the means of their leaves' rewards, and every edge with a non-zero advantage becomes one
training sequence (context = the prompt and the parent's prefix). Training as SPO-chain.

Edge replay (`replay_edges_per_question` N > 0; off by default). The authors do not train every
edge of an iteration at once: `src/treetune/episode_generators/hybrid_episode_generator.py`
(`OnPolicyReplayBuffer`, N = 32, age limit 8 iterations) adds the iteration's edges, with their
log-probs under the actor that sampled them, to a buffer; drops edges 8 or more iterations old;
draws at most N edges per question at random from what is left; trains on those, each with the
old log-probs it was buffered with; keeps the rest for later iterations. `EdgeReplay` does that
per DP rank, once the step's edges have reached the rank that trains them:

    generate   fresh edges -> `EdgeReplay.draw`: the step's rollout is the drawn fresh edges (at
               their prompt's position) and the drawn buffered edges (position -1: spread over
               the mini-batches; engine log-probs NaN, so the log-prob mismatch metric skips them)
    prepare    the drawn buffered rows get their stored old log-probs (ratio, probability mask);
               the fresh edges not drawn get theirs from one forward pass of the actor, still the
               sampling policy, and wait in the buffer (`EdgeReplay.keep`)

Deliberate differences: a question's edges are grouped per DP rank (a question drawn again later
on another rank starts a second group there); each question's draw uses a generator seeded by
(run seed, step, question), so a resumed run draws as an uninterrupted one (the buffer is in
`state_dict`). With replay a step is not invariant to the DP size, as it is without: the buffer
is per rank and the replayed edges spread over that rank's mini-batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_spo.training.algorithms.base import AlgorithmSetup
from megatron_spo.training.algorithms.spo_chain import SegmentAlgorithm
from megatron_spo.training.batch import TrainBatch, pad_right
from megatron_spo.training.rollouts import Rollout


class EdgeReplay:
    """One DP rank's buffer of SPO-tree edges waiting to be trained (module docstring).

    An edge is a dict: question (prompt key), step (that sampled it), prompt, context, response,
    mask, reward, advantages (per token), old_logprobs (per response token, under the sampling
    policy at the loss temperature)."""

    def __init__(self, per_question: int, max_age: int):
        self.per_question, self.max_age = per_question, max_age
        self.edges: list[dict] = []
        """Buffered edges, oldest first."""
        self.waiting: list[dict] = []
        """This step's fresh edges not drawn, until `keep` gives them their old log-probs."""
        self.replayed_old: dict[int, list[float]] = {}
        """Row of the last drawn rollout -> the stored old log-probs of that replayed edge."""
        self.counts = {"replayed": 0, "dropped": 0}

    def draw(self, rollout: Rollout, step: int, seed: int) -> Rollout:
        """The step's training edges: per question, at most `per_question` of its fresh edges (rows
        of `rollout`) and buffered edges, drawn at random (a generator seeded by (seed, step,
        question), so a question's draw does not depend on the others or the rank); edges
        `max_age` steps old are dropped first. Fresh edges not drawn wait for `keep`."""
        if self.waiting:
            raise RuntimeError("EdgeReplay.draw again before keep: the last step's waiting edges were not buffered")
        young = [e for e in self.edges if step - e["step"] < self.max_age]
        self.counts["dropped"] = len(self.edges) - len(young)
        self.edges = young
        pools: dict[int, list[tuple[bool, int]]] = {}  # question -> (buffered?, index) candidates
        for i, edge in enumerate(self.edges):
            pools.setdefault(edge["question"], []).append((True, i))
        for row, prompt in enumerate(rollout.prompts):
            pools.setdefault(prompt.key, []).append((False, row))
        drawn: set[tuple[bool, int]] = set()
        for question in sorted(pools):
            pool = pools[question]
            if len(pool) <= self.per_question:
                drawn.update(pool)
            else:
                rng = np.random.default_rng([seed % 2**63, step, question % 2**63, 43])
                drawn.update(pool[int(k)] for k in rng.choice(len(pool), self.per_question, replace=False))
        out = Rollout(token_advantages=[], episode_rewards=list(rollout.episode_rewards),
                      episode_index=list(rollout.episode_index), generated_tokens=rollout.generated_tokens,
                      grader_failures=rollout.grader_failures)
        for row in range(len(rollout)):
            edge = dict(question=rollout.prompts[row].key, step=step, prompt=rollout.prompts[row],
                        context=rollout.contexts[row], response=rollout.responses[row], mask=rollout.masks[row],
                        reward=rollout.rewards[row], advantages=rollout.token_advantages[row])
            if (False, row) in drawn:
                out.add(rollout.prompt_index[row], edge["prompt"], edge["context"], edge["response"], edge["mask"],
                        rollout.logprobs[row], edge["reward"])
                out.token_advantages.append(list(edge["advantages"]))
            else:
                self.waiting.append(edge)
        self.replayed_old = {}
        for i, edge in enumerate(self.edges):
            if (True, i) in drawn:
                self.replayed_old[len(out)] = edge["old_logprobs"]
                out.add(-1, edge["prompt"], edge["context"], edge["response"], edge["mask"],
                        [math.nan] * len(edge["response"]), edge["reward"])
                out.token_advantages.append(list(edge["advantages"]))
        self.edges = [edge for i, edge in enumerate(self.edges) if (True, i) not in drawn]
        self.counts["replayed"] = len(self.replayed_old)
        return out

    def restore_old(self, rollout: Rollout, old: torch.Tensor) -> torch.Tensor:
        """(N, T - 1) old log-probs of the last drawn rollout with its replayed rows' stored ones
        in place of this step's forward pass."""
        old = old.clone()
        for row, logprobs in self.replayed_old.items():
            start = len(rollout.contexts[row]) - 1
            old[row, start : start + len(logprobs)] = torch.tensor(logprobs, dtype=old.dtype)
        return old

    def keep(self, old_logprobs: list[list[float]]) -> None:
        """Buffer the waiting edges with their old log-probs (one row per waiting edge)."""
        if len(old_logprobs) != len(self.waiting):
            raise ValueError(f"{len(old_logprobs)} old log-prob rows for {len(self.waiting)} waiting edges")
        for edge, logprobs in zip(self.waiting, old_logprobs):
            self.edges.append({**edge, "old_logprobs": [float(x) for x in logprobs]})
        self.waiting = []

    def state_dict(self) -> dict:
        return {"edges": list(self.edges)}

    def load_state_dict(self, state: dict) -> None:
        self.edges, self.waiting, self.replayed_old = list(state["edges"]), [], {}


class SPOTree(SegmentAlgorithm):
    name = "spo_tree"

    def __init__(self, config, *, batch, tp_group=None):
        super().__init__(config, batch=batch, tp_group=tp_group)
        self.replay = (EdgeReplay(config.replay_edges_per_question, config.replay_max_age)
                       if config.replay_edges_per_question else None)

    @classmethod
    def from_config(cls, cfg, setup: AlgorithmSetup) -> SPOTree:
        return cls(cfg.algorithm.spo_tree, batch=cfg.batch, tp_group=setup.tp_group)

    def generate(self, ctx, batch):
        from megatron_spo.training import rollouts

        seeds = ctx.seeds(len(batch))
        rollout = ctx.distributed_rollout(len(batch), lambda mine: rollouts.tree_rollout(
            ctx.engine, ctx.scorer, ctx.tokenizer, batch, mine, self.config, seeds))
        if self.replay is None:
            return rollout
        return self.replay.draw(rollout, ctx.step, ctx.seed)

    def prepare(self, ctx, rollout, batch, old):
        """As SPO-chain's; with edge replay, the replayed rows train against their stored old
        log-probs, and the edges left for later get theirs (the actor is still the sampler)."""
        if self.replay is not None:
            old = self.replay.restore_old(rollout, old)
            batch = batch.replace(old_logprobs=pad_right(old))
            waiting = self.replay.waiting
            if waiting:
                pending = TrainBatch.from_sequences([e["context"] for e in waiting], [e["response"] for e in waiting],
                                                    [e["mask"] for e in waiting], ctx.pad_id)
                logprobs = ctx.logprobs(ctx.actor, pending)  # (W, T - 1); response i from len(context) - 1
                self.replay.keep([logprobs[i, len(e["context"]) - 1 :][: len(e["response"])].tolist()
                                  for i, e in enumerate(waiting)])
        return super().prepare(ctx, rollout, batch, old)

    def after_update(self, ctx, rollout) -> dict[str, float]:
        """With edge replay: buffered, replayed and dropped edges of the step, over DP ranks."""
        if self.replay is None:
            return {}
        counts = ctx.reduce_sum(torch.tensor([float(len(self.replay.edges)), float(self.replay.counts["replayed"]),
                                              float(self.replay.counts["dropped"])], dtype=torch.float64))
        return {"replay/buffered_edges": counts[0].item(), "replay/replayed_edges": counts[1].item(),
                "replay/dropped_edges": counts[2].item()}

    def state_dict(self) -> dict:
        return {} if self.replay is None else {"replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.replay is not None:
            self.replay.load_state_dict(state.get("replay", {"edges": []}))
