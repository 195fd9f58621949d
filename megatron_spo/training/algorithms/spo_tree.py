"""Segment Policy Optimization, tree variant (Guo et al. 2025, seed 003), as a trainer algorithm.

A tree per prompt grown level by level with fixed-length segments (`segment_tree`); node values
are the means of their leaves' rewards, and every edge with a non-zero advantage becomes one
training sequence (context = the prompt and the parent's prefix). Training as SPO-chain.
"""

from __future__ import annotations

from megatron_spo.training.algorithms.base import AlgorithmSetup
from megatron_spo.training.algorithms.spo_chain import SegmentAlgorithm


class SPOTree(SegmentAlgorithm):
    name = "spo_tree"

    @classmethod
    def from_config(cls, cfg, setup: AlgorithmSetup) -> SPOTree:
        return cls(cfg.algorithm.spo_tree, batch=cfg.batch, tp_group=setup.tp_group)

    def generate(self, ctx, batch):
        from megatron_spo.training import rollouts

        seeds = ctx.seeds(len(batch))
        return ctx.distributed_rollout(len(batch), lambda mine: rollouts.tree_rollout(
            ctx.engine, ctx.scorer, ctx.tokenizer, batch, mine, self.config, seeds))
