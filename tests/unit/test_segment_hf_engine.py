"""SPO-chain and SPO-tree against the real `hf` rollout engine on a tiny random model: what the
orchestration asks of an engine (continuations from token-id prefixes, per-request max_tokens,
finish reasons, seeds) holds on the engine users run on CPU."""

from __future__ import annotations

import math

import pytest

from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.types import GenerationRequest, RolloutEngine, Sample, SamplingParams
from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
from megatron_spo.training.algorithms.segment_chain import SegmentChainConfig, build_chain_samples
from megatron_spo.training.algorithms.segment_tree import SegmentTreeConfig, build_tree_samples
from tiny_models import make_tiny_model

VOCAB = 100


class RecordingEngine(RolloutEngine):
    """Delegates to a real engine and keeps every request and completion."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[list[GenerationRequest]] = []
        self.lengths: list[tuple[GenerationRequest, list[int]]] = []

    def generate(self, requests):
        self.calls.append(list(requests))
        results = self.engine.generate(requests)
        for result in results:
            self.lengths.append((result.request, [len(c.token_ids) for c in result.completions]))
        return results

    def update_weights(self, named_tensors):
        self.engine.update_weights(named_tensors)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("segment-qwen2"), "qwen2", seed=5, vocab_size=VOCAB)
    return make_engine(EngineConfig(model=str(model_dir), max_num_seqs=64))


def _score(index, response, finish_reason):
    """Any deterministic reward of the token ids: the share of even ids."""
    return sum(t % 2 == 0 for t in response) / len(response)


def test_tree_on_the_hf_engine_respects_segment_lengths_budgets_and_prefixes(engine):
    config = SegmentTreeConfig(branching_factors=[2, 3, 2], segment_tokens=3, max_response_tokens=10,
                               temperature=1.0, top_p=1.0)
    prompts = [engine.tokenizer.encode("abc"), engine.tokenizer.encode("hello world")]
    recorder = RecordingEngine(engine)
    samples, roots = build_tree_samples(prompts, recorder, _score, config, seed=7)

    assert len(recorder.calls) <= 3 and len(recorder.calls[0]) == 2  # one call per level
    for request, lengths in recorder.lengths:
        prompt = next(p for p in prompts if request.prompt_token_ids[: len(p)] == p)
        budget = config.max_response_tokens - (len(request.prompt_token_ids) - len(prompt))
        level = int(request.request_id.split("-")[2])  # "spo-tree-<level>-<number>"
        # segments of M tokens, except the last level, which may use the whole remaining budget
        assert request.params.max_tokens == (budget if level == 2 else min(3, budget))
        assert all(n <= request.params.max_tokens for n in lengths)

    def check(node, depth):
        for child in node.children:
            assert child.response_token_ids == node.response_token_ids + child.segment_token_ids
            assert len(child.response_token_ids) <= config.max_response_tokens
            if child.children:  # expanded: it was cut by length after exactly M tokens
                assert child.finish_reason == "length" and len(child.segment_token_ids) == 3
            check(child, depth + 1)
        if node.children:
            assert node.value == pytest.approx(sum(c.value for c in node.children) / len(node.children))

    for root in roots:
        check(root, 0)
    assert len(samples) > 10
    for sample in samples:
        prompt = prompts[sample.prompt_key]
        assert sample.prompt_token_ids[: len(prompt)] == prompt
        assert sample.extra[TOKEN_ADVANTAGES_KEY] == [sample.extra["advantage"]] * len(sample.response_token_ids)
        assert len(sample.response_logprobs) == len(sample.response_token_ids)

    again, _ = build_tree_samples(prompts, engine, _score, config, seed=7)  # seeded: reproducible
    assert [(s.prompt_token_ids, s.response_token_ids) for s in again] == [
        (s.prompt_token_ids, s.response_token_ids) for s in samples
    ]


def test_chain_on_the_hf_engine_cuts_where_the_engine_logprobs_say_and_continues_from_prefixes(engine):
    config = SegmentChainConfig(cut_interval=2, num_continuations=2, max_response_tokens=12)
    prompt = engine.tokenizer.encode("The quick brown fox")
    first = engine.generate([GenerationRequest(prompt_token_ids=prompt, params=SamplingParams(
        n=3, temperature=config.temperature, top_p=config.top_p, max_tokens=12, seed=1))])[0]
    samples = [
        Sample(prompt_key=0, prompt_token_ids=prompt, response_token_ids=c.token_ids, response_logprobs=c.logprobs,
               response_mask=[1] * len(c.token_ids), reward=_score(0, c.token_ids, c.finish_reason),
               finish_reason=c.finish_reason)
        for c in first.completions
    ]
    recorder = RecordingEngine(engine)
    built = build_chain_samples(samples, recorder, _score, config, seed=11)

    assert len(recorder.calls) == 1  # every boundary of every response in one call
    requested = [tuple(r.prompt_token_ids) for r in recorder.calls[0]]
    assert len(requested) == len(set(requested))  # identical prefixes sampled once
    for sample in built:
        low = [t for t, lp in enumerate(sample.response_logprobs) if math.exp(lp) < 0.9]
        assert sample.extra["cut_points"] == low[::2]
        for cut in sample.extra["cut_points"]:
            assert tuple(prompt + sample.response_token_ids[:cut]) in requested
    for request, lengths in recorder.lengths:
        response_prefix = len(request.prompt_token_ids) - len(prompt)
        assert request.params.max_tokens == 12 - response_prefix and request.params.n == 2
        assert len(lengths) == 2 and all(n <= 12 - response_prefix for n in lengths)
    assert any(sample.extra["cut_points"] for sample in built)
