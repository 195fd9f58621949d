"""The asynchronous rollout source alone (`training.async_rollout`), on a scripted stream whose
sequences emit one token per decoding step: in-flight prompts are not drawn again, stale
trajectories are dropped and released, tokens carry the version that sampled them under partial
rollout (and restart otherwise), failed grades are dropped, and the importance weights of stale
tokens match hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from megatron_spo.rollout.scoring import ScoredBatch
from megatron_spo.rollout.streaming import EngineStream, StreamResult
from megatron_spo.rollout.types import Completion
from megatron_spo.training.async_rollout import AsyncRollouts, LockedScorer, behaviour_weights
from megatron_spo.training.rollout_config import RolloutConfig
from megatron_spo.training.rollouts import Prompt, Sampling

PROMPTS = [Prompt(key=10 + i, raw=f"p{i}", token_ids=[1, 2 + i], answer=str(i)) for i in range(12)]


class ScriptedStream(EngineStream):
    """Every sequence writes `length` tokens (id 7, log-prob -1), one per `step`."""

    def __init__(self, max_inflight: int, length: int, delay_s: float = 0.002):
        super().__init__(max_inflight)
        self.length, self.delay_s = length, delay_s
        self.active: list[list] = []  # [request, tokens, versions]
        self.steps = 0

    @property
    def num_inflight(self) -> int:
        return len(self.active)

    def length_of(self, trajectory) -> int:
        return self.length

    def step(self):
        while self._queue and len(self.active) < self.max_inflight:
            self.refills += bool(self.active)
            self.active.append([self._queue.popleft(), [], []])
        for seq in self.active:
            seq[1].append(7)
            seq[2].append(self.version)
        done = [s for s in self.active if len(s[1]) >= self.length_of(s[0].tag)]
        self.active = [s for s in self.active if len(s[1]) < self.length_of(s[0].tag)]
        self.steps += 1
        time.sleep(self.delay_s)
        return [StreamResult(tag=r.tag, token_versions=v, completion=Completion(
            token_ids=t, logprobs=[-1.0] * len(t), finish_reason="length", text=r.tag.prompt.answer))
            for r, t, v in done]

    def abort(self):
        out = [s[0] for s in self.active]
        self.active = []
        return out


class ScriptedEngine:
    def __init__(self, stream):
        self.stream = stream

    def open_stream(self, max_inflight):
        return self.stream


class Scorer:
    """Score 1 for every answer except those listed as failing (the grader crashed on them)."""

    def __init__(self, failing=()):
        self.failing = set(failing)

    def score(self, responses, ground_truths):
        failures = {i: "boom" for i, g in enumerate(ground_truths) if g in self.failing}
        return ScoredBatch(scores=[0.0 if i in failures else 1.0 for i in range(len(responses))],
                           predictions=[None] * len(responses), metrics={}, failure_messages=failures)


class FirstFree:
    """The draw contract of `choose_async_prompts`: the next prompts of the order not in flight."""

    def __init__(self):
        self.cursor = 0
        self.excluded_seen: list[set] = []

    def choose_async_prompts(self, order, count, *, exclude):
        self.excluded_seen.append(set(exclude))
        out = []
        while len(out) < count:
            p = PROMPTS[self.cursor % len(PROMPTS)]
            self.cursor += 1
            if p.key not in exclude and p not in out:
                out.append(p)
        return out


def _source(stream, *, staleness=0, partial=False, per_rank=2, failing=(), n=1):
    config = RolloutConfig(mode="async", max_staleness=staleness, partial_rollout=partial,
                           max_inflight=stream.max_inflight)
    return AsyncRollouts(ScriptedEngine(stream), tokenizer=None, scorer=LockedScorer(Scorer(failing)),
                         sampling=Sampling(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8), config=config,
                         seed=0, per_rank=per_rank, dp=1, dp_rank=0, n=n)


def _wait(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_in_flight_prompts_are_not_drawn_again_until_trained():
    stream = ScriptedStream(max_inflight=8, length=4)
    source, algo = _source(stream, staleness=1), FirstFree()
    try:
        source.top_up(algo, None)  # two batches outstanding: 4 prompts, none repeated
        assert source.outstanding() == 4 and len(source.inflight_keys) == 4
        taken, _ = source.take()
        assert len(taken) == 2 and {t.prompt.key for t in taken} <= source.inflight_keys
        source.advance(lambda: None)
        still_out = source.inflight_keys - {t.prompt.key for t in taken}
        source.top_up(algo, None)  # the trained two are released; the two in flight are excluded
        assert algo.excluded_seen[-1] == still_out and len(still_out) == 2
        assert len(source.inflight_keys) == 4 and still_out <= source.inflight_keys
    finally:
        source.close()


def test_stale_trajectories_are_dropped_counted_and_released():
    stream = ScriptedStream(max_inflight=8, length=2)
    source, algo = _source(stream, staleness=0), FirstFree()
    try:
        source.top_up(algo, None)
        _wait(lambda: len(source._complete) == 2)
        source.advance(lambda: None)  # version 1: both finished trajectories are now one version old
        taken, _ = source.take()
        assert taken == [] and source.counts["dropped_stale"] == 2
        source.top_up(algo, None)  # both prompts were released: nothing is excluded
        assert algo.excluded_seen[-1] == set() and source.inflight_keys == {12, 13}
    finally:
        source.close()


def test_partial_rollout_records_each_tokens_version():
    stream = ScriptedStream(max_inflight=8, length=40)
    source = _source(stream, staleness=1, partial=True)
    try:
        source.top_up(FirstFree(), None)
        _wait(lambda: stream.steps >= 3)
        source.advance(lambda: None)  # between two decoding steps: later tokens are version 1
        taken, _ = source.take()
        assert len(taken) == 2
        for t in taken:
            assert t.version == 0 and t.versions[0] == 0 and t.versions[-1] == 1
            assert t.versions == sorted(t.versions) and len(t.versions) == 40
        assert source.counts["restarted"] == 0
    finally:
        source.close()


def test_without_partial_rollout_in_flight_sequences_restart_under_the_new_version():
    stream = ScriptedStream(max_inflight=8, length=40)
    source = _source(stream, staleness=1, partial=False)
    try:
        source.top_up(FirstFree(), None)
        _wait(lambda: stream.steps >= 3)
        source.advance(lambda: None)
        taken, _ = source.take()
        assert source.counts["restarted"] == 4  # every outstanding sequence was in flight
        assert all(set(t.versions) == {1} and t.restarts == 1 and len(t.response) == 40 for t in taken)
    finally:
        source.close()


def test_slots_are_refilled_and_trajectories_keep_their_draw_seed():
    stream = ScriptedStream(max_inflight=1, length=2)
    source = _source(stream, per_rank=3)
    try:
        source.top_up(FirstFree(), None)
        taken, _ = source.take()
        assert [t.position for t in taken] == [0, 1, 2] and stream.refills == 0  # one slot: no mid-batch admission
        from megatron_spo.training.rollouts import step_seed

        assert [t.seed for t in taken] == [step_seed(0, 0, i) for i in range(3)]
    finally:
        source.close()


def test_a_failed_grade_is_dropped_counted_and_its_prompt_released():
    stream = ScriptedStream(max_inflight=8, length=2)
    source = _source(stream, per_rank=3, failing={"1"})  # PROMPTS[1]'s grader crashes
    try:
        source.top_up(FirstFree(), None)
        taken, _ = source.take()  # nothing else outstanding: the step trains the two graded ones
        assert [t.prompt.key for t in taken] == [10, 12] and source.counts["dropped_grader"] == 1
        source._share_released()
        assert source.inflight_keys == set()
    finally:
        source.close()


def test_a_driver_error_reaches_the_trainer():
    class Broken(ScriptedStream):
        def step(self):
            raise MemoryError("out of memory in the engine")

    source = _source(Broken(max_inflight=2, length=2))
    try:
        source.top_up(FirstFree(), None)
        with pytest.raises(RuntimeError, match="out of memory"):
            source.take()
    finally:
        source.close()


def test_rollout_of_deals_positions_to_ranks_in_turn():
    source = _source(ScriptedStream(max_inflight=2, length=1))
    try:
        from megatron_spo.training.async_rollout import Trajectory

        taken = [Trajectory(prompt=PROMPTS[i], batch=0, position=i, seed=0, response=[7], logprobs=[-1.0],
                            versions=[0], mask=[1], reward=1.0) for i in range(2)]
        rollout, prompts = source.rollout_of(taken, {p.key: p for p in PROMPTS})
        assert rollout.prompt_index == [0, 1] and [p.key for p in prompts] == [10, 11]
    finally:
        source.close()


def test_behaviour_weights_by_hand():
    old = torch.tensor([[-1.0, -1.0, -2.0]])
    behaviour = torch.tensor([[-2.0, -1.5, -1.0]])
    stale = torch.tensor([[True, True, False]])
    # stale tokens: exp(-1 - -2) = e = 2.71828, exp(0.5) = 1.64872; the fresh token weighs 1
    assert behaviour_weights(old, behaviour, stale, "decoupled", 2.0)[0].tolist() == pytest.approx(
        [math.e, math.exp(0.5), 1.0])
    assert behaviour_weights(old, behaviour, stale, "tis", 2.0)[0].tolist() == pytest.approx([2.0, math.exp(0.5), 1.0])
    assert behaviour_weights(old, behaviour, stale, "none", 2.0).tolist() == [[1.0, 1.0, 1.0]]


def test_spo_async_draw_skips_prompts_in_flight_and_equals_the_sync_draw_otherwise():
    from megatron_spo.training.algorithms.spo import SPO
    from megatron_spo.training.config import BatchConfig, SPOConfig
    from megatron_spo.training.data import PromptOrder
    from megatron_spo.value import ValueStore

    def spo():
        config = SPOConfig(gen_batch_size=8)
        store = ValueStore.from_keys(np.array([p.key for p in PROMPTS], dtype=np.int64), config)
        return SPO(config, store, rollout=RolloutConfig(n=1), batch=BatchConfig(train_batch_size=4, mini_batch_size=4),
                   seed=3)

    sync, streamed = spo(), spo()
    drawn = sync.choose_prompts(PromptOrder(PROMPTS, seed=1))
    assert streamed.choose_async_prompts(PromptOrder(PROMPTS, seed=1), 4, exclude=set()) == drawn
    excluded = {p.key for p in PromptOrder(PROMPTS, seed=1).take(8)[:6]}  # 6 of the first pool in flight
    for _ in range(5):
        chosen = spo().choose_async_prompts(PromptOrder(PROMPTS, seed=1), 4, exclude=excluded)
        assert len(chosen) == 2 and not {p.key for p in chosen} & excluded  # 2 of the pool of 8 are free


def test_async_mode_refuses_what_it_does_not_support(tmp_path):
    from megatron_spo.config import from_dict
    from megatron_spo.errors import UserError
    from megatron_spo.training.config import TrainConfig

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "answer": "1"}\n')
    base = {"model": {"hf_dir": str(tmp_path)}, "data": {"train_files": [str(tmp_path / "train.jsonl")]},
            "batch": {"train_batch_size": 4, "mini_batch_size": 4},
            "algorithm": {"spo": {"gen_batch_size": 16}}, "rollout": {"mode": "async"}}
    from_dict(TrainConfig, base)  # accepted
    from_dict(TrainConfig, {**base, "algorithm": {"name": "grpo"}, "rollout": {"mode": "async", "n": 2}})  # the group barrier
    for extra, words in [({"algorithm": {"name": "spo_chain"}}, "does not stream"),
                         ({"parallel": {"tp": 2}}, "parallel.tp=1"),
                         ({"rollout": {"mode": "async", "offload_actor": True}}, "offload_actor=false"),
                         ({"algorithm": {"spo": {"gen_batch_size": 4}}}, "gen_batch_size")]:
        cfg = {**base, **extra}
        with pytest.raises(UserError, match=words):
            from_dict(TrainConfig, cfg)


def test_tool_trajectory_waiting_on_its_sandbox_does_not_block_the_others(tmp_path):
    """A's code runs until B has finished both its tool turns and its answer: the stream keeps
    generating (and B reaches the buffer) while A's sandbox is busy."""
    from test_agent_loop import EOS, ScriptedEngine, code
    from tiny_models import make_tiny_tokenizer

    from megatron_spo.rollout.agent_loop import AgentLoop, AgentLoopConfig
    from megatron_spo.rollout.sandbox import SandboxResult

    tokenizer = make_tiny_tokenizer(tmp_path)
    engine = ScriptedEngine(tokenizer, {"A: ": [code("slow"), "A done" + EOS],
                                        "B: ": [code("1"), code("2"), "B done" + EOS],
                                        "C: ": ["C done" + EOS]})
    prompts = [Prompt(key=i, raw=p, token_ids=tokenizer.encode(p, add_special_tokens=False), answer="42")
               for i, p in enumerate(["A: ", "B: ", "C: "])]
    source = None

    def tool_runner(code_text: str) -> SandboxResult:
        if "slow" in code_text:
            _wait(lambda: any(g.members[0].prompt.key == 1 for g in source._complete))
            return SandboxResult(stdout="slow done", stderr="", exit_code=0, timed_out=False)
        return SandboxResult(stdout="fast", stderr="", exit_code=0, timed_out=False)

    class Draw:
        def choose_async_prompts(self, order, count, *, exclude):
            return prompts[:count]

    config = RolloutConfig(mode="async", max_inflight=4)
    source = AsyncRollouts(engine, tokenizer=tokenizer,
                           scorer=LockedScorer(Scorer()), sampling=Sampling(temperature=1.0, top_p=1.0, top_k=-1,
                                                                             max_tokens=200),
                           config=config, seed=0, per_rank=3, dp=1, dp_rank=0,
                           agent=AgentLoop(engine, tokenizer, AgentLoopConfig(), tool_runner=tool_runner))
    try:
        source.top_up(Draw(), None)
        taken, _ = source.take()
        by_key = {t.prompt.key: t for t in taken}
        assert set(by_key) == {0, 1, 2}
        assert "slow done" in tokenizer.decode(by_key[0].response) and by_key[0].text.endswith("A done")
        assert tokenizer.decode(by_key[1].response).count("<interpreter>") == 2
        for t in taken:  # tool output carries no gradient; every token has a version
            assert len(t.mask) == len(t.response) == len(t.logprobs) == len(t.versions)
            assert "<interpreter>" not in t.text
    finally:
        source.close()


def test_grpo_groups_are_trained_only_once_every_member_has_finished():
    class SlowSecondMember(ScriptedStream):
        def length_of(self, trajectory):
            return 2 if trajectory.member == 0 else 30

    stream = SlowSecondMember(max_inflight=8, length=2)
    source = _source(stream, per_rank=2, n=2)
    try:
        source.top_up(FirstFree(), None)
        taken, _ = source.take()
        # two whole groups, members in order, each member seeded as sync mode's n-sample request
        assert [(t.prompt.key, t.member, len(t.response)) for t in taken] == [
            (10, 0, 2), (10, 1, 30), (11, 0, 2), (11, 1, 30)]
        assert taken[1].seed == taken[0].seed + 1
        rollout, prompts = source.rollout_of(taken, {p.key: p for p in PROMPTS})
        assert rollout.prompt_index == [0, 0, 1, 1] and [p.key for p in prompts] == [10, 11]
    finally:
        source.close()


def test_graders_that_hang_crash_or_die_in_the_real_pool_drop_their_trajectories():
    from megatron_spo.rollout.rewards import RewardConfig
    from megatron_spo.rollout.scoring import ScoringPool

    answers = ["fine", "hang", "raise", "die", "fine too"]  # the scripted stream writes the answer as the text
    prompts = [Prompt(key=50 + i, raw=a, token_ids=[1, 3 + i], answer=a) for i, a in enumerate(answers)]

    class Draw:
        def choose_async_prompts(self, order, count, *, exclude):
            return prompts[:count]

    pool = ScoringPool(RewardConfig(function="test_reward_pool:misbehaving_reward", pool="process", workers=2,
                                    timeout_s=1.5))
    stream = ScriptedStream(max_inflight=8, length=2)
    config = RolloutConfig(mode="async", max_inflight=8)
    source = AsyncRollouts(ScriptedEngine(stream), tokenizer=None, scorer=LockedScorer(pool),
                           sampling=Sampling(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8), config=config,
                           seed=0, per_rank=5, dp=1, dp_rank=0)
    try:
        source.top_up(Draw(), None)
        taken, _ = source.take()  # no hang: the pool's time limit ends the sleeping grader
        assert [t.prompt.answer for t in taken] == ["fine", "fine too"] and all(t.reward == 1.0 for t in taken)
        assert source.counts["dropped_grader"] == 3
    finally:
        source.close()
        pool.close()
