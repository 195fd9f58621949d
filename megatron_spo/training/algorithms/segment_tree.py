"""SPO-tree: Segment Policy Optimization with tree-based advantage estimation (long CoT).

Reference: Guo et al., "Segment Policy Optimization" (AIFrameResearch/SPO,
`hybrid_inference_strategy.py` and `tree_episode_generator.py`). Per prompt x, with branching
factors k_0..k_{L-1} and segment length M:

    level d < L-1: every open node samples k_d children of at most M new tokens;
    level L-1:     every open node samples k_{L-1} children that may run to the response budget;
    a child that finished (stop token), or reached the response budget, or sits at the last
    level, is a leaf with its reward R; a child cut by length earlier is expanded at level d+1.
    V(leaf) = R (a leaf cut by length: truncated_reward, when set),   V(node) = mean of V(children)
    every edge (parent -> child) is a training sample:
        prompt = x + parent's response prefix (token ids), response = the child's segment,
        A = V(child) - V(parent)   (the same for every token of the segment);
    edges with |A| <= zero_advantage_tolerance are dropped (they carry no signal);
    the stop token ending a finished leaf's segment has response mask 0 unless loss.train_on_eos.

The tree grows level by level: one `engine.generate` call per level holds every open node of
every prompt (request n = k_d), so the engine stays full. The segment samples then go through
the same loss as SPO-chain (`segment_loss`: probability mask, whitening, PPO clip; the authors'
tree configs inherit the chain trainer settings).

Trainer interface:

    samples, trees = build_tree_samples(prompt_token_ids, engine, score_fn, config,
                                        prompt_keys=keys)
    # Sample.extra: "token_advantages" ([A] * len(segment)), "advantage" (A), "value" (V(child)),
    # "parent_value", "depth" (0 = child of the root), "is_leaf". Sample.reward = V(child).

`score_fn(i, response_token_ids, finish_reason)` scores a full response to prompt i; the engine
must serve the old policy. `trees` (one `TreeNode` root per prompt) are returned for logging.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from megatron_spo.rollout.types import (
    FinishReason,
    GenerationRequest,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
from megatron_spo.training.algorithms.segment_chain import ScoreFn, score_all
from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig


@dataclasses.dataclass(kw_only=True)
class SegmentTreeConfig:
    """SPO-tree hyperparameters; defaults are the authors' Rho-1.1B / GSM8K "6-6-6" config."""

    branching_factors: list[int] = dataclasses.field(default_factory=lambda: [6, 6, 6])
    """Children per node at each level; its length is the tree depth (paper: 6-6-6, 4-5-6)."""
    segment_tokens: int = 30
    """M, new tokens per segment on every level but the last (GSM8K 30; MATH long CoT 600)."""
    temperature: float = 0.6
    """Sampling temperature (authors' value)."""
    top_p: float = 0.9
    """Nucleus mass (authors' value)."""
    top_k: int = -1
    """-1 disables top-k."""
    max_response_tokens: int = 1024
    """Budget of a whole response in tokens; the last level may use all that is left."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Extra token ids ending a segment (the engine's EOS always does)."""
    zero_advantage_tolerance: float = 1e-9
    """Edges with |A| at most this are dropped; a tolerance, not 0, because means of equal
    rewards can differ in the last bit."""
    truncated_reward: float | None = None
    """Reward of a leaf cut by length (the response budget ran out), without grading it; None
    grades its text, as the authors' tree does (`hybrid_inference_strategy.py`, `_construct_tree`:
    a last-level child cut by length is graded; deliberate difference: they grade that segment's
    text alone, we the whole response). 0.0 scores it as SPO-chain does."""
    replay_edges_per_question: int = 0
    """0: every edge of the step trains at once. N > 0: the authors' edge replay
    (`hybrid_episode_generator.py`, `OnPolicyReplayBuffer`, N = 32 there): a step trains at most N
    edges per question, drawn at random from the question's new and buffered edges; the rest wait
    in a per-rank buffer with the old log-probs of the step that sampled them."""
    replay_max_age: int = 8
    """Buffered edges sampled this many steps ago or more are dropped (authors: 8)."""
    loss: SegmentLossConfig = dataclasses.field(default_factory=SegmentLossConfig)
    """Probability mask, whitening, EOS and PPO-clip / KL settings, shared with SPO-chain."""

    def __post_init__(self):
        if not self.branching_factors or any(k < 1 for k in self.branching_factors):
            raise ValueError(f"branching_factors must be a non-empty list of ints >= 1, got {self.branching_factors}")
        if self.segment_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("segment_tokens and max_response_tokens must be >= 1")
        if self.zero_advantage_tolerance < 0:
            raise ValueError("zero_advantage_tolerance must be >= 0")
        if self.replay_edges_per_question < 0 or self.replay_max_age < 1:
            raise ValueError("replay_edges_per_question must be >= 0 and replay_max_age >= 1")


@dataclasses.dataclass(kw_only=True, eq=False)
class TreeNode:
    """A node of one prompt's tree; the root has an empty response and no segment."""

    prompt_index: int
    response_token_ids: list[int]
    """Response so far (all segments from the root to this node)."""
    segment_token_ids: list[int] = dataclasses.field(default_factory=list)
    segment_logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    depth: int = -1
    """Level that produced this node's segment (0 = child of the root; the root is -1)."""
    children: list["TreeNode"] = dataclasses.field(default_factory=list)
    reward: float | None = None
    """Set on leaves only."""
    value: float | None = None

    @property
    def is_leaf(self) -> bool:
        return self.reward is not None


def expand_trees(
    prompt_token_ids: Sequence[Sequence[int]],
    engine: RolloutEngine,
    score_fn: ScoreFn,
    config: SegmentTreeConfig,
    *,
    seed: int | None = None,
    prompt_seeds: Sequence[int] | None = None,
) -> list[TreeNode]:
    """Grow one tree per prompt, level by level (one engine call per level), score the leaves.

    Seeds: with `prompt_seeds` (one per prompt) the j-th node of prompt i expanded at level d
    samples with seed `prompt_seeds[i] + 1_000_003 d + 7919 j`, independent of the other prompts
    in the call (the trainer splits a batch over data-parallel ranks); else `seed + request number`.
    """
    roots = [TreeNode(prompt_index=i, response_token_ids=[]) for i in range(len(prompt_token_ids))]
    open_nodes = list(roots)
    num_levels = len(config.branching_factors)
    request_number = 0
    for level, branching in enumerate(config.branching_factors):
        if not open_nodes:
            break
        last_level = level == num_levels - 1
        requests = []
        per_prompt: dict[int, int] = {}
        for node in open_nodes:
            if prompt_seeds is not None:
                j = per_prompt.get(node.prompt_index, 0)
                per_prompt[node.prompt_index] = j + 1
                request_seed = prompt_seeds[node.prompt_index] + 1_000_003 * level + 7919 * j
            else:
                request_seed = None if seed is None else seed + request_number
            budget = config.max_response_tokens - len(node.response_token_ids)
            requests.append(
                GenerationRequest(
                    prompt_token_ids=list(prompt_token_ids[node.prompt_index]) + node.response_token_ids,
                    params=SamplingParams(
                        n=branching,
                        temperature=config.temperature,
                        top_p=config.top_p,
                        top_k=config.top_k,
                        max_tokens=budget if last_level else min(config.segment_tokens, budget),
                        stop_token_ids=list(config.stop_token_ids),
                        seed=request_seed,
                    ),
                    request_id=f"spo-tree-{level}-{request_number}",
                )
            )
            request_number += 1
        results = engine.generate(requests)
        next_open, leaves = [], []
        for node, result in zip(open_nodes, results):
            for completion in result.completions:
                child = TreeNode(
                    prompt_index=node.prompt_index,
                    response_token_ids=node.response_token_ids + completion.token_ids,
                    segment_token_ids=list(completion.token_ids),
                    segment_logprobs=list(completion.logprobs),
                    finish_reason=completion.finish_reason,
                    depth=level,
                )
                node.children.append(child)
                out_of_budget = len(child.response_token_ids) >= config.max_response_tokens
                if completion.finish_reason == "length" and not last_level and not out_of_budget:
                    next_open.append(child)
                else:
                    leaves.append(child)
        rewards = score_all(score_fn, [(leaf.prompt_index, leaf.response_token_ids, leaf.finish_reason)
                                       for leaf in leaves], truncated_reward=config.truncated_reward)
        for leaf, reward in zip(leaves, rewards):
            leaf.reward = reward
        open_nodes = next_open
    for root in roots:
        compute_node_values(root)
    return roots


def compute_node_values(node: TreeNode) -> float:
    """V(leaf) = reward, V(node) = mean of the children's values; sets `value` on every node."""
    if node.is_leaf:
        node.value = node.reward
    elif not node.children:
        raise ValueError("an inner tree node has no children (was the tree expanded?)")
    else:
        node.value = sum(compute_node_values(child) for child in node.children) / len(node.children)
    return node.value


def tree_edge_samples(
    roots: Sequence[TreeNode],
    prompt_token_ids: Sequence[Sequence[int]],
    config: SegmentTreeConfig,
    *,
    prompt_keys: Sequence[int] | None = None,
) -> list[Sample]:
    """One `Sample` per edge with A = V(child) - V(parent), near-zero advantages dropped."""
    samples = []
    stack = list(reversed(roots))
    while stack:
        parent = stack.pop()
        for child in parent.children:
            advantage = child.value - parent.value
            if abs(advantage) > config.zero_advantage_tolerance:
                index = child.prompt_index
                mask = [1] * len(child.segment_token_ids)
                if child.finish_reason == "stop" and mask and not config.loss.train_on_eos:
                    mask[-1] = 0  # the EOS / stop token ending the response carries no gradient
                samples.append(
                    Sample(
                        prompt_key=index if prompt_keys is None else prompt_keys[index],
                        prompt_token_ids=list(prompt_token_ids[index]) + parent.response_token_ids,
                        response_token_ids=list(child.segment_token_ids),
                        response_logprobs=list(child.segment_logprobs),
                        response_mask=mask,
                        reward=child.value,
                        finish_reason=child.finish_reason,
                        extra={
                            TOKEN_ADVANTAGES_KEY: [advantage] * len(child.segment_token_ids),
                            "advantage": advantage,
                            "value": child.value,
                            "parent_value": parent.value,
                            "depth": child.depth,
                            "is_leaf": child.is_leaf,
                        },
                    )
                )
        stack.extend(reversed(parent.children))
    return samples


def build_tree_samples(
    prompt_token_ids: Sequence[Sequence[int]],
    engine: RolloutEngine,
    score_fn: ScoreFn,
    config: SegmentTreeConfig,
    *,
    prompt_keys: Sequence[int] | None = None,
    seed: int | None = None,
    prompt_seeds: Sequence[int] | None = None,
) -> tuple[list[Sample], list[TreeNode]]:
    """Expand the trees and turn their edges into training samples (module docstring)."""
    if prompt_keys is not None and len(prompt_keys) != len(prompt_token_ids):
        raise ValueError(f"{len(prompt_keys)} prompt keys for {len(prompt_token_ids)} prompts")
    roots = expand_trees(prompt_token_ids, engine, score_fn, config, seed=seed, prompt_seeds=prompt_seeds)
    return tree_edge_samples(roots, prompt_token_ids, config, prompt_keys=prompt_keys), roots
