"""`HFStream`, continuous batching on the `hf` engine: per sequence it returns what
`HFEngine.generate` returns (greedy, seeded sampling, finish rules) while refilling freed slots;
tokens carry the stream's version; after a weight update in-flight rows continue from their
old-weight KV cache under the new weights; abort hands back in-flight requests."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from transformers import DynamicCache

from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.hf_stream import HFStream
from megatron_spo.rollout.streaming import BatchedStream, StreamRequest, open_stream
from megatron_spo.rollout.types import GenerationRequest, SamplingParams
from tiny_models import make_tiny_model

EOS = 2  # <|im_end|> in the tiny tokenizer and config
VOCAB = 100
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
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(EngineConfig(model=str(model_dir), max_num_seqs=3))


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def generate(engine, prompts, params_list):
    """`engine.generate`'s single completion per request."""
    requests = [GenerationRequest(prompt_token_ids=p, params=params) for p, params in zip(prompts, params_list)]
    return [r.completions[0] for r in engine.generate(requests)]


def drain(stream, requests=(), max_steps=10_000):
    """Submit `requests`, step until idle; returns {tag: StreamResult} and the step count."""
    stream.submit(list(requests))
    results, steps = {}, 0
    while not stream.idle:
        for result in stream.step():
            assert result.tag not in results
            results[result.tag] = result
        assert stream.num_inflight <= stream.max_inflight
        steps += 1
        assert steps < max_steps
    return results, steps


def stream_requests(prompts, params_list):
    return [StreamRequest(tag=i, prompt_token_ids=p, params=params)
            for i, (p, params) in enumerate(zip(prompts, params_list))]


def assert_same_completions(results, expected, logprob_atol=1e-5):
    assert sorted(results) == list(range(len(expected)))
    for i, completion in enumerate(expected):
        got = results[i].completion
        assert got.token_ids == completion.token_ids, i
        assert got.finish_reason == completion.finish_reason, i
        assert got.text == completion.text, i
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(completion.logprobs),
                                   atol=logprob_atol, rtol=0)
        assert len(results[i].token_versions) == len(got.token_ids)


def test_open_stream_gives_an_hf_stream(engine):
    stream = open_stream(engine, 4)
    assert isinstance(stream, HFStream) and stream.max_inflight == 4 and stream.idle


def test_greedy_with_refills_equals_generate(engine, prompts):
    """10 prompts through 3 slots: the outputs of `generate`; per step one width-1 forward for the
    running rows and one prefill for the admitted ones (running prompts are never recomputed);
    the cache holds exactly each row's tokens but the last sampled one, with no spare padding."""
    params_list = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i) for i in range(len(prompts))]
    expected = generate(engine, prompts, params_list)
    stream = open_stream(engine, 3)
    stream.submit(stream_requests(prompts, params_list))
    widths = []  # input width of every forward the stream runs
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    results, refills, next_tag = {}, 0, 0
    try:
        while not stream.idle:
            running, queued, first = stream.num_inflight, stream.num_queued, len(widths)
            admitted = min(queued, stream.max_inflight - running)
            results.update((r.tag, r) for r in stream.step())
            refills += admitted if running else 0
            # width-1 forward of the running rows, then one prefill as wide as the longest new prompt
            prefill = [max(len(prompts[tag]) for tag in range(next_tag, next_tag + admitted))] if admitted else []
            assert widths[first:] == [1] * bool(running) + prefill
            next_tag += admitted
            if stream.num_inflight:
                real = [len(slot.seq.prompt) + len(slot.seq.token_ids) - 1 for slot in stream._slots]
                assert stream._mask.sum(dim=1).tolist() == real
                assert stream._mask.shape[1] == max(real) == stream._cache.get_seq_length()
    finally:
        hook.remove()
    assert_same_completions(results, expected)
    assert stream.refills == refills > 0


def test_seeded_sampling_equals_generate(engine, prompts):
    params_list = [SamplingParams(temperature=1.0, max_tokens=12 + i, seed=100 + i) for i in range(len(prompts))]
    params_list[3] = SamplingParams(temperature=0.8, top_k=5, max_tokens=15, seed=7)
    params_list[6] = SamplingParams(temperature=1.2, top_p=0.9, max_tokens=15, seed=8)
    params_list[8] = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_tokens=15, seed=9)
    expected = generate(engine, prompts, params_list)
    results, _ = drain(open_stream(engine, 4), stream_requests(prompts, params_list))
    assert_same_completions(results, expected)


def test_stop_token_stop_string_and_length_as_generate(engine, prompts):
    """Seeded samples cut by a stop token, a stop string (text cut after it), max_tokens and EOS."""
    sampled = SamplingParams(temperature=1.0, max_tokens=30, seed=2)
    reference = generate(engine, prompts[:1], [sampled])[0]
    ids, text = reference.token_ids, reference.text
    assert reference.finish_reason == "length"  # no EOS in the 30 tokens of this seed
    k = next(i for i in range(6, len(ids)) if ids.index(ids[i]) == i)  # a token first seen at k >= 6
    j = next(i for i in range(10, len(text) - 1) if text.index(text[i : i + 2]) == i)
    params_list = [
        dataclasses.replace(sampled, stop_token_ids=[ids[k]]),
        dataclasses.replace(sampled, stop=[text[j : j + 2]]),
        dataclasses.replace(sampled, max_tokens=5),
        SamplingParams(temperature=1.0, max_tokens=64, seed=0),  # meets EOS
        SamplingParams(temperature=0.0, max_tokens=7),
    ]
    stream_prompts = [prompts[0]] * 3 + prompts[:2]
    expected = generate(engine, stream_prompts, params_list)
    assert [c.finish_reason for c in expected] == ["stop", "stop", "length", "stop", "length"]
    assert expected[0].token_ids == ids[: k + 1]
    assert expected[1].text == text[: j + 2] and len(expected[1].token_ids) < len(ids)
    assert expected[3].token_ids[-1] == EOS
    results, _ = drain(open_stream(engine, 2), stream_requests(stream_prompts, params_list))
    assert_same_completions(results, expected)


def test_context_length_ends_with_length_as_generate(model_dir, prompts):
    engine = make_engine(EngineConfig(model=str(model_dir), max_model_len=len(prompts[2]) + 4))
    params_list = [SamplingParams(temperature=0.0, max_tokens=50)] * 4
    expected = generate(engine, prompts[:4], params_list)
    results, _ = drain(open_stream(engine, 2), stream_requests(prompts[:4], params_list))
    assert_same_completions(results, expected)
    assert results[2].completion.finish_reason == "length" or results[2].completion.token_ids[-1] == EOS


def greedy_from_mixed_cache(old_model, new_model, prompt, prefix, total):
    """Greedy tokens after `prefix` when the keys / values of `prompt + prefix[:-1]` come from
    `old_model` and everything from `prefix[-1]` on is computed by `new_model` (one unpadded row),
    up to `total` tokens in all or EOS."""
    cache = DynamicCache(config=old_model.config)
    tokens = list(prefix)
    with torch.no_grad():
        old_model(torch.tensor([prompt + prefix[:-1]]), past_key_values=cache, use_cache=True)
        while len(tokens) < total and tokens[-1] != EOS:
            logits = new_model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prefix):]


def test_weight_update_mid_flight_and_version_tags(model_dir, prompts):
    """A row in flight across `update_weights` keeps its old-weight cache and samples every later
    token from the new weights (checked against an unpadded HF decode with that mixed cache); a
    row admitted after the update equals `generate` under the new weights."""
    engine = make_engine(EngineConfig(model=str(model_dir)))
    old_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    new_model = copy.deepcopy(old_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in new_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    picked = [prompts[0], prompts[2], prompts[4]]
    old_out = generate(engine, picked, [greedy] * 3)

    stream = open_stream(engine, 2)
    stream.submit(stream_requests(picked, [greedy] * 3))
    before = 3
    for _ in range(before):
        assert stream.step() == []
    assert stream.num_inflight == 2 and stream.num_queued == 1
    engine.update_weights(new_model.state_dict().items())
    stream.version = 1
    results, _ = drain(stream)
    new_out = generate(engine, picked, [greedy] * 3)  # the engine now has the new weights

    for i in (0, 1):  # in flight across the update
        got = results[i]
        prefix = got.completion.token_ids[:before]
        assert prefix == old_out[i].token_ids[:before]
        assert got.token_versions == [0] * before + [1] * (len(got.completion.token_ids) - before)
        mixed = greedy_from_mixed_cache(old_model, new_model, picked[i], prefix, greedy.max_tokens)
        assert got.completion.token_ids[before:] == mixed
        # neither the old model's continuation nor a recompute of the prefix under the new weights
        assert got.completion.token_ids != old_out[i].token_ids
        assert got.completion.token_ids != greedy_from_mixed_cache(new_model, new_model, picked[i], prefix, 24)
    assert results[2].completion.token_ids == new_out[2].token_ids  # admitted after the update
    assert results[2].token_versions == [1] * len(new_out[2].token_ids)


def test_abort_returns_inflight_in_admission_order_and_resubmission_reproduces(engine, prompts):
    params_list = [SamplingParams(temperature=1.0, max_tokens=30, seed=20 + i) for i in range(6)]
    expected = generate(engine, prompts[:6], params_list)
    requests = stream_requests(prompts[:6], params_list)
    stream = open_stream(engine, 3)
    stream.submit(requests)
    finished = {}
    for _ in range(4):
        finished.update((r.tag, r) for r in stream.step())
    assert not finished  # 30 tokens each, EOS aside
    assert stream.num_inflight == 3 and stream.num_queued == 3
    aborted = stream.abort()
    assert [r.tag for r in aborted] == [0, 1, 2]
    assert stream.num_inflight == 0 and stream.num_queued == 3
    assert [r.tag for r in stream.clear_queue()] == [3, 4, 5]
    results, _ = drain(stream, requests)  # the aborted ones first again, then the queued ones
    assert_same_completions(results, expected)


def test_batched_stream_gives_the_same_greedy_outputs(engine, prompts):
    params_list = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i) for i in range(len(prompts))]
    requests = stream_requests(prompts, params_list)
    batched, _ = drain(BatchedStream(engine, 3), requests)
    refilled, _ = drain(HFStream(engine, 3), requests)
    for i in range(len(prompts)):
        assert batched[i].completion.token_ids == refilled[i].completion.token_ids
        assert batched[i].completion.finish_reason == refilled[i].completion.finish_reason


def test_refusals(engine, prompts):
    stream = open_stream(engine, 2)
    with pytest.raises(ValueError, match="empty"):
        stream.submit([StreamRequest(tag="a", prompt_token_ids=[], params=SamplingParams())])
    with pytest.raises(ValueError, match="token ids"):
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
    results, _ = drain(stream)
    assert len(results["d"].completion.token_ids) == 3
