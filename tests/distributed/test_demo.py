"""The embedded demo, shortened: every stage runs as a user runs it (sft, eval, values estimate /
merge, torchrun train, eval, plot) and the summary is written."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    from megatron_spo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert summary["engine"] == "hf" and summary["wall_seconds"] > 0
    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records if "reward/mean" in r] == list(range(1, 7))
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in records if "rollout/logprob_mismatch" in r)
    offline = json.loads((out / "offline" / "offline_values.json").read_text())
    assert len(offline) == 32 and all(len(scores) == 2 for scores in offline.values())
    assert (out / "run" / "hf" / "model.safetensors").is_file()
    assert (out / "run" / "plots" / "curves.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
