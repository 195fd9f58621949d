"""A run directory belongs to one run.

`claim` (rank 0, under the run's lock, before anything is written) decides by
`checkpoint.resume`:

    auto       continue the run the directory holds: its first `config.yaml` must agree with
               this config in everything that changes the math (`changed_keys`); this run's
               config is recorded beside it as `config.resume-<step>.yaml`
    never      start a new run: the directory must be empty (or not exist)
    overwrite  start a new run: the directory's contents are deleted first

A directory that holds files but no `config.yaml` is not a megatron-spo run and is never
continued; one whose run stopped before its first step (no checkpoint, no metrics: a wrong model
path, say) is started again with the new config. Metrics of a continued run are cut back to its
checkpoint (`MetricsLogger`), so rows of two runs never interleave.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from megatron_spo.training.run_lock import LOCK_FILE

CONFIG_FILE = "config.yaml"

HARMLESS = ("logging.", "eval.", "dry_run.", "total_steps", "total_epochs", "max_generated_tokens", "run_dir",
            "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.export_hf", "checkpoint.resume",
            "rollout.offload_actor", "rollout.engine.enable_sleep_mode", "rollout.engine.max_num_seqs",
            "rollout.engine.kv_cache_gib", "rollout.engine.gpu_memory_utilization", "rollout.reward.workers")
"""Keys a resumed run may change: how long it runs, what it logs and evaluates, how often it saves,
and engine memory settings that do not change what is sampled (tested bit-exact)."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def _harmless(key: str) -> bool:
    return any(key.startswith(h) if h.endswith(".") else key == h for h in HARMLESS)


def changed_keys(first: dict, now: dict) -> list[str]:
    """Dotted keys whose values differ between two effective configs (as YAML has them), harmless
    ones left out."""
    a, b = _flatten(first), _flatten(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _harmless(k))


def _entries(run_dir: Path, checkpoint_dir: Path) -> list[Path]:
    """What a run left: the run directory's contents (the lock aside), and the checkpoints when
    they are kept elsewhere (`checkpoint.dir`)."""
    found = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
    inside = checkpoint_dir.resolve().is_relative_to(run_dir.resolve())
    if not inside and checkpoint_dir.is_dir():
        found += sorted(checkpoint_dir.glob("step_*"))
    return found


def _never_trained(run_dir: Path, checkpoint_dir: Path) -> bool:
    """The directory's run recorded its config but no step: no complete checkpoint, no metrics."""
    from megatron_spo.training.checkpointing import complete_checkpoints
    from megatron_spo.training.metrics import METRICS_FILE

    metrics = run_dir / METRICS_FILE
    return ((run_dir / CONFIG_FILE).is_file() and not complete_checkpoints(checkpoint_dir)
            and not (metrics.is_file() and metrics.stat().st_size))


def claim(run_dir: Path, config, *, resume_step: int) -> tuple[str | None, bool]:
    """Make `run_dir` this run's (rank 0): (the problem as one line or None, whether the run
    continues the one the directory holds). `resume_step`: the step it continues from (0 when
    that run has no complete checkpoint)."""
    from megatron_spo.config import load_yaml, save_config, to_dict

    run_dir = Path(run_dir)
    entries = _entries(run_dir, Path(config.checkpoint_dir))
    mode = config.checkpoint.resume
    if entries and mode == "auto" and _never_trained(run_dir, Path(config.checkpoint_dir)):
        mode = "overwrite"  # a run that stopped before its first step (e.g. a wrong model path): start again
    if entries and mode == "overwrite":
        for path in entries:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        entries = []
    if entries and mode == "never":
        return (f"run_dir {run_dir} already holds a run ({len(entries)} entries): set checkpoint.resume=auto to "
                f"continue it, checkpoint.resume=overwrite to delete it first, or choose another run_dir"), False
    first = run_dir / CONFIG_FILE
    if entries and not first.is_file():
        return (f"run_dir {run_dir} is not empty and holds no megatron-spo run (no {CONFIG_FILE}): choose another "
                f"run_dir, or set checkpoint.resume=overwrite to delete its contents"), False
    if not entries:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, first)
        return None, False
    now = yaml.safe_load(yaml.safe_dump(to_dict(config)))  # as the file holds it (tuples are lists)
    changed = changed_keys(load_yaml(first), now)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        return (f"run_dir {run_dir} holds a run made with another config ({shown} differ from its {CONFIG_FILE}): "
                f"resume it with that config, or start a new run (another run_dir, or checkpoint.resume=overwrite)"), False
    save_config(config, run_dir / f"config.resume-{resume_step:08d}.yaml")
    return None, True
