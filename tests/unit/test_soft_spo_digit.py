"""Soft-SPO end to end on the 3-digit task: off-policy sequences from a jsonl file, Q0 from an
engine serving pi_ref, a learnable tabular policy trained with the soft-Q loss. The optimum over
whole sequences, pi*(y) proportional to pi_ref(y) exp(r(y) / beta), is enumerable (1000
sequences), so the distance to it is exact."""

import json
import random

import pytest
import torch

from megatron_spo.testing.digit_task import (
    DigitTaskEngine,
    TabularDigitPolicy,
    digit_reward,
    gather_logprobs,
    prompt_for_target,
    split_prompt,
    table_index,
    teacher_forced_logprobs,
)
from megatron_spo.training.algorithms.soft_spo import (
    SoftSPOConfig,
    estimate_prompt_q0,
    load_offpolicy_jsonl,
    soft_spo_loss,
)

TARGET = 737
ALL_RESPONSES = [[a, b, c, 10] for a in range(10) for b in range(10) for c in range(10)]


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """The tensors here are tiny: with a thread pool every op pays a barrier, which costs ~100x
    on a loaded machine (log_softmax of 111 x 10: 19 ms with 2 threads, 0.15 ms with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _sequence_distribution(logits):
    """(1000,) pi(y) over every response, by enumeration (temperature 1)."""
    return teacher_forced_logprobs(logits, ALL_RESPONSES, [0] * len(ALL_RESPONSES), 1.0).sum(dim=1).exp()


def test_soft_spo_trains_a_sequence_policy_toward_the_optimal_soft_policy(tmp_path):
    beta = 0.05  # rewards in [-1, 0]: r / beta >= -20, inside the Q0 clamp
    config = SoftSPOConfig(beta=beta)
    prompt = prompt_for_target(TARGET)

    # an external file of off-policy sequences with their rewards: every response once, shuffled
    # (a sequence absent from the data is unconstrained by the loss, so full support makes the
    # optimum exactly pi*)
    shuffled = list(ALL_RESPONSES)
    random.Random(0).shuffle(shuffled)
    path = tmp_path / "offpolicy.jsonl"
    with open(path, "w") as handle:
        for response in shuffled:
            handle.write(json.dumps({"prompt_token_ids": prompt, "response_token_ids": response,
                                     "reward": digit_reward(response, TARGET)}) + "\n")
    data = load_offpolicy_jsonl(path)

    ref_logits = torch.zeros(TabularDigitPolicy.NUM_STATES, 10)  # pi_ref: uniform digits
    reference_engine = DigitTaskEngine(TabularDigitPolicy(ref_logits), seed=0)
    score = lambda i, response, finish: digit_reward(response, TARGET)  # noqa: E731
    (q0,) = estimate_prompt_q0([prompt], reference_engine, score, config, seed=0)  # 256 samples

    # teacher forcing of the whole file, as the trainer's forward passes would (B, 4)
    index = table_index([s.response_token_ids for s in data],
                        [len(split_prompt(s.prompt_token_ids)[1]) for s in data])
    ref_logprobs = gather_logprobs(ref_logits, index, 1.0)
    rewards = torch.tensor([s.reward for s in data])

    logits = ref_logits.clone().requires_grad_()  # warm start at the reference
    optimizer = torch.optim.Adam([logits], lr=0.3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        batch = torch.randint(len(data), (500,), generator=generator)
        logprobs = gather_logprobs(logits, index[batch], 1.0)
        out = soft_spo_loss(logprobs, ref_logprobs[batch], torch.ones_like(logprobs), rewards[batch], q0, config)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    all_rewards = torch.tensor([digit_reward(r, TARGET) for r in ALL_RESPONSES])
    pi_ref = _sequence_distribution(ref_logits)
    pi_star = pi_ref * torch.exp(all_rewards / beta)
    pi_star = pi_star / pi_star.sum()
    pi = _sequence_distribution(logits.detach())
    total_variation = 0.5 * (pi - pi_star).abs().sum().item()
    kl = (pi_star * (pi_star.log() - pi.log())).sum().item()
    # from TV 0.67 to 0.045 (the rest is the error of Q0 from 256 reference samples)
    assert 0.5 * (pi_ref - pi_star).abs().sum().item() > 0.6
    assert total_variation < 0.07, total_variation
    assert kl < 0.02, kl
    assert abs(int(pi.argmax()) - TARGET) <= 5
