"""Throughput of the math grader and the code sandbox, as ratios to process start-up measured in
the same run.

Baseline: `python -c pass` (this interpreter, `-I`), the floor for anything that starts a fresh
Python process per call.

1. Graded responses per second, in this process: the exact path (normalised strings equal), and
   the math-verify path (`\\frac{2n}{2}` vs `n`: the exact and numeric paths fail, SymPy
   decides), each against the baseline start-up rate. Every call grades a new pair, because
   math-verify caches the parses of strings it has seen.
2. The same through `ScoringPool(pool="process", workers=2)`, batches of 64 (pipe round trips
   and two workers on two cores).
3. Sandbox executions per second of `print(1)`: `run_python` with namespace isolation and with
   the fallback (`isolation="none"`), against the baseline; the ratio is the cost of the sandbox
   over a bare interpreter start.

Run: `.venv/bin/python bench/rewards.py [--rounds 5]`. Each figure is the median over rounds
that time the baseline and every candidate in turn, so load from other processes hits all
alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time

from megatron_spo.rollout.rewards import RewardConfig, math_reward
from megatron_spo.rollout.sandbox import SandboxConfig, namespaces_available, run_python
from megatron_spo.rollout.scoring import ScoringPool

EXACT = ("Adding them up gives \\boxed{42}.", "42")
MATH_VERIFY = ("Adding them up gives \\boxed{\\frac{84}{2}}.", "42")


def exact_item(i: int) -> tuple[str, str]:
    return f"Adding them up gives \\boxed{{{i}}}.", str(i)


def math_verify_item(i: int) -> tuple[str, str]:
    # a fresh pair every call: math-verify caches parses of strings it has seen
    return f"Adding them up gives \\boxed{{\\frac{{{2 * i}}}{{2}}}}.", str(i)


def rate(fn, count: int) -> float:
    """Calls per second of `fn` over `count` calls."""
    started = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - started)


def python_start():
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; the median is reported")
    args = parser.parse_args(argv)

    config = RewardConfig()
    math_reward(*MATH_VERIFY, config)  # import math-verify / SymPy before timing
    assert math_reward(*EXACT, config).path == "exact"
    assert math_reward(*MATH_VERIFY, config).path == "math_verify"
    isolations = (["namespaces"] if namespaces_available() else []) + ["none"]
    pool = ScoringPool(RewardConfig(pool="process", workers=2))
    pool.score([EXACT[0]], [EXACT[1]])  # workers started and warm

    batch = 64
    counter = itertools.count(1000)

    def pool_batch(make_item, size):
        items = [make_item(next(counter)) for _ in range(size)]
        return [response for response, _ in items], [truth for _, truth in items]

    rates: dict[str, list[float]] = {}

    def record(name: str, value: float):
        rates.setdefault(name, []).append(value)

    try:
        for _ in range(args.rounds):
            record("python -c pass", rate(python_start, 10))
            record("grade, exact path (in process)",
                   rate(lambda: math_reward(*exact_item(next(counter)), config), 2000))
            record("grade, math-verify path (in process)",
                   rate(lambda: math_reward(*math_verify_item(next(counter)), config), 40))
            record("grade, exact path (process pool, 2 workers)",
                   batch * rate(lambda: pool.score(*pool_batch(exact_item, batch)), 5))
            record("grade, math-verify path (process pool, 2 workers)",
                   batch * rate(lambda: pool.score(*pool_batch(math_verify_item, batch)), 1))
            for isolation in isolations:
                sandbox = SandboxConfig(isolation=isolation)
                record(f"sandbox run_python('print(1)'), isolation={isolation}",
                       rate(lambda: run_python("print(1)", timeout_s=30, config=sandbox), 10))
    finally:
        pool.close()

    baseline = statistics.median(rates["python -c pass"])
    print(f"{'what':62s} {'per second':>12s} {'x python -c pass':>18s}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:62s} {median:12.1f} {median / baseline:17.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
