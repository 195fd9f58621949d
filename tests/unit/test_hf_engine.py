"""The `hf` rollout engine against the HF model itself: greedy ids, weight updates, seeded
sampling, logprobs, stop / length finish reasons, continuation from a prefix."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.hf_engine import HFEngine, sampling_logprobs
from megatron_spo.rollout.types import GenerationRequest, SamplingParams
from megatron_spo.rollout.weight_sync import WeightSyncConfig, sync_weights
from tiny_models import make_tiny_model

EOS = 2  # <|im_end|> in the tiny tokenizer and config
PROMPTS = ["hello world", "abc", "The quick brown fox jumps over", "x"]
VOCAB = 100  # the tiny tokenizer's size: every sampled id decodes to text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = make_engine(EngineConfig(model=str(model_dir), max_num_seqs=3))
    assert isinstance(engine, HFEngine)
    return engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(p) for p in PROMPTS]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF's own greedy decoding of one unpadded prompt."""
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def greedy_ids(engine, prompts, max_tokens=24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts])
    return [r.completions[0].token_ids for r in results]


def teacher_forced_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """(len(response),) log_softmax of HF's logits at the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_greedy_equals_hf_generate(tmp_path, family):
    model_dir = make_tiny_model(tmp_path, family, seed=1, vocab_size=VOCAB)
    engine = make_engine(EngineConfig(model=str(model_dir), max_num_seqs=2))  # 2 batches of 2
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert greedy_ids(engine, prompts, 16) == [hf_greedy(model, p, 16) for p in prompts]


def test_update_weights_then_greedy_equals_hf_with_new_weights(model_dir, prompts):
    engine = make_engine(EngineConfig(model=str(model_dir)))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    before = greedy_ids(engine, prompts)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    expected = [hf_greedy(model, p, 24) for p in prompts]
    assert expected != before  # the perturbation changes the outputs
    stats = sync_weights(engine, model.state_dict().items(), WeightSyncConfig(bucket_mb=0.1))
    assert stats.buckets > 1
    assert stats.bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert greedy_ids(engine, prompts) == expected


def test_engine_without_weights_gets_them_from_the_stream(model_dir, prompts):
    """The trainer's case: the engine is built from the config and fed by the bridge."""
    engine = make_engine(EngineConfig(model=str(model_dir), load_weights=False))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    expected = [hf_greedy(model, p, 16) for p in prompts]
    assert greedy_ids(engine, prompts, 16) != expected
    engine.update_weights(model.state_dict().items())
    assert greedy_ids(engine, prompts, 16) == expected


def test_update_weights_rejects_unknown_names_and_shapes(engine):
    with pytest.raises(ValueError, match="not a weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="expects"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_seeded_sampling_is_reproducible_and_batch_independent(engine, prompts):
    seeded = GenerationRequest(prompt_token_ids=prompts[0], params=SamplingParams(n=3, max_tokens=16, seed=7))
    others = [GenerationRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=16)) for p in prompts[1:]]
    alone = [c.token_ids for c in engine.generate([seeded])[0].completions]
    batched = [c.token_ids for c in engine.generate(others + [seeded])[-1].completions]
    assert alone == batched
    assert len({tuple(ids) for ids in alone}) == 3  # the n samples differ from each other
    reseeded = GenerationRequest(prompt_token_ids=prompts[0], params=SamplingParams(n=3, max_tokens=16, seed=8))
    assert [c.token_ids for c in engine.generate([reseeded])[0].completions] != alone


def test_logprobs_equal_hf_log_softmax_at_temperature_one(engine, model_dir, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=11)
    results = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts])
    for prompt, result in zip(prompts, results):
        for completion in result.completions:
            expected = teacher_forced_logprobs(model, prompt, completion.token_ids)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_top_k_samples_stay_in_the_top_k_and_logprobs_are_renormalised(engine, model_dir, prompts):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    params = SamplingParams(n=2, temperature=0.7, top_k=3, max_tokens=12, seed=5)
    result = engine.generate([GenerationRequest(prompt_token_ids=prompts[2], params=params)])[0]
    for completion in result.completions:
        ids = torch.tensor([prompts[2] + completion.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[2]) - 1 : -1] / 0.7  # (T, V)
        top3 = logits.topk(3, dim=-1)
        for t, token in enumerate(completion.token_ids):
            assert token in top3.indices[t].tolist()
            expected = top3.values[t].log_softmax(-1)[top3.indices[t].tolist().index(token)]
            assert completion.logprobs[t] == pytest.approx(float(expected), abs=1e-4)


def test_sampling_logprobs_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    temperature = torch.tensor([1.0, 2.0, 1.0, 0.0])
    top_k = torch.tensor([2, -1, -1, 2])
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.5])
    out = sampling_logprobs(logits, temperature, top_k, top_p)
    e = math.e
    # row 0: top-2 of [2, 1] -> log(e^2 / (e^2 + e)), log(e / (e^2 + e))
    assert out[0, 0].item() == pytest.approx(math.log(e**2 / (e**2 + e)), abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(e / (e**2 + e)), abs=1e-6)
    assert out[0, 2:].tolist() == [-math.inf, -math.inf]
    # row 1: temperature 2 -> logits [1, .5, 0, -.5], full softmax
    z = sum(math.exp(v) for v in (1.0, 0.5, 0.0, -0.5))
    assert out[1].tolist() == pytest.approx([v - math.log(z) for v in (1.0, 0.5, 0.0, -0.5)], abs=1e-6)
    # row 2: probs [.644, .237, .087, .032]; mass before token 1 is .644 < .7, before token 2
    # is .881 >= .7 -> keep tokens 0 and 1 (same as row 0)
    assert out[2, :2].tolist() == pytest.approx(out[0, :2].tolist(), abs=1e-6)
    assert out[2, 2:].tolist() == [-math.inf, -math.inf]
    # row 3: greedy -> raw log_softmax, filters ignored
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.0, -1.0))
    assert out[3].tolist() == pytest.approx([v - math.log(z) for v in (2.0, 1.0, 0.0, -1.0)], abs=1e-6)


def test_stop_token_stop_string_and_length(engine, prompts):
    reference = greedy_ids(engine, prompts[:1], 24)[0]
    assert EOS not in reference[:10]
    stop_token = reference[6]
    first = reference.index(stop_token)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token])
    completion = engine.generate([GenerationRequest(prompt_token_ids=prompts[0], params=params)])[0].completions[0]
    assert completion.token_ids == reference[: first + 1]
    assert completion.finish_reason == "stop"

    text = engine.tokenizer.decode(reference, skip_special_tokens=True)
    stop = text[5:7]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    completion = engine.generate([GenerationRequest(prompt_token_ids=prompts[0], params=params)])[0].completions[0]
    assert completion.finish_reason == "stop"
    assert completion.text == text[: text.index(stop) + len(stop)]
    assert completion.token_ids == reference[: len(completion.token_ids)]
    assert len(completion.token_ids) < len(reference)

    params = SamplingParams(temperature=0.0, max_tokens=5)
    completion = engine.generate([GenerationRequest(prompt_token_ids=prompts[0], params=params)])[0].completions[0]
    assert completion.token_ids == reference[:5]
    assert completion.finish_reason == "length"
    assert len(completion.logprobs) == 5


def test_eos_ends_a_sample_with_stop(engine, prompts):
    """EOS (from the model's config) is a stop token without being asked for."""
    assert EOS in engine.eos_token_ids
    params = SamplingParams(n=3, temperature=1.0, max_tokens=64, seed=0)
    results = engine.generate([GenerationRequest(prompt_token_ids=p, params=params) for p in prompts])
    assert any(EOS in c.token_ids for r in results for c in r.completions)  # 12 samples, ~1/100 odds per token
    for result in results:
        for completion in result.completions:
            if EOS in completion.token_ids:
                assert completion.token_ids.index(EOS) == len(completion.token_ids) - 1
                assert completion.finish_reason == "stop"
            else:
                assert completion.finish_reason == "length" and len(completion.token_ids) == 64


def test_context_length_ends_with_length(model_dir, prompts):
    engine = make_engine(EngineConfig(model=str(model_dir), max_model_len=len(prompts[2]) + 4))
    params = SamplingParams(temperature=0.0, max_tokens=50)
    completion = engine.generate([GenerationRequest(prompt_token_ids=prompts[2], params=params)])[0].completions[0]
    assert len(completion.token_ids) <= 4
    assert completion.finish_reason == "length" or completion.token_ids[-1] == EOS


def test_continuation_from_a_token_prefix(engine, prompts):
    full = greedy_ids(engine, prompts[:1], 12)[0]
    assert len(full) == 12
    continued = greedy_ids(engine, [prompts[0] + full[:5]], 7)[0]
    assert continued == full[5:]


def test_sleep_forbids_generate_until_wake_up(engine, prompts):
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        greedy_ids(engine, prompts[:1], 2)
    engine.wake_up()
    assert len(greedy_ids(engine, prompts[:1], 2)[0]) == 2


def test_sleep_levels_and_wake_up_tags(engine, prompts):
    """Level 2 (colocation) as level 1 here; the weights tag wakes the weights, kv_cache alone
    does not (the hf engine's cache lives inside generate)."""
    before = greedy_ids(engine, prompts[:1], 4)[0]
    engine.sleep(level=2)
    engine.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="asleep"):
        greedy_ids(engine, prompts[:1], 2)
    engine.wake_up(["weights"])
    assert greedy_ids(engine, prompts[:1], 4)[0] == before
    with pytest.raises(ValueError, match="level"):
        engine.sleep(level=3)
    with pytest.raises(ValueError, match="tags"):
        engine.wake_up(["weight"])


def test_bad_requests_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([GenerationRequest(prompt_token_ids=[])])
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([GenerationRequest(prompt_token_ids=[5, 100000])])


def test_tied_embeddings_update_through_the_embedding(tmp_path, prompts):
    """A tied model's stream may carry only `model.embed_tokens.weight`: the output layer follows."""
    model_dir = make_tiny_model(tmp_path, "qwen2", seed=5, vocab_size=VOCAB, tie_word_embeddings=True)
    engine = make_engine(EngineConfig(model=str(model_dir)))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # lm_head is the embedding: perturbed once
            param.add_(0.3 * torch.randn_like(param))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    expected = [hf_greedy(model, p, 12) for p in prompts]
    assert greedy_ids(engine, prompts, 12) != expected
    engine.update_weights((n, t) for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert greedy_ids(engine, prompts, 12) == expected
