"""`megatron-spo train` stops with one line (exit 2) where it cannot make a batch, instead of
spinning: every training prompt longer than `data.prompt.max_prompt_tokens`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert "all 24 prompts" in last and "data.prompt.max_prompt_tokens=2" in last, last


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_exit_130(tmp_path):
    import signal
    import time

    from megatron_spo.training.checkpointing import complete_checkpoints

    run = tmp_path / "run"
    config = {**tiny_train_setup(tmp_path), "run_dir": str(run), "total_steps": 200, "checkpoint": {"every_steps": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_spo", "train", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not complete_checkpoints(run / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert complete_checkpoints(run / "checkpoints"), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-spo train: interrupted during step "), last
    assert "the last complete checkpoint is" in last and "step_" in last, last


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exception itself
def test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_run():
    """Python drops an exception raised inside `__del__` ("Exception ignored in"): a SIGINT that
    lands there would be lost. `train` remembers it and stops at the end of the step."""
    import signal
    import time

    from megatron_spo.training.train_cli import _CtrlC

    ctrl_c = _CtrlC()
    try:
        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the handler runs in here; its KeyboardInterrupt is dropped

        Finalized()
        assert ctrl_c.seen
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check(1, {})
    finally:
        ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_run_on_a_locked_run_dir_gets_one_line_naming_the_holder(tmp_path):
    from megatron_spo.training.run_lock import RunDirLock

    run = tmp_path / "run"
    holder = RunDirLock(run)  # this test process plays the first run
    assert holder.acquire() is None
    assert RunDirLock(run).acquire().startswith(f"pid {os.getpid()} on ")  # a second taker sees who
    config = {**tiny_train_setup(tmp_path), "run_dir": str(run), "total_steps": 1}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "megatron_spo", "train", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"run_dir {run} is in use by another run (pid {os.getpid()} on " in last, last
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # it touched nothing
    holder.release()
    again = RunDirLock(run)
    assert again.acquire() is None  # released: the next run takes it
    again.release()
