"""The scoring pool: batch scoring in worker processes (and Ray actors), per-item timeouts,
failures counted in metrics, NaN/inf refused, pluggable reward functions."""

from __future__ import annotations

import math
import os
import time

import pytest

from megatron_spo.errors import UserError
from megatron_spo.rollout.rewards import RewardConfig, RewardResult
from megatron_spo.rollout.scoring import ScoringPool

HERE = __name__  # the module path pytest imported this file under; workers import it the same way


def length_parity_reward(response: str, ground_truth: str, config: RewardConfig) -> float:
    """A user-supplied reward returning a bare float."""
    return float(len(response) % 2 == int(ground_truth))


def misbehaving_reward(response: str, ground_truth: str, config: RewardConfig):
    """Behaves according to the response text: the pool must survive every one of these."""
    if response == "raise":
        raise RuntimeError("grader bug")
    if response == "hang":
        time.sleep(60)
    if response == "nan":
        return math.nan
    if response == "inf":
        return RewardResult(score=math.inf, prediction="inf")
    if response == "die":
        os._exit(3)
    return RewardResult(score=1.0, prediction=response.upper())


def test_process_pool_scores_math_in_order():
    responses = ["\\boxed{4}", "\\boxed{5}", "no box", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"]
    truths = ["4", "4", "4", "0.5", "\\frac{1}{2}"]
    with ScoringPool(RewardConfig(pool="process", workers=2)) as pool:
        batch = pool.score(responses, truths)
    assert batch.scores == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert batch.predictions == ["4", "5", None, "\\frac{1}{2}", "0.5"]
    assert batch.metrics["reward/mean"] == pytest.approx(0.6)
    assert batch.metrics["reward/failures_error"] == 0


def test_failures_score_zero_and_are_counted():
    config = RewardConfig(function=f"{HERE}:misbehaving_reward", pool="process", workers=2, timeout_s=1.5)
    responses = ["ok", "raise", "hang", "nan", "inf", "die", "fine"]
    started = time.monotonic()
    with ScoringPool(config) as pool:
        batch = pool.score(responses, ["0"] * len(responses))
        # the pool replaced its killed workers and keeps working
        again = pool.score(["after"], ["0"])
    assert time.monotonic() - started < 30  # the hang was cut at the timeout, not waited out
    assert batch.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], batch.failure_messages
    assert batch.predictions == ["OK", None, None, None, None, None, "FINE"]
    assert batch.metrics["reward/failures_error"] == 2  # raise, die
    assert batch.metrics["reward/failures_timeout"] == 1  # hang
    assert batch.metrics["reward/failures_nonfinite"] == 2  # nan, inf
    assert all(math.isfinite(s) for s in batch.scores)
    assert again.scores == [1.0]


def test_pluggable_function_returning_a_float_inline():
    pool = ScoringPool(RewardConfig(function=f"{HERE}:length_parity_reward", pool="inline"))
    batch = pool.score(["ab", "abc", "abcd"], ["0", "0", "1"])
    assert batch.scores == [1.0, 0.0, 0.0]
    assert batch.predictions == [None, None, None]


def test_inline_pool_counts_nonfinite_and_errors():
    pool = ScoringPool(RewardConfig(function=f"{HERE}:misbehaving_reward", pool="inline"))
    batch = pool.score(["nan", "raise", "x"], ["0", "0", "0"])
    assert batch.scores == [0.0, 0.0, 1.0]
    assert (batch.metrics["reward/failures_nonfinite"], batch.metrics["reward/failures_error"]) == (1, 1)


def test_thinking_format_failures_are_counted():
    pool = ScoringPool(RewardConfig(pool="inline", thinking=True))
    batch = pool.score(["<think>x</think>\\boxed{1}", "\\boxed{1}"], ["1", "1"])
    assert batch.scores == [1.0, 0.0]
    assert batch.metrics["reward/format_failures"] == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(function="no_colon_here"), "reward.function"),
        (dict(function="megatron_spo.no_such_module:f"), "cannot import module"),
        (dict(function="megatron_spo.rollout.rewards:no_such_function"), "no callable"),
        (dict(pool="threads"), "reward.pool"),
        (dict(workers=0), "reward.workers"),
        (dict(timeout_s=0), "reward.timeout_s"),
    ],
)
def test_bad_reward_config_is_a_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        ScoringPool(RewardConfig(**{"pool": "inline", **kwargs}))


@pytest.mark.slow
def test_ray_pool_scores_and_survives_hangs():
    ray = pytest.importorskip("ray")
    config = RewardConfig(function=f"{HERE}:misbehaving_reward", pool="ray", workers=2, timeout_s=3)
    try:
        with ScoringPool(config) as pool:
            batch = pool.score(["ok", "raise", "hang", "nan", "fine"], ["0"] * 5)
        with ScoringPool(RewardConfig(pool="ray", workers=1)) as math_pool:
            math_batch = math_pool.score(["\\boxed{\\frac{2}{4}}", "\\boxed{3}"], ["0.5", "4"])
    finally:
        ray.shutdown()
    assert batch.scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (batch.metrics["reward/failures_error"], batch.metrics["reward/failures_timeout"],
            batch.metrics["reward/failures_nonfinite"]) == (1, 1, 1)
    assert math_batch.scores == [1.0, 0.0]
