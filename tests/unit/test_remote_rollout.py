"""`rollout.remote` in one process: a trainer-side `RemoteEngine` and a `RolloutServer` thread,
joined by the same two gloo groups a disaggregated job uses (the link and the weight broadcast).
The remote stream returns what the engine generates locally (slots refilled on the far side),
broadcast weights arrive bit for bit in any dtype, and a failure inside the rollout rank is one
line naming it while the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import threading

import pytest
import torch

from megatron_spo.config import from_dict
from megatron_spo.errors import UserError
from megatron_spo.platform import RolloutChannels
from megatron_spo.rollout.engine import EngineConfig, make_engine
from megatron_spo.rollout.remote import RemoteEngine, RolloutRankError, RolloutServer
from megatron_spo.rollout.streaming import StreamRequest
from megatron_spo.rollout.types import GenerationRequest, SamplingParams
from megatron_spo.rollout.weight_sync import WeightSyncConfig
from tiny_models import make_tiny_model

PROMPTS = ["hello world", "abc", "The quick brown fox jumps over", "x", "lorem ipsum dolor sit amet",
           "0123456789", "a b c d e f g", "zz"]


def _pair():
    """The two ends' `RolloutChannels` (trainer rank 0 <-> rollout rank 1 of a job of 2)."""
    store = torch.distributed.HashStore()
    timeout = datetime.timedelta(seconds=60)

    def end(rank):
        link = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("link", store), rank, 2, timeout)
        weights = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("weights", store), rank, 2, timeout)
        return RolloutChannels(link=link, link_rank=rank, weights=weights, weights_rank=rank, pair=0, peer=1 - rank)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trainer, rollout = pool.map(end, [0, 1])
    return trainer, rollout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=5, vocab_size=100)


@pytest.fixture
def remote(model_dir):
    """(the trainer's RemoteEngine with 1 MB buckets, the server's engine); shut down after."""
    trainer, rollout = _pair()
    served = make_engine(EngineConfig(model=str(model_dir), max_num_seqs=3))
    server = RolloutServer(served, rollout)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    engine = RemoteEngine(trainer, from_dict(WeightSyncConfig, {"bucket_mb": 0.001}))
    yield engine, served
    engine.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive()


def _requests(engine, params):
    """One request per prompt, of lengths (and seeds) varying with it, so slots free one by one."""
    return [GenerationRequest(prompt_token_ids=engine.tokenizer.encode(p), params=dataclasses.replace(
        params, max_tokens=params.max_tokens + i % 4, seed=None if params.seed is None else params.seed + 7 * i))
            for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=12),
                                    SamplingParams(temperature=1.0, max_tokens=12, seed=17)])
def test_the_remote_stream_returns_what_the_engine_generates(remote, model_dir, params):
    engine, served = remote
    local = make_engine(EngineConfig(model=str(model_dir)))
    expected = [r.completions[0] for r in local.generate(_requests(local, params))]
    stream = engine.open_stream(3)  # 3 slots on the rollout rank for 8 sequences: refilled there
    stream.submit([StreamRequest(tag=i, prompt_token_ids=r.prompt_token_ids, params=r.params)
                   for i, r in enumerate(_requests(local, params))])
    got = {}
    while not stream.idle:
        for result in stream.step():
            got[result.tag] = result
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, completion in enumerate(expected):
        assert got[i].completion.token_ids == completion.token_ids
        assert got[i].completion.logprobs == pytest.approx(completion.logprobs, abs=1e-5)
        assert got[i].token_versions == [0] * len(completion.token_ids)
    assert stream.refills > 0


def test_weights_arrive_by_broadcast_bit_for_bit_in_buckets(remote):
    engine, served = remote
    model = served.model
    named = [(name, torch.randn_like(p.float()).to(torch.bfloat16 if "mlp" in name else p.dtype))
             for name, p in model.named_parameters()]
    engine.update_weights(iter(named))
    params = dict(model.named_parameters())
    for name, tensor in named:
        assert torch.equal(params[name].detach(), tensor.to(params[name].dtype)), name
    # generation on the far side now uses them: remote and local agree after the same load
    params_greedy = SamplingParams(temperature=0.0, max_tokens=6)
    remote_out = engine.generate(_requests(served, params_greedy))
    assert remote_out == served.generate(_requests(served, params_greedy))


def test_a_failure_inside_the_rollout_rank_is_one_line_and_serving_goes_on(remote):
    engine, served = remote
    bad = [GenerationRequest(prompt_token_ids=[], params=SamplingParams(max_tokens=4))]
    with pytest.raises(RolloutRankError) as err:
        engine.generate(bad)
    message = str(err.value)
    assert message.startswith("rollout rank 1 (parallel.rollout_ranks) failed: ") and "\n" not in message
    assert isinstance(err.value, UserError)
    ok = engine.generate(_requests(served, SamplingParams(temperature=0.0, max_tokens=3))[:2])
    assert len(ok) == 2


def test_rollout_ranks_refusals(model_dir, tmp_path):
    from megatron_spo.training.config import TrainConfig

    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "p", "answer": "a"}\n')
    base = {"model": {"hf_dir": str(model_dir)}, "data": {"train_files": [str(data)]}, "parallel": {"rollout_ranks": 1}}
    with pytest.raises(UserError, match=r"^config: parallel.rollout_ranks=1: .* needs rollout.mode=async"):
        from_dict(TrainConfig, base)
    config = from_dict(TrainConfig, {**base, "rollout": {"mode": "async"},
                                     "algorithm": {"spo": {"gen_batch_size": 2048}}})
    assert config.check_world_size(2) == 1
    with pytest.raises(UserError, match=r"world of 3 ranks leaves 2 trainer ranks: .* launch 2 x 1 = 2"):
        config.check_world_size(3)
