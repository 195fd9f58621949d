"""Each algorithm object alone (no trainer, no model): its batch preparation and its post-update
hook against numbers computed by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_spo.training.algorithms.base import StepContext
from megatron_spo.training.batch import TrainBatch
from megatron_spo.training.config import BatchConfig, GRPOConfig, RolloutConfig, SPOConfig
from megatron_spo.training.rollouts import Prompt, Rollout


def _ctx(logprob: float = -1.0, step: int = 0) -> StepContext:
    """A one-rank context whose forward pass gives every token the log-prob `logprob`."""
    return StepContext(step=step, seed=0, dp=1, dp_rank=0, tokenizer=None, engine=None, scorer=None,
                       plan=None, exchange=None, actor="actor",
                       logprobs=lambda model, batch: torch.full((len(batch), batch.input_ids.shape[1] - 1), logprob))


def _rollout(prompts: list[Prompt], responses: list[list[int]], rewards: list[float],
             index: list[int] | None = None) -> Rollout:
    rollout = Rollout()
    for i, (response, reward) in enumerate(zip(responses, rewards)):
        j = index[i] if index else i
        rollout.add(j, prompts[j], prompts[j].token_ids, response, [1] * len(response), [-0.5] * len(response), reward)
    return rollout


PROMPTS = [Prompt(key=100 + i, raw=f"p{i}", token_ids=[1, 2 + i], answer="a") for i in range(4)]


def _spo(**value):
    from megatron_spo.training.algorithms.spo import SPO
    from megatron_spo.value import ValueStore

    config = SPOConfig(**value)
    store = ValueStore.from_keys(np.array([p.key for p in PROMPTS], dtype=np.int64), config)
    return SPO(config, store, rollout=RolloutConfig(n=1), batch=BatchConfig(train_batch_size=3, mini_batch_size=3),
               seed=0)


def test_spo_advantages_are_reward_minus_p_hat_normalised_over_the_batch():
    spo = _spo()
    batch_prompts = PROMPTS[:3]
    spo.before_generation(_ctx(), batch_prompts)  # every prompt at its Beta(0.5, 0.5) prior: p_hat = 0.5
    rollout = _rollout(batch_prompts, [[7, 8], [9], [7, 8, 9]], [1.0, 0.0, 1.0])
    batch, adv = spo.prepare(_ctx(), rollout, TrainBatch.from_rollout(rollout, 0), None)
    # r - p_hat = [0.5, -0.5, 0.5]; mean 1/6; deviations [1/3, -2/3, 1/3]; unbiased var = (1/9 + 4/9 + 1/9) / 2
    # = 1/3; advantages = deviations / sqrt(1/3) = [0.57735, -1.15470, 0.57735] on each response token
    per_sequence = [adv[row][batch.target_mask[row].bool()].tolist() for row in range(3)]
    assert per_sequence == [pytest.approx([0.57735027] * 2), pytest.approx([-1.15470054]),
                            pytest.approx([0.57735027] * 3)]
    assert torch.equal(batch.advantages[:, :-1], adv) and batch.advantages[:, -1].abs().sum() == 0


def test_spo_after_update_constant_rho_moves_the_posterior():
    spo = _spo(rho_mode="constant", rho=0.5)
    spo.before_generation(_ctx(), PROMPTS[:2])
    metrics = spo.after_update(_ctx(), _rollout(PROMPTS[:2], [[7], [8]], [1.0, 0.0]))
    # Beta(0.5, 0.5) -> r = 1: (0.5 * 0.5 + 1, 0.5 * 0.5) = (1.25, 0.25): p_hat 1.25 / 1.5 = 0.8333;
    #                   r = 0: (0.25, 1.25): p_hat 0.1667
    p_hat = spo.store.p_hat(np.array([PROMPTS[0].key, PROMPTS[1].key], dtype=np.int64))
    assert p_hat.tolist() == pytest.approx([1.25 / 1.5, 0.25 / 1.5])
    assert metrics["rho/mean"] == 0.5 and metrics["kl_drift/mean"] == 0.0
    assert metrics["p_hat/mean"] == 0.5  # read before the update


def test_spo_after_update_kl_rho_from_the_drift_of_the_stored_response():
    spo = _spo(rho_mode="kl", d_half=0.06, clip_lower=0.875, clip_upper=0.96)
    prompt = PROMPTS[:1]
    spo.before_generation(_ctx(), prompt)
    first = spo.after_update(_ctx(logprob=-1.0), _rollout(prompt, [[7, 8]], [1.0]))
    # first visit: nothing stored, D = 0, rho = clip_upper = 0.96: (0.96 * 0.5 + 1, 0.96 * 0.5) = (1.48, 0.48)
    assert first["rho/mean"] == pytest.approx(0.96) and first["kl_drift/mean"] == 0.0
    # the response was stored with log-probs -1.0; now the actor gives -1.01: D = 0.01,
    # rho = 2^(-0.01 / 0.06) = 0.890899 (inside the clamps)
    second = spo.after_update(_ctx(logprob=-1.01), _rollout(prompt, [[9]], [0.0]))
    rho = 2 ** (-0.01 / 0.06)
    assert second["kl_drift/mean"] == pytest.approx(0.01) and second["rho/mean"] == pytest.approx(rho)
    alpha, beta = rho * 1.48 + 0.0, rho * 0.48 + 1.0
    assert spo.store.p_hat(np.array([prompt[0].key]))[0] == pytest.approx(alpha / (alpha + beta))


def test_spo_chooses_from_its_pool_by_weight_and_restores_its_sampler():
    from megatron_spo.training.data import PromptOrder

    spo = _spo(gen_batch_size=4)
    order = PromptOrder(PROMPTS, seed=0, shuffle=False)
    state = spo.state_dict()
    chosen = spo.choose_prompts(order)
    assert len(chosen) == 3 and len({p.key for p in chosen}) == 3 and order.cursor == 4  # a pool of 4, 3 drawn
    spo.load_state_dict(state)
    assert spo.choose_prompts(PromptOrder(PROMPTS, seed=0, shuffle=False)) == chosen


def test_grpo_advantages_are_group_normalised():
    from megatron_spo.training.algorithms.grpo import GRPO

    grpo = GRPO(GRPOConfig(), rollout=RolloutConfig(n=2), batch=BatchConfig(train_batch_size=2, mini_batch_size=2))
    rollout = _rollout(PROMPTS, [[7], [8], [9], [7]], [1.0, 0.0, 0.0, 0.0], index=[0, 0, 1, 1])
    batch, adv = grpo.prepare(_ctx(), rollout, TrainBatch.from_rollout(rollout, 0), None)
    # group 0: rewards (1, 0), mean 0.5, unbiased std sqrt(0.5) = 0.70711: +-0.5 / (0.70711 + 1e-6) = +-0.70711
    # group 1: (0, 0): std 0, advantages 0
    values = [adv[row][batch.target_mask[row].bool()].item() for row in range(4)]
    assert values == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6), 0.0, 0.0])
    assert grpo.after_update(_ctx(), rollout) == {}


def test_segment_algorithms_mask_confident_tokens_and_whiten_the_rest():
    from megatron_spo.training.algorithms.segment_tree import SegmentTreeConfig
    from megatron_spo.training.algorithms.spo_tree import SPOTree

    tree = SPOTree(SegmentTreeConfig(), batch=BatchConfig(train_batch_size=1, mini_batch_size=1))
    rollout = _rollout(PROMPTS[:1], [[7, 8, 9]], [1.0])
    rollout.token_advantages = [[1.0, 1.0, -1.0]]
    sequences = TrainBatch.from_rollout(rollout, 0)  # T = 5; the response's targets are positions 1..3
    old = torch.tensor([[0.0, math.log(0.5), math.log(0.95), math.log(0.2)]])
    batch, adv = tree.prepare(_ctx(), rollout, sequences, old)
    # pi_old < 0.9 keeps tokens 1 and 3 (0.95 is confident); whitening over (1, -1): mean 0, unbiased
    # var 2: (1, -1) / sqrt(2 + 1e-8) = (0.70711, -0.70711); the confident token gets 0 and no gradient
    assert adv[0, 1:].tolist() == pytest.approx([1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)])
    assert batch.response_mask[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_edge_replay_draws_at_most_n_edges_per_question_and_buffers_the_rest():
    """The authors' OnPolicyReplayBuffer: per question at most N edges a step, the rest wait (with
    the old log-probs `keep` gives them) and are drawn in later steps, or dropped at max_age."""
    from megatron_spo.training.algorithms.spo_tree import EdgeReplay

    replay = EdgeReplay(per_question=2, max_age=2)
    fresh = _rollout(PROMPTS, [[10], [11], [12], [20]], [1.0, 0.0, 1.0, 0.0], index=[0, 0, 0, 1])
    fresh.token_advantages = [[0.5], [-0.5], [0.5], [-0.5]]
    fresh.episode_rewards, fresh.episode_index = [1.0, 0.0], [0, 1]
    drawn = replay.draw(fresh, 0, 0)
    # question 100 (position 0) has 3 edges: 2 drawn, 1 waits; question 101 its only edge
    assert sorted(drawn.prompt_index) == [0, 0, 1] and drawn.episode_rewards == [1.0, 0.0]
    (waiting,) = replay.waiting
    assert waiting["question"] == 100 and waiting["response"] not in drawn.responses
    with pytest.raises(RuntimeError, match="before keep"):
        replay.draw(fresh, 1, 0)
    replay.keep([[-0.7]])
    again = _rollout(PROMPTS, [[21], [22]], [1.0, 1.0], index=[1, 1])
    again.token_advantages = [[0.1], [0.2]]
    drawn = replay.draw(again, 1, 1)
    # step 1: question 101's two fresh edges, and question 100's buffered one at position -1
    # (spread over mini-batches), with NaN engine log-probs and its stored old log-probs
    assert drawn.responses == [[21], [22], waiting["response"]] and drawn.prompt_index == [1, 1, -1]
    assert math.isnan(drawn.logprobs[2][0]) and replay.replayed_old == {2: [-0.7]} and replay.edges == []
    assert drawn.token_advantages == [[0.1], [0.2], waiting["advantages"]]
    # aging: an edge sampled at step 1 is dropped at step 3 (max_age 2), never drawn
    replay.keep([])
    replay.edges = [{**waiting, "step": 1, "old_logprobs": [-0.7]}]
    assert len(replay.draw(Rollout(token_advantages=[]), 3, 2)) == 0
    assert replay.counts == {"replayed": 0, "dropped": 1} and replay.edges == []


def test_spo_tree_replay_trains_buffered_edges_on_their_stored_old_logprobs_and_resumes():
    from megatron_spo.training.algorithms.segment_loss import SegmentLossConfig
    from megatron_spo.training.algorithms.segment_tree import SegmentTreeConfig
    from megatron_spo.training.algorithms.spo_tree import SPOTree

    config = SegmentTreeConfig(replay_edges_per_question=1, loss=SegmentLossConfig(kl_coef=0.0))
    tree = SPOTree(config, batch=BatchConfig(train_batch_size=1, mini_batch_size=1))
    fresh = _rollout(PROMPTS[:1], [[7, 8], [9]], [1.0, 0.0], index=[0, 0])
    fresh.token_advantages = [[0.5, 0.5], [-0.5]]
    drawn = tree.replay.draw(fresh, 0, 0)
    sequences = TrainBatch.from_rollout(drawn, 0)
    tree.prepare(_ctx(logprob=-1.0), drawn, sequences, torch.full((1, sequences.input_ids.shape[1] - 1), -1.0))
    (kept,) = tree.replay.edges  # the edge not drawn, with the old log-probs of the step that sampled it
    assert kept["response"] not in drawn.responses and kept["old_logprobs"] == [-1.0] * len(kept["response"])
    state = tree.state_dict()

    drawn = tree.replay.draw(Rollout(token_advantages=[]), 1, 1)
    sequences = TrainBatch.from_rollout(drawn, 0)  # context [1, 2]: response targets from position 1
    width = sequences.input_ids.shape[1] - 1
    batch, _ = tree.prepare(_ctx(logprob=-3.0), drawn, sequences, torch.full((1, width), -3.0))
    n = len(kept["response"])
    assert batch.old_logprobs[0, 1 : 1 + n].tolist() == [-1.0] * n  # stored, not this step's -3
    assert batch.response_mask[0, 1 : 1 + n].tolist() == [1.0] * n  # p_old = e^-1 < 0.9: trained
    assert tree.after_update(_ctx(), drawn) == {"replay/buffered_edges": 0.0, "replay/replayed_edges": 1.0,
                                                "replay/dropped_edges": 0.0}
    resumed = SPOTree(config, batch=BatchConfig(train_batch_size=1, mini_batch_size=1))
    resumed.load_state_dict(state)
    again = resumed.replay.draw(Rollout(token_advantages=[]), 1, 1)
    assert again.responses == drawn.responses and resumed.replay.replayed_old == {0: [-1.0] * n}


def test_soft_spo_batch_carries_rewards_and_q0_and_replays_its_sequences(tmp_path):
    from megatron_spo.rollout.types import Sample
    from megatron_spo.training.algorithms.soft_spo import SoftSPO, SoftSPOConfig, context_key

    external = Sample(prompt_key=7, prompt_token_ids=[3, 4], response_token_ids=[5], response_logprobs=[math.nan],
                      response_mask=[1], reward=-0.5, extra={"source": "file:1", "q0": -0.2})
    (tmp_path / "file.jsonl").write_text("")  # the config names the file the sequences came from
    config = SoftSPOConfig(offpolicy_files=[str(tmp_path / "file.jsonl")], offpolicy_per_step=1, replay_buffer_size=2,
                           replay_per_step=1, reward_offset=-1.0)
    soft = SoftSPO(config, [external], rollout=RolloutConfig(n=1), batch=BatchConfig(train_batch_size=1, mini_batch_size=1),
                   seed=0)
    policy_context, file_context = context_key(PROMPTS[0].token_ids), context_key([3, 4])  # Q0 is per context
    soft.q0 = {policy_context: -0.4}
    soft.before_generation(_ctx(), PROMPTS[:1])  # both Q0 known (the file gives its own): no engine needed
    assert soft.q0 == {policy_context: -0.4, file_context: -0.2}
    first = _rollout(PROMPTS[:1], [[7, 8]], [-1.0])
    soft.add_offpolicy(_ctx(step=0), first)
    assert first.responses == [[7, 8], [5]] and first.q0 == [-0.4, -0.2]  # policy + file, nothing to replay yet
    second = _rollout(PROMPTS[:1], [[9]], [0.0])
    soft.add_offpolicy(_ctx(step=1), second)
    assert second.responses == [[9], [5], [7, 8]]  # + step 0's policy sequence from the replay buffer
    batch, adv = soft.prepare(_ctx(), second, TrainBatch.from_rollout(second, 0), None)
    # the file's task reward -0.5 is shifted by reward_offset -1 like the policy's (already shifted here)
    assert adv is None and batch.rewards.tolist() == [0.0, -1.5, -1.0] and batch.q0.tolist() == pytest.approx(
        [-0.4, -0.2, -0.4])
    assert soft.after_update(_ctx(), second) == {"rollout/reference_tokens": 0.0}
    state = soft.state_dict()
    assert state["replay"][-1]["response"] == [9] and state["q0"][file_context] == -0.2


@pytest.mark.parametrize("reward", [-1.0, 1.5, float("nan")])
def test_spo_refuses_rewards_the_beta_tracker_cannot_hold(reward):
    """The advantage would use the raw reward while the posterior clamps it: refused, one line."""
    from megatron_spo.errors import UserError

    spo = _spo()
    spo.before_generation(_ctx(), PROMPTS[:2])
    rollout = _rollout(PROMPTS[:2], [[7], [8]], [1.0, reward])
    with pytest.raises(UserError, match=r"1 reward\(s\) outside \[0, 1\].*rescale the reward"):
        spo.prepare(_ctx(), rollout, TrainBatch.from_rollout(rollout, 0), None)
    fractional = _rollout(PROMPTS[:2], [[7], [8]], [1.0, 0.25])  # a partial success is a Beta observation
    spo.prepare(_ctx(), fractional, TrainBatch.from_rollout(fractional, 0), None)


@pytest.mark.parametrize("drift_tokens, rho", [("model", 0.96), ("all", 0.875)])
def test_spo_kl_drift_counts_model_tokens_not_tool_output(drift_tokens, rho):
    """The stored response [7, 9] has 9 as tool output. At the next visit the actor's log-prob moved
    by 1 nat on the tool token only: D = 0 over model tokens (rho = clip_upper 0.96), D = 0.5 over
    all tokens (the authors' count; 2^(-0.5 / 0.06) clamps to clip_lower 0.875)."""
    spo = _spo(rho_mode="kl", drift_tokens=drift_tokens)
    prompt = PROMPTS[:1]
    spo.before_generation(_ctx(), prompt)
    first = Rollout()
    first.add(0, prompt[0], prompt[0].token_ids, [7, 9], [1, 0], [-0.5, -0.5], 1.0)
    spo.after_update(_ctx(logprob=-1.0), first)
    moved = _ctx()
    moved.logprobs = lambda model, batch: torch.where(batch.targets[:, :-1] == 9, -2.0, -1.0)
    second = spo.after_update(moved, _rollout(prompt, [[8]], [1.0]))
    assert second["kl_drift/mean"] == pytest.approx(0.0 if drift_tokens == "model" else 0.5)
    assert second["rho/mean"] == pytest.approx(rho)


def test_spo_chain_seeds_continuations_by_sequence_and_has_no_post_update_state():
    """Continuations of the n responses to one prompt must differ: response j of prompt i is seeded
    by position i * n + j of step_seed(seed + 31, step, .) = (31 * 1_000_003 + 1 * 10_007 + pos) at
    seed 0, step 0, whatever order the rank holds its sequences in."""
    from megatron_spo.training.algorithms.segment_chain import SegmentChainConfig
    from megatron_spo.training.algorithms.spo_chain import SPOChain

    chain = SPOChain(SegmentChainConfig(), rollout=RolloutConfig(n=2),
                     batch=BatchConfig(train_batch_size=2, mini_batch_size=2))
    base = 31 * 1_000_003 + 10_007
    rollout = _rollout(PROMPTS, [[7], [8], [9], [7]], [1.0, 0.0, 0.0, 1.0], index=[1, 0, 1, 0])
    assert chain.sequence_seeds(_ctx(), rollout, batch_size=2) == [base + 2, base + 0, base + 3, base + 1]
    assert chain.keeps_engine_after_generation and chain.loss_temperature == SegmentChainConfig().temperature
    assert chain.after_update(_ctx(), rollout) == {} and chain.state_dict() == {}
