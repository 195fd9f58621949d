"""Throughput of our math grader against the authors' reward, DAPO's strict-box `compute_score`
(verl 0.9.1's `math_dapo.py`, loaded by path as in the tests), on the same responses in the
same process.

The responses are tests/reward_cases.py's seeded fuzz (boxed and unboxed answers, nested
braces, several boxes, trailing prose, `</think>`; the ground truth itself, an equivalent form
or a wrong one). Three workloads, each timed for DAPO and for us in turn:

1. the whole mix, our default config: equivalent and wrong forms that are not plain numbers go
   to math-verify (SymPy), which DAPO never runs: this is the price of accepting `\\frac{1}{2}`
   for `0.5`;
2. the responses DAPO accepts, less its documented false positives (there our grader reads a
   later box and runs math-verify on it): the box holds the ground truth string, our identical
   path, the common case for a correct response;
3. the whole mix with `reward.math_verify: false` (string and number paths only).

Run: `.venv/bin/python bench/grader_vs_dapo.py [--count 1000] [--rounds 3]`. Each round uses
fresh cases (seed = round), and the figures are medians over rounds. The ratio printed is our
responses/second over DAPO's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from megatron_spo.rollout.rewards import RewardConfig, math_reward  # noqa: E402
from reward_cases import dapo_accepts, dapo_false_positive, generate_cases, load_dapo  # noqa: E402


def rate(grade, pairs: list[tuple[str, str]], min_seconds: float = 0.5) -> tuple[float, list]:
    """Responses per second of `grade(response, ground_truth)` over `pairs` (whole passes over
    them until `min_seconds` have passed, so a fast grader is timed over more than a few ms),
    and the first pass's results."""
    started, graded, results = time.perf_counter(), 0, None
    while graded == 0 or time.perf_counter() - started < min_seconds:
        outputs = [grade(response, ground_truth) for response, ground_truth in pairs]
        results = outputs if results is None else results
        graded += len(pairs)
    return graded / (time.perf_counter() - started), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="responses per round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the median is reported")
    args = parser.parse_args(argv)

    dapo, missing = load_dapo()
    if dapo is None:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    config, string_config = RewardConfig(), RewardConfig(math_verify=False)
    math_reward("\\boxed{\\frac{84}{2}}", "42", config)  # import math-verify / SymPy before timing

    def run_dapo(response, ground_truth):
        return dapo.compute_score(response, ground_truth, strict_box_verify=True)

    def run_ours(response, ground_truth):
        return math_reward(response, ground_truth, config)

    def run_ours_strings(response, ground_truth):
        return math_reward(response, ground_truth, string_config)

    workloads = {"mix": run_ours, "box holds the ground truth": run_ours, "mix, math_verify off": run_ours_strings}
    rates: dict[tuple[str, str], list[float]] = {}
    accepted = {"dapo": 0, "ours": 0, "total": 0}
    for round_index in range(args.rounds):
        cases = generate_cases(args.count, seed=round_index)
        mix = [(case.response, case.ground_truth) for case in cases]
        dapo_accepted = [pair for pair in mix if dapo_accepts(dapo, *pair)]
        identical = [pair for pair in dapo_accepted if dapo_false_positive(dapo, *pair) is None]
        accepted["total"] += len(mix)
        accepted["dapo"] += len(dapo_accepted)
        for name, ours in workloads.items():
            pairs = identical if name == "box holds the ground truth" else mix
            rates.setdefault((name, "dapo"), []).append(rate(run_dapo, pairs)[0])
            ours_rate, results = rate(ours, pairs)
            rates.setdefault((name, "ours"), []).append(ours_rate)
            if name == "mix":
                accepted["ours"] += sum(result.score == 1 for result in results)

    print(f"{args.count} responses x {args.rounds} rounds; accepted: DAPO {accepted['dapo']}, "
          f"ours {accepted['ours']} of {accepted['total']}")
    print("| workload | DAPO responses/s | ours responses/s | ours / DAPO |")
    print("| --- | --- | --- | --- |")
    for name in workloads:
        dapo_rate = statistics.median(rates[(name, "dapo")])
        ours_rate = statistics.median(rates[(name, "ours")])
        print(f"| {name} | {dapo_rate:.0f} | {ours_rate:.0f} | {ours_rate / dapo_rate:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
