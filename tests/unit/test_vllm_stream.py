"""`VLLMStream`, continuous batching on the `vllm` engine (vLLM's CPU build here): per sequence it
returns what `VLLMEngine.generate` returns while refilling freed slots; tokens carry the stream's
version; after a weight update in-flight sequences continue from their old-weight KV cache under
the new weights and later admissions reuse no block cached under the old weights; abort hands
back in-flight requests and leaves the engine clean for `generate`.

One engine serves the module (vLLM's start-up dominates); the weight-update test puts the original
weights back. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache

vllm = pytest.importorskip("vllm")

import vllm.exceptions  # noqa: E402
from megatron_spo.rollout.engine import EngineConfig, make_engine  # noqa: E402
from megatron_spo.rollout.streaming import StreamRequest, open_stream  # noqa: E402
from megatron_spo.rollout.types import GenerationRequest, SamplingParams  # noqa: E402
from megatron_spo.rollout.vllm_stream import VLLMStream  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

EOS = 2  # <|im_end|> in the tiny tokenizer and config
VOCAB = 100
MAX_MODEL_LEN = 256
PROMPTS = [
    "hello world",
    "abc",
    "The quick brown fox jumps over",
    "x",
    "lorem ipsum dolor sit amet, consectetur",
    "0123456789",
    "a b c d e f g h i j k l m n o p",
    "zz",
    "Streaming generation keeps slots busy",
    "?!",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64 / 2 = 32: the smallest head size vLLM's CPU attention accepts
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = make_engine(EngineConfig(model=str(model_dir), name="vllm", max_model_len=MAX_MODEL_LEN))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def generate(engine, prompts, params_list):
    """`engine.generate`'s single completion per request."""
    requests = [GenerationRequest(prompt_token_ids=p, params=params) for p, params in zip(prompts, params_list)]
    return [r.completions[0] for r in engine.generate(requests)]


def drain(stream, requests=(), max_steps=10_000):
    """Submit `requests`, step until idle; returns {tag: StreamResult}."""
    stream.submit(list(requests))
    results, steps = {}, 0
    while not stream.idle:
        for result in stream.step():
            assert result.tag not in results
            results[result.tag] = result
        assert stream.num_inflight <= stream.max_inflight
        steps += 1
        assert steps < max_steps
    return results


def stream_requests(prompts, params_list):
    return [StreamRequest(tag=i, prompt_token_ids=p, params=params)
            for i, (p, params) in enumerate(zip(prompts, params_list))]


def assert_same_completions(results, expected, logprob_atol=1e-4):
    assert sorted(results) == list(range(len(expected)))
    for i, completion in enumerate(expected):
        got = results[i].completion
        assert got.token_ids == completion.token_ids, i
        assert got.finish_reason == completion.finish_reason, i
        assert got.text == completion.text, i
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(completion.logprobs),
                                   atol=logprob_atol, rtol=0)
        assert len(results[i].token_versions) == len(got.token_ids)


def assert_engine_clean(engine):
    """No request of a stream is left in vLLM (what `LLM.generate` would otherwise run)."""
    assert not engine.llm.llm_engine.has_unfinished_requests()


def test_greedy_with_refills_equals_generate(engine, prompts):
    """10 prompts through 3 slots, varied lengths and stop rules: `generate`'s outputs."""
    params_list = [SamplingParams(temperature=0.0, max_tokens=3 + 3 * i) for i in range(len(prompts))]
    params_list[4] = SamplingParams(temperature=0.0, max_tokens=30, stop=["5"])
    params_list[7] = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[EOS, 40])
    expected = generate(engine, prompts, params_list)
    stream = open_stream(engine, 3)
    assert isinstance(stream, VLLMStream)
    results = drain(stream, stream_requests(prompts, params_list))
    assert_same_completions(results, expected)
    assert stream.refills > 0
    assert all(set(r.token_versions) == {0} for r in results.values())
    assert_engine_clean(engine)


def test_seeded_sampling_equals_generate(engine, prompts):
    params_list = [SamplingParams(temperature=1.0, max_tokens=12 + i, seed=100 + i) for i in range(len(prompts))]
    params_list[3] = SamplingParams(temperature=0.8, top_k=5, max_tokens=15, seed=7)
    params_list[6] = SamplingParams(temperature=1.2, top_p=0.9, max_tokens=15, seed=8)
    params_list[8] = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_tokens=15, seed=9)
    expected = generate(engine, prompts, params_list)
    stream = open_stream(engine, 4)
    assert_same_completions(drain(stream, stream_requests(prompts, params_list)), expected)
    assert stream.refills > 0


def greedy_from_mixed_cache(old_model, new_model, prompt, prefix, total):
    """HF greedy tokens after `prefix` when the keys / values of `prompt + prefix[:-1]` come from
    `old_model` and everything from `prefix[-1]` on is computed by `new_model`, up to `total`
    tokens in all or EOS."""
    cache = DynamicCache(config=old_model.config)
    tokens = list(prefix)
    with torch.no_grad():
        old_model(torch.tensor([prompt + prefix[:-1]]), past_key_values=cache, use_cache=True)
        while len(tokens) < total and tokens[-1] != EOS:
            logits = new_model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prefix):]


@pytest.fixture
def models(engine, model_dir):
    """The original HF model and a perturbed copy; the engine gets the original weights back."""
    old_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    new_model = copy.deepcopy(old_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in new_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    yield old_model, new_model
    engine.update_weights(old_model.state_dict().items())


def test_weight_update_mid_flight_and_version_tags(engine, prompts, models):
    """Two sequences in flight across `update_weights`: their earlier tokens keep version 0, later
    ones carry version 1 and come from the new weights over the old-weight KV cache (as HF decodes
    that mixed cache), so they differ from the no-update run; the sequence admitted after the
    update equals `generate` under the new weights."""
    old_model, new_model = models
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    picked = [prompts[0], prompts[2], prompts[4]]
    old_out = generate(engine, picked, [greedy] * 3)

    stream = open_stream(engine, 2)
    stream.submit(stream_requests(picked, [greedy] * 3))
    before = 3
    for _ in range(before):
        assert stream.step() == []
    assert stream.num_inflight == 2 and stream.num_queued == 1
    assert engine.llm.reset_prefix_cache() is False  # vLLM 0.32 with running requests: a no-op
    engine.update_weights(new_model.state_dict().items())
    assert engine._prefix_cache_stale  # vLLM cannot reset with running requests: deferred
    stream.version = 1
    results = drain(stream)
    new_out = generate(engine, picked, [greedy] * 3)
    assert not engine._prefix_cache_stale

    for i in (0, 1):
        got = results[i].completion
        prefix = got.token_ids[:before]
        assert prefix == old_out[i].token_ids[:before]
        assert results[i].token_versions == [0] * before + [1] * (len(got.token_ids) - before)
        assert got.token_ids != old_out[i].token_ids
        assert got.token_ids[before:] == greedy_from_mixed_cache(old_model, new_model, picked[i], prefix, 24)
    assert results[2].completion.token_ids == new_out[2].token_ids
    assert results[2].token_versions == [1] * len(new_out[2].token_ids)


def test_no_prefix_cache_hit_across_a_weight_update(engine, prompts, models):
    """A prompt longer than one KV block (128 tokens on CPU) in flight across an update; the same
    prompt admitted after it, by the stream or by `generate`, must not reuse the block cached
    under the old weights."""
    _, new_model = models
    long_prompt = (prompts[4] * 6)[:140]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    stream = open_stream(engine, 2)
    stream.submit(stream_requests([long_prompt], [greedy]))
    for _ in range(3):
        assert stream.step() == []
    engine.update_weights(new_model.state_dict().items())
    stream.version = 1
    alongside = generate(engine, [long_prompt], [greedy])[0]  # the stream still in flight
    stream.submit([StreamRequest(tag=1, prompt_token_ids=long_prompt, params=greedy)])
    results = drain(stream)
    fresh = generate(engine, [long_prompt], [greedy])[0]  # prefix cache reset, nothing in flight
    for got in (results[1].completion, alongside):
        assert got.token_ids == fresh.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(fresh.logprobs), atol=1e-4, rtol=0)


def test_generate_while_in_flight_runs_alongside(engine, prompts):
    """`generate` with stream sequences in flight (evaluation, driver parked; one request with
    n = 3): its own results, and the stream's sequences, two of which finish meanwhile, still
    equal `generate`'s."""
    stream_params = [SamplingParams(temperature=0.0, max_tokens=m) for m in (6, 8, 40, 40)]
    eval_params = [SamplingParams(n=1 + 2 * (i == 1), temperature=1.0, max_tokens=20, seed=50 + i) for i in range(3)]
    eval_requests = [GenerationRequest(prompt_token_ids=p, params=q) for p, q in zip(prompts[5:8], eval_params)]
    expected = generate(engine, prompts[:4], stream_params)
    expected_eval = [c for r in engine.generate(eval_requests) for c in r.completions]
    stream = open_stream(engine, 4)
    stream.submit(stream_requests(prompts[:4], stream_params))
    for _ in range(2):
        assert stream.step() == []
    during = [c for r in engine.generate(eval_requests) for c in r.completions]
    assert len(during) == len(expected_eval) == 5
    for got, want in zip(during, expected_eval):
        assert (got.token_ids, got.finish_reason, got.text) == (want.token_ids, want.finish_reason, want.text)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
    assert stream.num_inflight == 4  # the finished ones wait for the next step
    results = {r.tag: r for r in stream.step()}
    assert {0, 1} <= set(results)
    results.update(drain(stream))
    assert_same_completions(results, expected)
    assert all(set(r.token_versions) == {0} for r in results.values())
    assert_engine_clean(engine)


def test_abort_then_generate_and_resubmission_reproduce(engine, prompts):
    params_list = [SamplingParams(temperature=1.0, max_tokens=30, seed=20 + i) for i in range(6)]
    expected = generate(engine, prompts[:6], params_list)
    requests = stream_requests(prompts[:6], params_list)
    stream = open_stream(engine, 3)
    stream.submit(requests)
    finished = {}
    for _ in range(4):
        finished.update((r.tag, r) for r in stream.step())
    assert not finished
    assert stream.num_inflight == 3 and stream.num_queued == 3
    with pytest.raises(RuntimeError, match="in flight"):
        engine.open_stream(2)
    assert [r.tag for r in stream.abort()] == [0, 1, 2]
    assert stream.num_inflight == 0 and stream.num_queued == 3
    assert_engine_clean(engine)
    assert [r.tag for r in stream.clear_queue()] == [3, 4, 5]
    assert stream.idle and stream.abort() == []
    after = generate(engine, prompts[:6], params_list)
    for got, want in zip(after, expected):
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert_same_completions(drain(stream, requests), expected)  # resubmitted from their prompts
    assert_engine_clean(engine)


def test_refusals(engine, prompts):
    stream = open_stream(engine, 2)
    with pytest.raises(ValueError, match="empty"):
        stream.submit([StreamRequest(tag="a", prompt_token_ids=[], params=SamplingParams())])
    with pytest.raises(ValueError, match="no room"):
        stream.submit([StreamRequest(tag="b", prompt_token_ids=[5] * MAX_MODEL_LEN, params=SamplingParams())])
    with pytest.raises(vllm.exceptions.VLLMValidationError, match="out of vocabulary"):
        stream.submit([StreamRequest(tag="b", prompt_token_ids=[5, 100000], params=SamplingParams())])
    with pytest.raises(ValueError, match="n must be 1"):
        stream.submit([StreamRequest(tag="c", prompt_token_ids=[5], params=SamplingParams(n=2))])
    assert stream.idle
    stream.submit([StreamRequest(tag="d", prompt_token_ids=prompts[0], params=SamplingParams(max_tokens=3))])
    engine.sleep()
    try:
        with pytest.raises(RuntimeError, match="asleep"):
            stream.step()
    finally:
        engine.wake_up()
    newer = open_stream(engine, 2)  # nothing in flight: allowed, and the old stream may not step
    with pytest.raises(RuntimeError, match="another stream"):
        stream.step()
    assert len(drain(newer, stream.clear_queue())["d"].completion.token_ids) == 3
