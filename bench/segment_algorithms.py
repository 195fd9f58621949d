"""Costs of the Segment / Soft Policy Optimization pieces, each as a ratio to a baseline run in
the same process.

1. SPO-chain prefix deduplication: continuation requests and generated tokens with identical
   boundary prefixes sampled once, against one request per (response, cut point). Workload: the
   3-digit task (scripted engine), 16 prompts x 8 responses, cut interval 1, K = 9.
2. Sampling cost per prompt of SPO-chain (int1, K = 9) and SPO-tree (6-6-6, M = 1) against a
   GRPO-style group of 8 responses, in generated tokens, on the same task.
3. Loss overhead: `prepare_segment_batch` + `segment_policy_loss` (probability mask, whitening,
   PPO clip, k3 KL) forward + backward, and `soft_spo_loss`, against a plain token-mean PPO-clip
   loss on the same (B, T) log-prob tensors.
4. SPO-tree on the `hf` engine (tiny random Qwen3-style model): the tree grown with one
   `generate` call per level (as built) against the same orchestration with one call per node
   (each request sent alone, what a per-node recursive expansion does). Seeded requests make both
   trees identical, which the script checks.

Run: `.venv/bin/python bench/segment_algorithms.py` (about a minute; OMP_NUM_THREADS threads,
default 1, because on a shared machine spinning OpenMP threads make timings collapse). Counts in 1 and 2 are exact; 3 is wall time, the median over
rounds that time baseline and candidates in turn (robust to load from other processes).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from megatron_spo.rollout.engine import EngineConfig, make_engine  # noqa: E402
from megatron_spo.rollout.types import GenerationRequest, RolloutEngine, Sample, SamplingParams  # noqa: E402
from megatron_spo.testing.digit_task import (  # noqa: E402
    DigitPolicy,
    DigitTaskEngine,
    digit_reward,
    prompt_for_target,
    target_of_prompt,
)
from megatron_spo.training.algorithms.segment_chain import (  # noqa: E402
    SegmentChainConfig,
    build_chain_samples,
    chain_cut_points,
)
from megatron_spo.training.algorithms.segment_loss import (  # noqa: E402
    SegmentLossConfig,
    prepare_segment_batch,
    segment_policy_loss,
)
from megatron_spo.training.algorithms.segment_tree import SegmentTreeConfig, build_tree_samples  # noqa: E402
from megatron_spo.training.algorithms.soft_spo import SoftSPOConfig, soft_spo_loss  # noqa: E402

from tiny_models import make_tiny_model  # noqa: E402

class CountingEngine(DigitTaskEngine):
    """Counts requests and generated tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = 0
        self.tokens = 0

    def generate(self, requests):
        results = super().generate(requests)
        self.requests += len(requests)
        self.tokens += sum(len(c.token_ids) for r in results for c in r.completions)
        return results


def _responses(engine, prompts, group_size, config):
    requests = [
        GenerationRequest(prompt_token_ids=p, params=SamplingParams(
            n=group_size, temperature=config.temperature, top_p=config.top_p, max_tokens=4, seed=i))
        for i, p in enumerate(prompts)
    ]
    samples = []
    for i, result in enumerate(engine.generate(requests)):
        for c in result.completions:
            samples.append(Sample(prompt_key=i, prompt_token_ids=list(result.request.prompt_token_ids),
                                  response_token_ids=c.token_ids, response_logprobs=c.logprobs,
                                  response_mask=[1] * len(c.token_ids),
                                  reward=digit_reward(c.token_ids, target_of_prompt(prompts[i]))))
    return samples


def bench_chain_dedup() -> None:
    config = SegmentChainConfig(cut_interval=1, num_continuations=9, max_response_tokens=4)
    prompts = [prompt_for_target(37 * i + 5) for i in range(16)]
    samples = _responses(DigitTaskEngine(DigitPolicy(), seed=0), prompts, 8, config)

    def score(i, response, finish):  # sample i of the batch scores against its own prompt
        return digit_reward(response, target_of_prompt(samples[i].prompt_token_ids))

    deduplicated = CountingEngine(DigitPolicy(), seed=1)
    build_chain_samples(samples, deduplicated, score, config, seed=0)

    naive = CountingEngine(DigitPolicy(), seed=1)  # baseline: one request per (response, cut)
    for i, sample in enumerate(samples):
        cuts = chain_cut_points(sample.response_logprobs, interval=1, prob_threshold=0.9)
        for cut in cuts:
            naive.generate([GenerationRequest(
                prompt_token_ids=sample.prompt_token_ids + sample.response_token_ids[:cut],
                params=SamplingParams(n=9, temperature=0.6, top_p=0.9, max_tokens=4 - cut))])
    print("1. SPO-chain prefix dedup (16 prompts x 8 responses, int1, K=9)")
    print(f"   requests: naive {naive.requests}, deduplicated {deduplicated.requests}, "
          f"ratio {naive.requests / deduplicated.requests:.2f}x fewer")
    print(f"   generated tokens: naive {naive.tokens}, deduplicated {deduplicated.tokens}, "
          f"ratio {naive.tokens / deduplicated.tokens:.2f}x fewer")


def bench_sampling_cost() -> None:
    prompts = [prompt_for_target(37 * i + 5) for i in range(16)]
    chain_config = SegmentChainConfig(cut_interval=1, num_continuations=9, max_response_tokens=4)
    group = CountingEngine(DigitPolicy(), seed=2)
    samples = _responses(group, prompts, 8, chain_config)  # GRPO baseline: 8 responses / prompt
    baseline = group.tokens / len(prompts)

    chain = CountingEngine(DigitPolicy(), seed=3)
    one_response = [s for k, s in enumerate(samples) if k % 8 == 0]  # SPO-chain: 1 response + MC

    def score(i, response, finish):
        return digit_reward(response, target_of_prompt(one_response[i].prompt_token_ids))

    build_chain_samples(one_response, chain, score, chain_config, seed=0)
    chain_tokens = (chain.tokens + sum(len(s.response_token_ids) for s in one_response)) / len(prompts)

    tree = CountingEngine(DigitPolicy(), seed=4)
    tree_config = SegmentTreeConfig(branching_factors=[6, 6, 6], segment_tokens=1, max_response_tokens=4)

    def tree_score(i, response, finish):
        return digit_reward(response, target_of_prompt(prompts[i]))

    edges, _ = build_tree_samples(prompts, tree, tree_score, tree_config, seed=0)
    tree_tokens = tree.tokens / len(prompts)
    print("2. generated tokens per prompt (3-digit task)")
    print(f"   GRPO group of 8: {baseline:.1f}; SPO-chain int1 K=9: {chain_tokens:.1f} "
          f"({chain_tokens / baseline:.2f}x); SPO-tree 6-6-6: {tree_tokens:.1f} "
          f"({tree_tokens / baseline:.2f}x, {len(edges) / len(prompts):.1f} edge samples / prompt, "
          f"{tree.requests} requests in {len(tree.calls)} engine calls)")


def _interleaved_ratios(baseline, candidates, rounds=15):
    """Time the baseline and every candidate once per round, in turn, so load from other
    processes hits all alike; returns (median baseline seconds, {name: (median s, median ratio)})."""
    for fn in (baseline, *candidates.values()):
        fn()  # warm-up
    base_times, times = [], {name: [] for name in candidates}
    ratios = {name: [] for name in candidates}
    for _ in range(rounds):
        start = time.perf_counter()
        baseline()
        base = time.perf_counter() - start
        base_times.append(base)
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            ratios[name].append(elapsed / base)
    return statistics.median(base_times), {
        name: (statistics.median(times[name]), statistics.median(ratios[name])) for name in candidates
    }


def bench_loss_overhead(batch=32, tokens=1024) -> None:
    generator = torch.Generator().manual_seed(0)
    old = -torch.rand(batch, tokens, generator=generator) * 2
    ref = old + 0.01 * torch.randn(batch, tokens, generator=generator)
    new_base = old + 0.05 * torch.randn(batch, tokens, generator=generator)
    raw_advantages = torch.randn(batch, tokens, generator=generator)
    response_mask = torch.ones(batch, tokens)
    rewards = -torch.rand(batch, generator=generator)

    def plain_ppo():  # baseline: token-mean PPO clip, no mask beyond the response mask
        new = new_base.clone().requires_grad_()
        ratio = (new - old).exp()
        loss = torch.maximum(-raw_advantages * ratio, -raw_advantages * ratio.clamp(0.8, 1.2))
        ((loss * response_mask).sum() / response_mask.sum()).backward()

    config = SegmentLossConfig()

    def segment():
        new = new_base.clone().requires_grad_()
        advantages, loss_mask = prepare_segment_batch(raw_advantages, old, response_mask, config)
        segment_policy_loss(new, old, advantages, loss_mask, config, ref_logprobs=ref).loss.backward()

    soft_config = SoftSPOConfig()

    def soft():
        new = new_base.clone().requires_grad_()
        soft_spo_loss(new, ref, response_mask, rewards, -0.5, soft_config).loss.backward()

    baseline, results = _interleaved_ratios(plain_ppo, {
        "segment (mask + whiten + clip + k3)": segment, "soft-SPO squared": soft})
    print(f"3. loss forward+backward, B={batch} T={tokens} (medians of 15 interleaved rounds)")
    print(f"   plain PPO-clip baseline {baseline * 1e3:.2f} ms")
    for name, (elapsed, ratio) in results.items():
        print(f"   {name}: {elapsed * 1e3:.2f} ms, ratio {ratio:.2f}x")


class OneRequestPerCall(RolloutEngine):
    """Baseline engine wrapper: sends every request of a batch in its own `generate` call."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, requests):
        return [result for request in requests for result in self.engine.generate([request])]

    def update_weights(self, named_tensors):
        self.engine.update_weights(named_tensors)


def bench_tree_batching(num_prompts=8, repeats=2) -> None:
    config = SegmentTreeConfig(branching_factors=[4, 4, 4], segment_tokens=16, max_response_tokens=48,
                               temperature=1.0, top_p=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", "qwen3", seed=0, vocab_size=128)
        engine = make_engine(EngineConfig(model=str(model_dir), max_num_seqs=256))
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 128, (12,), generator=generator).tolist() for _ in range(num_prompts)]

        def score(i, response, finish):
            return sum(t % 2 == 0 for t in response) / len(response)

        def grow(target_engine):
            start = time.perf_counter()
            samples, roots = build_tree_samples(prompts, target_engine, score, config, seed=0)
            return time.perf_counter() - start, samples, roots

        grow(engine)  # warm-up
        batched = [grow(engine) for _ in range(repeats)]
        per_node = [grow(OneRequestPerCall(engine)) for _ in range(repeats)]
        same = [(s.prompt_token_ids, s.response_token_ids) for s in batched[0][1]] == [
            (s.prompt_token_ids, s.response_token_ids) for s in per_node[0][1]]
        nodes = sum(1 for root in batched[0][2] for _ in _walk(root)) - num_prompts
        tokens = sum(len(n.segment_token_ids) for root in batched[0][2] for n in _walk(root))
        best_batched, best_per_node = min(t for t, _, _ in batched), min(t for t, _, _ in per_node)
    print(f"4. SPO-tree 4-4-4, M=16, {num_prompts} prompts on the hf engine ({nodes} nodes, {tokens} tokens, "
          f"identical trees: {same})")
    print(f"   one call per node {best_per_node:.2f} s, one call per level {best_batched:.2f} s, "
          f"ratio {best_per_node / best_batched:.2f}x faster (best of {repeats})")


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"torch threads: {torch.get_num_threads()}")
    bench_chain_dedup()
    bench_sampling_cost()
    bench_loss_overhead()
    bench_tree_batching()
