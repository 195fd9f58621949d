"""`values estimate --engine vllm`: the seeds' layout written from the vLLM engine, single process.
(Under torchrun, 2 ranks at rollout TP=1 per rank and at TP=2 were run by hand on a 6-prompt file
and wrote byte-identical files; not in CI.) Skipped where vLLM is not installed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from megatron_spo import cli  # noqa: E402
from test_estimate import N, data_file, estimate_argv, model_dir, read_jsonl  # noqa: E402,F401 (fixtures)


def test_estimate_with_the_vllm_engine(tmp_path, data_file, model_dir):  # noqa: F811
    out = tmp_path / "vllm"
    assert cli.main(estimate_argv(data_file, model_dir, out, "--engine", "vllm")) == 0
    records = read_jsonl(out / "validation_data" / "0.jsonl")
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(i, j) for i in (0, 1, 3) for j in range(N)]
    assert all(r["finish_reason"] in ("stop", "length") and r["output"] for r in records)
    # the n samples of a prompt differ (seed + i * n + j per response)
    assert len({r["output"] for r in records[:N]}) == N
    summary = json.loads((out / "estimate_summary.json").read_text())
    assert (summary["engine"], summary["prompts_skipped_overlong"], summary["responses"]) == ("vllm", 1, 3 * N)
