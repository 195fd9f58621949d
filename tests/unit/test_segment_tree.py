"""SPO-tree: node values and edge samples on a hand-built tree, level-by-level batched expansion,
and Monte Carlo node values against the enumerated values of the 3-digit number task."""

import collections
import math
import statistics

import pytest

from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
from megatron_spo.testing.digit_task import (
    EOS_TOKEN,
    UNFINISHED_REWARD,
    DigitPolicy,
    DigitTaskEngine,
    digit_reward,
    exact_prefix_value,
    prompt_for_target,
    target_of_prompt,
)
from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig
from megatron_spo.training.algorithms.segment_tree import (
    SegmentTreeConfig,
    TreeNode,
    build_tree_samples,
    compute_node_values,
    tree_edge_samples,
)


def _leaf(parent, segment, reward, depth):
    node = TreeNode(prompt_index=0, response_token_ids=parent.response_token_ids + segment,
                    segment_token_ids=segment, segment_logprobs=[-0.5] * len(segment),
                    finish_reason="stop", depth=depth, reward=reward)
    parent.children.append(node)
    return node


def test_hand_built_tree_values_and_edges():
    #            root (V = (1 + 0.5 + 0) / 3 = 0.5)
    #     a: leaf 1     b: inner (V = 0.5)      c: leaf 0
    #                 b1: leaf 0   b2: leaf 1
    root = TreeNode(prompt_index=0, response_token_ids=[])
    _leaf(root, [1], 1.0, 0)
    b = TreeNode(prompt_index=0, response_token_ids=[2, 3], segment_token_ids=[2, 3],
                 segment_logprobs=[-1.0, -2.0], finish_reason="length", depth=0)
    root.children.append(b)
    _leaf(b, [4, 5, 6], 0.0, 1)
    _leaf(b, [7], 1.0, 1)
    _leaf(root, [8], 0.0, 0)
    assert compute_node_values(root) == pytest.approx(0.5)
    assert b.value == pytest.approx(0.5)

    samples = tree_edge_samples([root], [[100, 101]], SegmentTreeConfig(), prompt_keys=[42])
    # edge root->b has A = 0 and is dropped; the others: a +0.5, b1 -0.5, b2 +0.5, c -0.5
    got = {tuple(s.response_token_ids): s for s in samples}
    assert set(got) == {(1,), (4, 5, 6), (7,), (8,)}
    assert got[(1,)].extra["advantage"] == pytest.approx(0.5)
    assert got[(8,)].extra["advantage"] == pytest.approx(-0.5)
    b1 = got[(4, 5, 6)]
    assert b1.extra[TOKEN_ADVANTAGES_KEY] == pytest.approx([-0.5] * 3)
    assert b1.prompt_token_ids == [100, 101, 2, 3]  # prompt = parent prefix as token ids
    assert b1.prompt_key == 42 and b1.response_logprobs == [-0.5] * 3
    # b1 finished ("stop"): its last token is the stop token, which the authors never train on
    assert b1.response_mask == [1, 1, 0]
    with_eos = tree_edge_samples([root], [[100, 101]], SegmentTreeConfig(loss=SegmentLossConfig(train_on_eos=True)))
    assert all(s.response_mask == [1] * len(s.response_token_ids) for s in with_eos)
    assert b1.extra["depth"] == 1 and b1.extra["is_leaf"] and b1.reward == 0.0
    assert got[(7,)].extra["parent_value"] == pytest.approx(0.5)


def _digit_tree_setup(targets, seed=0):
    policy = DigitPolicy()
    engine = DigitTaskEngine(policy, seed=seed)
    prompts = [prompt_for_target(t) for t in targets]
    finish_reasons = []

    def score_fn(index, response, finish_reason):
        finish_reasons.append(finish_reason)
        return digit_reward(response, target_of_prompt(prompts[index]))

    return policy, engine, prompts, score_fn, finish_reasons


def test_tree_expands_level_by_level_in_one_engine_call_per_level():
    config = SegmentTreeConfig(branching_factors=[6, 6, 6], segment_tokens=1, max_response_tokens=4)
    _, engine, prompts, score_fn, _ = _digit_tree_setup([500, 42])
    samples, roots = build_tree_samples(prompts, engine, score_fn, config, seed=5)
    # every open node of every prompt in one call: 2 roots, 12 then 72 length-cut children
    assert engine.calls == [2, 12, 72]
    for root in roots:
        assert len(root.children) == 6
        assert all(len(child.children) == 6 for child in root.children)
        leaves = [g for c in root.children for m in c.children for g in m.children]
        assert len(leaves) == 216
        # the last level runs to the end: digit + EOS, finished, scored
        assert all(leaf.segment_token_ids[-1] == EOS_TOKEN and leaf.finish_reason == "stop" for leaf in leaves)
        assert all(leaf.reward == digit_reward(leaf.response_token_ids, target_of_prompt(prompts[root.prompt_index]))
                   for leaf in leaves)
    segment_lengths = {s.extra["depth"]: len(s.response_token_ids) for s in samples}
    assert segment_lengths == {0: 1, 1: 1, 2: 2}
    assert all(s.extra["advantage"] != 0 for s in samples)


def test_finished_children_are_leaves_and_stop_the_expansion():
    """Segments of 2 tokens: level 0 writes two digits (cut by length), level 1 writes the third
    digit and EOS (finished), so there is no third engine call and every child of level 1 is a leaf."""
    config = SegmentTreeConfig(branching_factors=[3, 3, 3], segment_tokens=2, max_response_tokens=4)
    _, engine, prompts, score_fn, finish_reasons = _digit_tree_setup([500])
    _, roots = build_tree_samples(prompts, engine, score_fn, config, seed=1)
    assert engine.calls == [1, 3]
    assert all(grandchild.is_leaf and not grandchild.children
               for child in roots[0].children for grandchild in child.children)
    assert finish_reasons == ["stop"] * 9


def test_children_that_exhaust_the_response_budget_are_scored_as_cut():
    config = SegmentTreeConfig(branching_factors=[2, 2, 2], segment_tokens=1, max_response_tokens=3)
    _, engine, prompts, score_fn, finish_reasons = _digit_tree_setup([500])
    _, roots = build_tree_samples(prompts, engine, score_fn, config, seed=2)
    # level 2 has a budget of 1 token: a digit without EOS, cut by length, worst reward
    assert finish_reasons == ["length"] * 8
    assert roots[0].value == UNFINISHED_REWARD


def test_tree_node_values_converge_to_enumerated_prefix_values():
    """Over many 6-6-6 trees the root values average to V(prompt) and the level-0 node values,
    grouped by their first digit, to V(first digit); mean edge advantages have the exact sign."""
    config = SegmentTreeConfig(branching_factors=[6, 6, 6], segment_tokens=1, max_response_tokens=4)
    targets = [500] * 60 + [42] * 60
    policy, engine, prompts, score_fn, _ = _digit_tree_setup(targets, seed=11)
    samples, roots = build_tree_samples(prompts, engine, score_fn, config, seed=1000)

    def exact(target, prefix):
        return exact_prefix_value(policy, prefix, target, temperature=config.temperature, top_p=config.top_p)[0]

    checked_signs = 0
    for target in (500, 42):
        root_values = [r.value for r in roots if target_of_prompt(prompts[r.prompt_index]) == target]
        standard_error = statistics.stdev(root_values) / math.sqrt(len(root_values))
        assert abs(statistics.mean(root_values) - exact(target, [])) < 5 * standard_error

        by_first_digit = collections.defaultdict(list)
        advantages_by_first_digit = collections.defaultdict(list)
        for root in roots:
            if target_of_prompt(prompts[root.prompt_index]) != target:
                continue
            for child in root.children:
                by_first_digit[child.response_token_ids[0]].append(child.value)
                advantages_by_first_digit[child.response_token_ids[0]].append(child.value - root.value)
        for digit, values in by_first_digit.items():
            if len(values) < 20:
                continue
            standard_error = statistics.stdev(values) / math.sqrt(len(values))
            assert abs(statistics.mean(values) - exact(target, [digit])) < 5 * standard_error + 1e-9
            exact_advantage = exact(target, [digit]) - exact(target, [])
            if abs(exact_advantage) > 0.05:
                mean_advantage = statistics.mean(advantages_by_first_digit[digit])
                assert math.copysign(1, mean_advantage) == math.copysign(1, exact_advantage)
                checked_signs += 1
    assert checked_signs >= 10
    # and those advantages reach the training samples of depth 0
    depth0 = [s for s in samples if s.extra["depth"] == 0]
    assert depth0
    assert all(s.extra["advantage"] == pytest.approx(s.extra["value"] - s.extra["parent_value"]) for s in depth0)


def test_tree_config_defaults_and_strict_loading():
    from megatron_spo.config import from_dict
    from megatron_spo.errors import UserError

    config = SegmentTreeConfig()
    assert config.branching_factors == [6, 6, 6] and config.temperature == 0.6 and config.loss.prob_threshold == 0.9
    # every edge at once (replay off), truncated leaves graded as the authors' tree does, no EOS gradient
    assert (config.replay_edges_per_question, config.replay_max_age, config.truncated_reward) == (0, 8, None)
    assert not config.loss.train_on_eos
    with pytest.raises(UserError, match="replay_edges_per_question"):
        from_dict(SegmentTreeConfig, {"replay_edges_per_question": -1})
    loaded = from_dict(SegmentTreeConfig, {"branching_factors": [4, 5, 6], "segment_tokens": 600})
    assert loaded.branching_factors == [4, 5, 6] and loaded.segment_tokens == 600
    with pytest.raises(UserError, match="branching_factors"):
        from_dict(SegmentTreeConfig, {"branching_factors": [6, 0]})
