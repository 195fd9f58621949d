"""`megatron-spo train` stops with one line (exit 2) where it cannot make a batch, instead of
spinning: every training prompt longer than `data.prompt.max_prompt_tokens`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import tiny_train_setup

REPO = Path(__file__).resolve().parents[2]


def test_all_prompts_too_long_is_one_line_not_a_hang(tmp_path):
    config = {**tiny_train_setup(tmp_path), "run_dir": str(tmp_path / "run"), "total_steps": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "megatron_spo", "train", "--config", str(path),
                           "data.prompt.max_prompt_tokens=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert "all 24 prompts" in last and "data.prompt.max_prompt_tokens=2" in last, last
