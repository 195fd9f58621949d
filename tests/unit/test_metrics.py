"""MetricsLogger (jsonl / TensorBoard / W&B fallbacks), summary stats, and `megatron-spo plot`."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from megatron_spo import cli
from megatron_spo.training.metrics import (
    MetricsLogger,
    distribution_stats,
    read_metrics,
)
from megatron_spo.training.plot_cli import curves


def test_jsonl_has_one_flushed_record_per_step_with_plain_numbers(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"reward/mean": torch.tensor(0.5), "spo/rho/mean": np.float32(0.9), "bad": float("nan"), "n": 3})
    # readable before close: a crash loses nothing already logged
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 1 and records[0]["reward/mean"] == 0.5 and records[0]["n"] == 3
    assert records[0]["spo/rho/mean"] == pytest.approx(0.9) and records[0]["bad"] is None
    logger.log(2, {"reward/mean": 0.75})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": step / 10})
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as logger:
        logger.log(4, {"reward/mean": 0.44})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.44)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(1, {"x": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists() and logger.backends == []


def test_tensorboard_events_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        assert logger.backends == ["jsonl", "tensorboard"]
        logger.log(1, {"reward/mean": 0.25, "note": "text is not a scalar"})
        logger.log(2, {"reward/mean": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert scalars == [(1, 0.25), (2, 0.5)]
    assert "note" not in events.Tags()["scalars"]


def test_missing_optional_backends_are_skipped_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    notices = []
    with MetricsLogger(tmp_path, tensorboard=True, wandb=True, notice=notices.append) as logger:
        logger.log(1, {"reward/mean": 1.0})
        assert logger.backends == ["jsonl"]
    assert any("tensorboard" in n for n in notices) and any("wandb" in n for n in notices)
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["reward/mean"] == 1.0


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"step": 2, "re\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_distribution_stats_hand_values():
    stats = distribution_stats("spo/p_hat", [1.0, 2.0, 3.0, 4.0])
    assert stats["spo/p_hat/mean"] == 2.5
    assert stats["spo/p_hat/std"] == pytest.approx(math.sqrt(1.25))
    assert (stats["spo/p_hat/min"], stats["spo/p_hat/max"]) == (1.0, 4.0)
    # numpy's linear interpolation: p10 at rank 0.3, p90 at rank 2.7
    assert stats["spo/p_hat/p10"] == pytest.approx(1.3)
    assert stats["spo/p_hat/p50"] == pytest.approx(2.5)
    assert stats["spo/p_hat/p90"] == pytest.approx(3.7)
    assert distribution_stats("x", []) == {}


def _write_run(run_dir, rewards, tokens_per_step, evals):
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step, reward in enumerate(rewards, start=1):
            logger.log(step, {"reward/mean": reward, "rollout/generated_tokens": tokens_per_step})
            if step in evals:
                logger.log(step, {"eval/accuracy": evals[step]})


def test_curves_accumulate_generated_tokens(tmp_path):
    _write_run(tmp_path, [0.1, 0.2, 0.3], 100, {2: 0.4})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert curves(records, "reward/mean") == ([1, 2, 3], [100.0, 200.0, 300.0], [0.1, 0.2, 0.3])
    assert curves(records, "eval/accuracy") == ([2], [200.0], [0.4])


def test_plot_cli_writes_a_png_comparing_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path / "spo", [0.1, 0.3, 0.5, 0.6], 50, {2: 0.3, 4: 0.55})
    _write_run(tmp_path / "grpo", [0.1, 0.2, 0.35, 0.4], 400, {2: 0.2, 4: 0.45})
    code = cli.main(["plot", str(tmp_path / "spo"), str(tmp_path / "grpo"), "--out", str(tmp_path / "plots")])
    assert code == 0
    png = tmp_path / "plots" / "curves.png"
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(p.name for p in png.parent.iterdir()) == ["curves.png"]


def test_plot_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and err.count("\n") == 1
