"""SPO-chain: cut points, segment advantages, and Monte Carlo values against the enumerated
values of the 3-digit number task."""

import math

import pytest
import torch

from megatron_spo.rollout.types import Completion, GenerationRequest, GenerationResult, Sample, SamplingParams
from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
from megatron_spo.testing.digit_task import (
    DigitPolicy,
    DigitTaskEngine,
    digit_reward,
    exact_prefix_value,
    prompt_for_target,
    target_of_prompt,
)
from megatron_spo.training.algorithms.segment_chain import (
    SegmentChainConfig,
    build_chain_samples,
    chain_cut_points,
    chain_token_advantages,
)
from megatron_spo.training.algorithms.segment_loss import prepare_segment_batch

PROBS = [0.95, 0.5, 0.99, 0.3, 0.2, 0.8, 0.97, 0.1, 0.6, 0.4, 0.5, 0.05]
# low-probability (< 0.9) positions: 1, 3, 4, 5, 7, 8, 9, 10, 11


@pytest.mark.parametrize(
    "interval, expected",
    [(1, [1, 3, 4, 5, 7, 8, 9, 10, 11]), (2, [1, 4, 7, 9, 11]), (5, [1, 8]), (20, [1])],
)
def test_cut_points_every_interval_th_low_probability_token(interval, expected):
    logprobs = [math.log(p) for p in PROBS]
    assert chain_cut_points(logprobs, interval=interval, prob_threshold=0.9) == expected


def test_cut_points_skip_tool_tokens_and_respect_threshold():
    logprobs = [math.log(p) for p in [0.5, 0.9, 0.3, 0.2]]
    assert chain_cut_points(logprobs, interval=1, prob_threshold=0.9, response_mask=[1, 1, 0, 1]) == [0, 3]
    assert chain_cut_points(logprobs, interval=1, prob_threshold=0.95) == [0, 1, 2, 3]


def test_chain_token_advantages_hand_computed():
    # segments: [0] before the first cut (no value) -> 0; [1, 4): V1 - V0; [4, 6): V2 - V1;
    # [6, 8): R - V2
    advantages = chain_token_advantages(8, [1, 4, 6], [0.5, 0.2, 0.8], 1.0)
    assert advantages == pytest.approx([0.0, -0.3, -0.3, -0.3, 0.6, 0.6, 0.2, 0.2])
    # a cut at 0 is the prompt-only prefix: the first segment gets V(B_1) - V(prompt)
    assert chain_token_advantages(4, [0, 3], [0.4, 0.9], 0.0) == pytest.approx([0.5, 0.5, 0.5, -0.9])
    assert chain_token_advantages(3, [], [], 1.0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        chain_token_advantages(3, [2, 1], [0.0, 0.0], 1.0)


def _digit_setup(targets, *, seed=0, policy=None):
    policy = policy or DigitPolicy()
    engine = DigitTaskEngine(policy, seed=seed)
    prompts = [prompt_for_target(t) for t in targets]

    def score_fn(index, response, finish_reason):
        return digit_reward(response, target_of_prompt(prompts[index]))

    return policy, engine, prompts, score_fn


def _sample_responses(engine, prompts, config, score_fn, seed=123):
    requests = [
        GenerationRequest(
            prompt_token_ids=p,
            params=SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=4, seed=seed + i),
        )
        for i, p in enumerate(prompts)
    ]
    samples = []
    for i, result in enumerate(engine.generate(requests)):
        c = result.completions[0]
        samples.append(
            Sample(
                prompt_key=i,
                prompt_token_ids=list(result.request.prompt_token_ids),
                response_token_ids=c.token_ids,
                response_logprobs=c.logprobs,
                response_mask=[1] * len(c.token_ids),
                reward=score_fn(i, c.token_ids, c.finish_reason),
                finish_reason=c.finish_reason,
            )
        )
    return samples


def test_cut_points_on_digit_task_are_where_the_policy_is_uncertain():
    """First digit (p = 1/9), third digit (p <= 0.25) are low-probability; the second digit is
    low only after a first digit >= 5 (else it is repeated with p ~ 1); EOS has p = 1."""
    config = SegmentChainConfig(cut_interval=1, max_response_tokens=4, num_continuations=1)
    policy, engine, prompts, score_fn = _digit_setup([500] * 12)
    samples = _sample_responses(engine, prompts, config, score_fn)
    built = build_chain_samples(samples, engine, score_fn, config)
    seen_confident = seen_uncertain = False
    for sample in built:
        first = sample.response_token_ids[0]
        expected = [0, 2] if first in policy.confident_digits else [0, 1, 2]
        seen_confident |= first in policy.confident_digits
        seen_uncertain |= first not in policy.confident_digits
        assert sample.extra["cut_points"] == expected, sample.response_token_ids
    assert seen_confident and seen_uncertain  # both branches exercised

    config_every_2nd = SegmentChainConfig(cut_interval=2, max_response_tokens=4, num_continuations=1)
    for sample in build_chain_samples(samples, engine, score_fn, config_every_2nd):
        expected = [0] if sample.response_token_ids[0] in policy.confident_digits else [0, 2]
        assert sample.extra["cut_points"] == expected


def test_identical_prefixes_are_sampled_once_in_one_engine_call():
    config = SegmentChainConfig(cut_interval=1, max_response_tokens=4, num_continuations=3)
    _, engine, _, score_fn = _digit_setup([500])
    prompt = prompt_for_target(500)
    # two identical responses "1 1 7 EOS" and one "1 1 3 EOS": cut points [0, 2] each
    responses = [[1, 1, 7, 10], [1, 1, 7, 10], [1, 1, 3, 10]]
    logprobs = [math.log(p) for p in (0.1, 0.999, 0.2, 1.0)]
    samples = [
        Sample(prompt_key=0, prompt_token_ids=prompt, response_token_ids=r, response_logprobs=logprobs,
               response_mask=[1] * 4, reward=digit_reward(r, 500))
        for r in responses
    ]
    engine.calls.clear()
    build_chain_samples(samples, engine, lambda i, r, f: digit_reward(r, 500), config)
    # unique prefixes: [] (shared by all three) and [1, 1] (shared too) -> 2 requests, 1 call
    assert engine.calls == [2]


def test_chain_monte_carlo_values_converge_to_enumerated_values_and_advantages_have_the_right_signs():
    config = SegmentChainConfig(cut_interval=1, max_response_tokens=4, num_continuations=2000)
    policy, engine, prompts, score_fn = _digit_setup([500, 500, 500, 40, 40, 40, 873, 873, 873, 873], seed=1)
    samples = _sample_responses(engine, prompts, config, score_fn, seed=7)
    built = build_chain_samples(samples, engine, score_fn, config, seed=99)
    exact = {}

    def truth(target, prefix):
        key = (target, tuple(prefix))
        if key not in exact:
            exact[key] = exact_prefix_value(policy, prefix, target, temperature=config.temperature, top_p=config.top_p)
        return exact[key]

    checked_signs = 0
    for sample in built:
        target = target_of_prompt(sample.prompt_token_ids)
        cuts, values = sample.extra["cut_points"], sample.extra["boundary_values"]
        for cut, value in zip(cuts, values):
            mean, var = truth(target, sample.response_token_ids[:cut])
            standard_error = math.sqrt(var / config.num_continuations)
            assert abs(value - mean) < 5 * standard_error + 1e-12, (target, cut, value, mean)
        # exact segment advantages from the enumerated values, compared token by token
        exact_values = [truth(target, sample.response_token_ids[:c])[0] for c in cuts]
        exact_advantages = chain_token_advantages(len(sample.response_token_ids), cuts, exact_values, sample.reward)
        for mc, ex in zip(sample.extra[TOKEN_ADVANTAGES_KEY], exact_advantages):
            assert abs(mc - ex) < 0.03
            if abs(ex) > 0.03:
                assert math.copysign(1, mc) == math.copysign(1, ex)
                checked_signs += 1
    assert checked_signs >= 10  # 15 with these seeds


def test_first_digit_matching_the_target_gets_a_positive_advantage():
    """Target 300: writing 3 first raises the value over the prompt's; writing 8 lowers it."""
    config = SegmentChainConfig(cut_interval=1, max_response_tokens=4, num_continuations=400)
    policy, engine, _, _ = _digit_setup([300], seed=3)
    prompt = prompt_for_target(300)
    samples = []
    for response in ([3, 3, 0, 10], [8, 1, 2, 10]):
        logprobs = [math.log(policy.sampling_distribution(response[:t], 0.6, 0.9)[token])
                    for t, token in enumerate(response)]
        samples.append(Sample(prompt_key=0, prompt_token_ids=prompt, response_token_ids=response,
                              response_logprobs=logprobs, response_mask=[1] * 4, reward=digit_reward(response, 300)))
    good, bad = build_chain_samples(samples, engine, lambda i, r, f: digit_reward(r, 300), config)
    assert good.extra[TOKEN_ADVANTAGES_KEY][0] > 0.1
    assert bad.extra[TOKEN_ADVANTAGES_KEY][0] < -0.1
    # the loss sees only the low-probability tokens: "3 [3] 0 EOS" -> digit 1 and EOS masked
    advantages = torch.tensor([good.extra[TOKEN_ADVANTAGES_KEY]])
    _, loss_mask = prepare_segment_batch(advantages, torch.tensor([good.response_logprobs]),
                                         torch.ones(1, 4), config.loss)
    assert loss_mask.tolist() == [[True, False, True, False]]


def test_config_defaults_are_the_authors_and_load_strictly_from_user_input():
    from megatron_spo.config import from_dict
    from megatron_spo.errors import UserError

    config = SegmentChainConfig()
    assert (config.cut_interval, config.num_continuations, config.temperature, config.top_p) == (5, 9, 0.6, 0.9)
    assert (config.loss.prob_threshold, config.loss.clip_ratio, config.loss.kl_coef) == (0.9, 0.2, 1e-4)
    # the authors' scoring of truncated responses, whitening scope (ours: the step) and EOS
    assert config.truncated_reward == 0.0 and config.loss.whiten_scope == "step" and not config.loss.train_on_eos
    loaded = from_dict(SegmentChainConfig, {"cut_interval": 10, "num_continuations": 4, "loss": {"kl_coef": 0}})
    assert loaded.cut_interval == 10 and loaded.num_continuations == 4 and loaded.loss.kl_coef == 0.0
    loaded = from_dict(SegmentChainConfig, {"truncated_reward": None, "loss": {"whiten_scope": "micro_batch"}})
    assert loaded.truncated_reward is None and loaded.loss.whiten_scope == "micro_batch"
    with pytest.raises(UserError, match="whiten_scope"):
        from_dict(SegmentChainConfig, {"loss": {"whiten_scope": "mini_batch"}})
    with pytest.raises(UserError, match="cut_intervall"):
        from_dict(SegmentChainConfig, {"cut_intervall": 10})
    with pytest.raises(UserError, match="cut_interval must be >= 1"):
        from_dict(SegmentChainConfig, {"cut_interval": 0})


class _AlternatingEngine:
    """Every request's n completions: one token `9`, finished ("stop") for even j, cut by length
    for odd j."""

    def generate(self, requests):
        return [GenerationResult(request=r, completions=[
            Completion(token_ids=[9], logprobs=[-1.0], finish_reason="length" if j % 2 else "stop")
            for j in range(r.params.n)]) for r in requests]


@pytest.mark.parametrize("truncated_reward", [0.0, None])
def test_truncated_response_and_continuations_score_truncated_reward_ungraded(truncated_reward):
    """The authors score a response or continuation cut by length 0, ungraded
    (`math_episode_generator_with_mc_advantages.py`); None grades it like any other."""
    graded = []

    def score(index, response, finish_reason):
        graded.append(finish_reason)
        return 1.0

    config = SegmentChainConfig(cut_interval=1, num_continuations=4, truncated_reward=truncated_reward)
    low = math.log(0.5)  # both tokens are cut points: prefixes [] and [3]
    sample = Sample(prompt_key=0, prompt_token_ids=[1, 2], response_token_ids=[3, 4], response_logprobs=[low, low],
                    response_mask=[1, 1], reward=1.0, finish_reason="length")
    built = build_chain_samples([sample], _AlternatingEngine(), score, config)[0]
    if truncated_reward is None:  # every continuation graded 1: V = 1, R = 1, A = 0
        assert graded == ["stop", "length"] * 4 and built.extra["boundary_values"] == [1.0, 1.0]
        assert built.reward == 1.0 and built.extra[TOKEN_ADVANTAGES_KEY] == [0.0, 0.0]
    else:  # 2 of 4 continuations per prefix cut: V = (1 + 0 + 1 + 0) / 4; the response itself 0
        assert graded == ["stop"] * 4 and built.extra["boundary_values"] == [0.5, 0.5]
        assert built.reward == 0.0 and built.extra[TOKEN_ADVANTAGES_KEY] == [0.0, -0.5]


class _Pool:
    """A scoring pool that gives every text its length and records what it graded."""

    def __init__(self):
        self.graded = []

    def score(self, texts, answers):
        import types

        self.graded += list(texts)
        return types.SimpleNamespace(scores=[float(len(t)) for t in texts], metrics={})


@pytest.mark.parametrize("train_on_eos", [False, True])
def test_chain_main_responses_cut_by_length_score_zero_and_stop_tokens_carry_no_gradient(train_on_eos):
    """The trainer's generation for SPO-chain: a response cut by length is not graded and scores
    `truncated_reward`; the stop token ending a finished response gets mask 0 (so it is neither
    trained nor a cut point) unless `train_on_eos`."""
    from megatron_spo.training.rollouts import Prompt, PromptScorer, Sampling, generate

    class Engine:
        def generate(self, requests):
            return [GenerationResult(request=r, completions=[
                Completion(token_ids=[5, 6, 0], logprobs=[-1.0] * 3, finish_reason="stop", text="ab"),
                Completion(token_ids=[5, 6, 7], logprobs=[-1.0] * 3, finish_reason="length", text="abc")])
                for r in requests]

    pool = _Pool()
    prompts = [Prompt(key=7, raw="q", token_ids=[1], answer="x")]
    rollout = generate(Engine(), None, PromptScorer(pool, None, ["x"]), prompts, [0], n=2,
                       sampling=Sampling(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=3), seeds=[0],
                       truncated_reward=0.0, train_on_stop_token=train_on_eos)
    assert pool.graded == ["ab"] and rollout.rewards == [2.0, 0.0] and rollout.episode_rewards == [2.0, 0.0]
    assert rollout.masks == [[1, 1, int(train_on_eos)], [1, 1, 1]]
    assert chain_cut_points([math.log(0.5)] * 3, interval=1, prob_threshold=0.9,
                            response_mask=rollout.masks[0]) == ([0, 1, 2] if train_on_eos else [0, 1])
