"""Rollout placement (`rollout.placement`): which rollout group generates each prompt of a step,
which ranks run its engine, and how the results reach every rank of the replica training on it;
the config check of `rollout.engine.tensor_parallel_size`; a rollout split per prompt and put back."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron_spo.errors import UserError
from megatron_spo.rollout.placement import RolloutPlacement, exchange, replica_ranks
from megatron_spo.training.rollouts import Prompt, Rollout


def _everyone_exchanges(placement, plan_of, payload_of, monkeypatch):
    """Run `exchange` for every rank of a world in one process: the all-gather each rank sees is
    what every rank sent (every rank contributes before any reads, as in the collective)."""
    world = placement.world_size
    plans = [plan_of(rank) for rank in range(world)]
    held = [{p: payload_of(p) for p in plans[rank].results.held_by(rank)} for rank in range(world)]
    sent = [{p: held[rank][p] for p in plans[rank].results.sent_by(rank)} for rank in range(world)]
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), sent))
    return plans, [exchange(held[rank], plans[rank].results, rank) for rank in range(world)]


def test_replicas_follow_megatrons_rank_order():
    # tp fastest, then dp, then pp: world 16 at TP 4 x PP 2 is DP 2
    assert replica_ranks(16, 4, 2) == ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))
    assert replica_ranks(4, 1, 1) == ((0,), (1,), (2,), (3,))


def test_rollout_tp4_in_world16_with_actor_tp4_pp2(monkeypatch):
    """The multinode example: 4 engines of 4 ranks; each prompt generated once, by a group that
    shares ranks with the replica training on it; identical requests within a group; every rank
    of a replica ends with its DP rank's prompts d, d + 2, ..."""
    placement = RolloutPlacement.build(16, 4, tp=4, pp=2)
    assert placement.num_groups == 4
    assert [placement.group_ranks(g) for g in range(4)] == [tuple(range(4 * g, 4 * g + 4)) for g in range(4)]
    batch, dp = 16, 2
    owners = [i % dp for i in range(batch)]
    assignment = placement.assign(owners)
    for position, group in enumerate(assignment):  # generated next to (in part inside) its replica
        assert set(placement.group_ranks(group)) & set(placement.replicas[owners[position]])
    assert sorted(assignment.count(g) for g in range(4)) == [4, 4, 4, 4]  # even load

    plans, received = _everyone_exchanges(placement, lambda rank: placement.plan(owners, rank),
                                          lambda p: f"sequences of prompt {p}", monkeypatch)
    for group in range(4):
        requests = [plans[rank].generate for rank in placement.group_ranks(group)]
        assert all(r == requests[0] for r in requests) and requests[0]  # SPMD: the same prompts
    generated = sorted(p for g in range(4) for p in plans[placement.leader(g)].generate)
    assert generated == list(range(batch))  # every prompt once
    for rank in range(16):
        d = placement.replica_of(rank)
        assert list(received[rank]) == list(range(d, batch, dp))
        assert all(item == f"sequences of prompt {p}" for p, item in received[rank].items())


def test_data_parallel_only_keeps_each_ranks_own_prompts():
    """tp = pp = R = 1: rank d generates exactly the prompts it trains on and nothing moves."""
    placement = RolloutPlacement.build(4, 1, spmd=False)
    owners = [i % 4 for i in range(12)]
    for rank in range(4):
        plan = placement.plan(owners, rank)
        assert plan.generate == list(range(rank, 12, 4))
        assert not plan.results.needs_exchange and not plan.inputs.needs_exchange


def test_actor_tp2_splits_generation_between_the_two_ranks(monkeypatch):
    """World 2, actor TP 2 (one replica), an engine per rank: each rank generates half the
    prompts once (today both generated all), and both end with all of them."""
    placement = RolloutPlacement.build(2, 1, tp=2, spmd=False)
    owners = [0] * 6
    plans, received = _everyone_exchanges(placement, lambda rank: placement.plan(owners, rank), str, monkeypatch)
    assert [plans[0].generate, plans[1].generate] == [[0, 2, 4], [1, 3, 5]]
    assert plans[0].results.needs_exchange
    assert received[0] == received[1] == {p: str(p) for p in range(6)}
    # the way back (spo_chain: the replica's log-probs to the engines) goes to the same engines
    assert plans[0].inputs.wanted_by(0) == plans[0].generate


def test_group_of_a_non_spmd_engine_is_run_by_its_leader(monkeypatch):
    """The hf engine at R = 2: the leader generates for its group and sends to the other rank."""
    placement = RolloutPlacement.build(4, 2, spmd=False)
    owners = [i % 4 for i in range(8)]
    plans, received = _everyone_exchanges(placement, lambda rank: placement.plan(owners, rank), str, monkeypatch)
    assert [bool(plans[r].generate) for r in range(4)] == [True, False, True, False]
    assert plans[0].generate == [0, 1, 4, 5] and plans[2].generate == [2, 3, 6, 7]
    for rank in range(4):
        assert list(received[rank]) == [rank, rank + 4]


def test_everyone_needs_every_result(monkeypatch):
    """Evaluation and soft-SPO's Q0: split over the groups round robin, every rank gets all."""
    placement = RolloutPlacement.build(4, 2)
    plans, received = _everyone_exchanges(placement, lambda rank: placement.plan([None] * 5, rank), str, monkeypatch)
    assert plans[0].generate == plans[1].generate == [0, 2, 4] and plans[2].generate == [1, 3]
    assert all(r == {p: str(p) for p in range(5)} for r in received)


def test_standalone_rank_generates_what_it_needs():
    """The GPU dry run simulates one rank: it generates its replica's share itself."""
    placement = RolloutPlacement.build(16, 4, tp=4, pp=2, standalone=True)
    plan = placement.plan([i % 2 for i in range(8)], 5)
    assert plan.generate == [1, 3, 5, 7] and not plan.results.needs_exchange


def test_rollout_tp_must_divide_the_world():
    with pytest.raises(UserError, match=r"^rollout.engine.tensor_parallel_size \(3\) must divide the world size 16"):
        RolloutPlacement.build(16, 3)


def test_train_config_refuses_a_rollout_tp_not_dividing_the_world(tmp_path):
    from helpers import merge, tiny_train_setup

    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig

    base = tiny_train_setup(tmp_path, prompts=4)
    cfg = from_dict(TrainConfig, merge(base, {"parallel": {"tp": 4, "pp": 2},
                                              "rollout": {"engine": {"tensor_parallel_size": 4}},
                                              "batch": {"train_batch_size": 4, "mini_batch_size": 2}}))
    assert cfg.check_world_size(16) == 2  # the multinode example's layout
    cfg = from_dict(TrainConfig, merge(base, {"rollout": {"engine": {"tensor_parallel_size": 3}}}))
    with pytest.raises(UserError) as error:
        cfg.check_world_size(16)
    message = str(error.value)
    assert message.startswith("rollout.engine.tensor_parallel_size (3)") and "\n" not in message


def test_rollout_split_per_prompt_and_concatenated_back():
    rollout = Rollout(token_advantages=[], generated_tokens=9, grader_failures=1.0)
    for i, response in [(2, [5]), (0, [6, 7]), (2, [8])]:
        prompt = Prompt(key=i, raw=str(i), token_ids=[1, i], answer="")
        rollout.add(i, prompt, prompt.token_ids, response, [1] * len(response), [-0.5] * len(response), float(i))
        rollout.token_advantages.append([0.1 * i] * len(response))
    rollout.episode_rewards, rollout.episode_index = [2.0, 0.0, 2.0], [2, 0, 2]
    parts = rollout.split([0, 1, 2])
    assert [len(parts[p]) for p in (0, 1, 2)] == [1, 0, 2]
    assert (parts[0].generated_tokens, parts[1].generated_tokens, parts[2].generated_tokens) == (9, 0, 0)
    back = Rollout.concat([parts[p] for p in (0, 1, 2)])
    assert back.prompt_index == [0, 2, 2] and back.responses == [[6, 7], [5], [8]]
    assert back.token_advantages == [[0.0, 0.0], [0.2], [0.2]]
    assert sorted(back.episode_rewards) == [0.0, 2.0, 2.0] and back.episode_index == [0, 2, 2]
    assert (back.generated_tokens, back.grader_failures) == (9, 1.0)
