"""bench/vs_trl.py reads megatron-spo's per-step numbers from metrics.jsonl correctly."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "vs_trl.py"
_spec = importlib.util.spec_from_file_location("bench_vs_trl", _PATH)
vs_trl = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = vs_trl  # dataclasses look their module up while the file executes
_spec.loader.exec_module(vs_trl)


def _row(step, time, generated, step_s):
    return {"step": step, "time": time, "rollout/generated_tokens": generated, "rollout/train_sequences": 128.0,
            "rollout/response_length": generated / 128, "reward/mean": 0.5, "perf/weight_sync_s": 0.01,
            "perf/gen_tokens_per_s": generated / (step_s / 2), "perf/step_s": step_s, "perf/train_tokens_per_s": 1e4}


def test_read_ours_excludes_warmup_and_times_from_the_last_warmup_step(tmp_path):
    rows = [_row(1, 100.0, 9999, 9.0), _row(2, 101.0, 9999, 1.0),   # warm-up: slow first step, odd sizes
            _row(3, 103.0, 4000, 2.0), _row(4, 105.0, 4000, 2.0), _row(5, 109.0, 4200, 4.0),
            {"step": 5, "time": 110.0, "final/x": 1.0}]                # the trainer's end-of-run record
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    run = vs_trl.read_ours(path, warmup=2, dp=1)
    assert run["steps"] == 3
    assert run["wall_s"] == pytest.approx(8.0)            # 101 -> 109: the end of step 2 to the end of step 5
    assert run["median_step_s"] == pytest.approx(2.0)     # steps of 2, 2 and 4 s
    assert run["generated_per_step"] == pytest.approx(4066.6667, rel=1e-6)
    assert run["phases"]["generate_s"] == pytest.approx((1.0 + 1.0 + 2.0) / 3)

    speed = vs_trl.summarize(run, prompt_tokens=30.0)
    assert speed["step_s"] == pytest.approx(8.0 / 3)
    assert speed["gen_tokens_per_s"] == pytest.approx(4066.6667 * 3 / 8, rel=1e-6)
    assert speed["train_tokens_per_s"] == pytest.approx((4066.6667 + 128 * 30) * 3 / 8, rel=1e-6)


def test_parse_setup():
    assert vs_trl.parse_setup("2x1") == (2, 1)
    with pytest.raises(SystemExit):
        vs_trl.parse_setup("2")


_ACC_PATH = _PATH.with_name("_vs_trl_accuracy.py")
sys.path.insert(0, str(_PATH.parent))  # as when the bench runs: its helpers (_curves) sit beside it
_acc_spec = importlib.util.spec_from_file_location("bench_vs_trl_accuracy", _ACC_PATH)
vs_trl_accuracy = importlib.util.module_from_spec(_acc_spec)
_acc_spec.loader.exec_module(vs_trl_accuracy)


def test_ours_curve_counts_step_time_only_and_time_to_takes_the_first_evaluation_at_the_target(tmp_path):
    rows = [{"step": 0, "time": 0.0, "eval/accuracy": 0.40},                      # eval.before_train: no step yet
            {"step": 1, "time": 5.0, "perf/step_s": 1.5},
            {"step": 2, "time": 30.0, "perf/step_s": 2.0, "eval/accuracy": 0.52},  # 20 s of evaluation after it
            {"step": 3, "time": 31.0, "perf/step_s": 1.0},
            {"step": 4, "time": 60.0, "perf/step_s": 2.5, "eval/accuracy": 0.50},
            {"step": 4, "time": 61.0, "final/x": 1.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    curve = vs_trl_accuracy.ours_curve(path)
    assert curve == [(pytest.approx(3.5), 0.52), (pytest.approx(7.0), 0.50)]
    assert vs_trl_accuracy.time_to(curve, 0.50) == pytest.approx(3.5)
    assert vs_trl_accuracy.time_to(curve, 0.52) == pytest.approx(3.5)   # equal counts as reached
    assert vs_trl_accuracy.time_to(curve, 0.53) is None


def test_time_to_stay_ignores_a_lucky_evaluation():
    curve = [(10.0, 0.60), (20.0, 0.55), (30.0, 0.61), (40.0, 0.62)]
    assert vs_trl_accuracy.time_to(curve, 0.60) == 10.0
    assert vs_trl_accuracy.time_to_stay(curve, 0.60) == 30.0
    assert vs_trl_accuracy.time_to_stay(curve, 0.63) is None
    assert vs_trl_accuracy.time_to_stay([(10.0, 0.7), (20.0, 0.5)], 0.6) is None   # ends below
