"""The shipped examples stay valid: every YAML loads strictly into TrainConfig (with the files it
names present) and fits the launch it is written for; every shell script parses; the scripts name
configs that exist; the Qwen3-8B recipe holds the authors' numbers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_spo.errors import UserError
from megatron_spo.rollout.cli_options import OLD_FLAGS
from megatron_spo.training.config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))
SCRIPTS = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".slurm"))
# ranks each example is launched with (its run script's default)
WORLD_SIZE = {"cpu": 2, "gpu_node": 8, "multinode": 32, "qwen3_8b_dapo": 8}


def _named_files(raw: dict) -> tuple[list[str], list[str]]:
    """(model directories, data / value files) a config refers to."""
    models = [raw["model"]["hf_dir"]]
    files = list(raw["data"]["train_files"]) + list(raw["data"].get("val_files", []))
    files += list(raw.get("eval", {}).get("files", []))
    offline_values = raw.get("algorithm", {}).get("spo", {}).get("offline_values")
    if offline_values:
        files.append(offline_values)
    return models, files


def _materialise(raw: dict, root: Path) -> None:
    """Empty stand-ins for what the config names (the real ones are big downloads or built by run.sh)."""
    models, files = _named_files(raw)
    for model in models:
        (root / model).mkdir(parents=True, exist_ok=True)
        (root / model / "config.json").write_text("{}")
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")


def test_there_are_examples_for_every_launch():
    assert {p.parent.name for p in CONFIGS} == set(WORLD_SIZE)
    assert {p.name for p in SCRIPTS} >= {"run.sh", "sbatch.slurm", "offline_values.sh", "eval.sh"}


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_strictly_and_fits_its_launch(config_path, tmp_path, monkeypatch):
    raw = yaml.safe_load(config_path.read_text())
    monkeypatch.chdir(tmp_path)
    # the files the config names are checked for existence: without them it must not load
    with pytest.raises(UserError, match=r"does not exist|is not a Hugging Face model directory"):
        load_train_config(str(config_path))
    _materialise(raw, tmp_path)
    config = load_train_config(str(config_path))
    dp = config.check_world_size(WORLD_SIZE[config_path.parent.name])
    assert dp >= 1
    # the loaded values are the file's (no key silently dropped): spot-check every section given
    assert config.batch.train_batch_size == raw["batch"]["train_batch_size"]
    assert config.algorithm.name == raw["algorithm"]["name"]
    assert config.parallel.tp == raw["parallel"]["tp"]


def _load_with_stand_ins(config_path: Path, tmp_path: Path, monkeypatch, overrides=()):
    monkeypatch.chdir(tmp_path)
    _materialise(yaml.safe_load(config_path.read_text()), tmp_path)
    return load_train_config(str(config_path), overrides)


def test_qwen3_8b_recipe_mirrors_the_authors(tmp_path, monkeypatch):
    spo = _load_with_stand_ins(EXAMPLES / "qwen3_8b_dapo" / "spo.yaml", tmp_path, monkeypatch)
    assert (spo.algorithm.name, spo.rollout.n) == ("spo", 1)
    assert (spo.batch.train_batch_size, spo.batch.mini_batch_size, spo.algorithm.spo.gen_batch_size) == (768, 96, 14000)
    assert spo.rollout.max_response_tokens == 16384 and spo.optimizer.lr == 1e-6
    assert spo.algorithm.spo.offline_values is not None and spo.rollout.reward.thinking
    loss = spo.algorithm.spo.loss
    assert (loss.clip_ratio_low, loss.clip_ratio_high, loss.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (spo.rollout.engine.name, spo.rollout.engine.dtype, spo.rollout.engine.enable_sleep_mode) == (
        "vllm", "bfloat16", True)
    grpo = _load_with_stand_ins(EXAMPLES / "qwen3_8b_dapo" / "grpo.yaml", tmp_path, monkeypatch)
    assert (grpo.algorithm.name, grpo.rollout.n, grpo.batch.train_batch_size) == ("grpo", 8, 96)
    # same sequences per step and optimizer steps per step as SPO
    assert grpo.batch.train_batch_size * grpo.rollout.n == spo.batch.train_batch_size * spo.rollout.n
    assert grpo.batch.train_batch_size // grpo.batch.mini_batch_size == spo.batch.train_batch_size // spo.batch.mini_batch_size
    for same in ("max_response_tokens", "temperature"):
        assert getattr(grpo.rollout, same) == getattr(spo.rollout, same)
    assert grpo.optimizer.lr == spo.optimizer.lr and grpo.data.train_files == spo.data.train_files
    assert grpo.algorithm.grpo.loss == spo.algorithm.spo.loss and grpo.rollout.engine == spo.rollout.engine
    # run.sh's tool switch is a valid override
    tool = _load_with_stand_ins(EXAMPLES / "qwen3_8b_dapo" / "spo.yaml", tmp_path, monkeypatch,
                                ["rollout.agent=tool", "run_dir=runs/x"])
    assert tool.rollout.agent == "tool" and tool.rollout.max_assistant_turns == 8


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_parses_and_names_existing_configs(script):
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    repo = EXAMPLES.parent
    for named in re.findall(r"examples/[\w/]+\.(?:yaml|sh)", text):
        assert (repo / named).is_file(), f"{script.name} names {named}, which does not exist"
    # eval / values estimate take config keys, not the flags of earlier versions
    old = set(re.findall(r"(?<![\w-])--[\w-]+", text)) & set(OLD_FLAGS)
    assert not old, f"{script.name} passes {sorted(old)}, now config keys"


def test_multinode_script_takes_the_rendezvous_from_the_environment():
    text = (EXAMPLES / "multinode" / "run.sh").read_text()
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert f'"${var}"' in text, var
    missing = subprocess.run(["bash", str(EXAMPLES / "multinode" / "run.sh")], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "set NNODES" in missing.stderr
    assert "srun" in (EXAMPLES / "multinode" / "sbatch.slurm").read_text()


def test_dockerfile_pins_a_vllm_the_gpu_extra_accepts():
    from packaging.specifiers import SpecifierSet

    repo = EXAMPLES.parent
    dockerfile = (repo / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\$\{NGC_TAG\}-py3$", dockerfile, re.M)
    assert re.search(r"^ARG NGC_TAG=\d\d\.\d\d$", dockerfile, re.M)
    pinned = re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.M).group(1)
    setup_text = (repo / "setup.py").read_text()
    gpu_vllm = re.search(r'"gpu": \["vllm([^"]*)"', setup_text).group(1)
    assert pinned in SpecifierSet(gpu_vllm), (pinned, gpu_vllm)
    assert 'pip install -e ".[gpu' in dockerfile
    ignored = (repo / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_transformer_engine_pins_sit_in_megatron_cores_declared_range():
    """megatron-core declares the Transformer Engine it supports (its `dev` extra); the Dockerfile's
    TE_VERSION and the `te` extra stay inside it, and flash-attn is not built unless asked for."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    declared = [Requirement(r) for r in md.requires("megatron-core") or []]
    te = next(r for r in declared if r.name == "transformer-engine")
    repo = EXAMPLES.parent
    dockerfile = (repo / "Dockerfile").read_text()
    pinned = re.search(r"^ARG TE_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert te.specifier.contains(pinned, prereleases=True), (pinned, str(te.specifier))
    extra = re.search(r'"te": \["transformer-engine\[pytorch\]([^"]*)"', (repo / "setup.py").read_text()).group(1)
    assert SpecifierSet(extra) == te.specifier, (extra, str(te.specifier))
    assert re.search(r"^ARG FLASH_ATTN_VERSION=$", dockerfile, re.M)
    assert '"gpu": ["vllm>=0.32,<0.33"]' in (repo / "setup.py").read_text()  # nothing that compiles


def _fake_slurm(bin_dir: Path) -> None:
    """`srun` that drops its options and runs the command; `scontrol` that lists two hosts."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node001\necho node002\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


def test_sbatch_script_launches_torchrun_with_the_node_rank_and_master(tmp_path):
    _fake_slurm(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_SUBMIT_DIR": str(EXAMPLES.parent), "SLURM_NODEID": "1", "PYTHON": "echo"}
    run = subprocess.run(["bash", str(EXAMPLES / "multinode" / "sbatch.slurm"), "total_steps=3"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
        "--master_addr", "node001", "--master_port", "29500",
        "-m", "megatron_spo", "train", "--config", "examples/multinode/spo.yaml", "total_steps=3",
    ]  # fmt: skip


def test_recipe_script_switches_algorithm_and_agent():
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "ALGO": "grpo", "AGENT": "tool"}
    run = subprocess.run(["bash", str(EXAMPLES / "qwen3_8b_dapo" / "run.sh"), "total_steps=2"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    assert words[words.index("--config") + 1] == "examples/qwen3_8b_dapo/grpo.yaml"
    assert words[-3:] == ["rollout.agent=tool", "run_dir=runs/qwen3_8b_dapo/grpo_tool", "total_steps=2"]
    bad = subprocess.run(["bash", str(EXAMPLES / "qwen3_8b_dapo" / "run.sh")], capture_output=True, text=True,
                         env={**env, "ALGO": "ppo"})
    assert bad.returncode == 2 and "ALGO must be spo or grpo" in bad.stderr


def _readme_train_commands() -> list[list[str]]:
    """`megatron-spo train --config ...` commands of the README (continuation lines joined); the
    GPU dry-run commands are for 8+ simulated GPUs and are run by tests/dry_run instead."""
    import shlex

    text = (EXAMPLES.parent / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.strip())[2:] for line in text.splitlines()
            if line.strip().startswith("megatron-spo train --config") and "--dry-run" not in line]


def test_readme_algorithm_commands_load_and_fit_two_ranks(tmp_path, monkeypatch):
    commands = _readme_train_commands()
    names = set()
    for argv in commands:
        assert argv[0] == "--config"
        config = _load_with_stand_ins(EXAMPLES.parent / argv[1], tmp_path, monkeypatch, argv[2:])
        config.check_world_size(2)
        names.add(config.algorithm.name)
    assert {"spo_chain", "spo_tree", "soft_spo"} <= names
