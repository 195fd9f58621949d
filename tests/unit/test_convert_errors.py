"""Bad input to `megatron-spo convert`: one clear line, a non-zero exit, and no output left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_models import make_tiny_model
from megatron_spo.cli import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hf") / "qwen3", "qwen3")


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "ckpt"
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(out)]) == 0
    return out


def _fails(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    message = [line for line in err if line.startswith("megatron-spo convert: error:")]
    assert len(message) == 1, err
    for fragment in fragments:
        assert fragment in message[0], message[0]
    return message[0]


def _no_output(path):
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))


def test_missing_directory(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(tmp_path / "nope"), "--out", str(out)],
           str(tmp_path / "nope"), "does not exist")
    _no_output(out)


def test_missing_safetensors_shard(capsys, tmp_path):
    src = make_tiny_model(tmp_path / "sharded", "llama", max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    out = tmp_path / "out"
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(out)], shards[1].name, "missing")
    _no_output(out)


def test_unsupported_architecture(capsys, tmp_path):
    src = make_tiny_model(tmp_path / "m", "qwen2")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(out)],
           "MistralForCausalLM", "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")
    _no_output(out)


def test_unsupported_option(capsys, tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                                   "original_max_position_embeddings": 64})
    out = tmp_path / "out"
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(src), "--out", str(out)], "rope_type='yarn'", "llama3")
    _no_output(out)


def test_heads_not_divisible_by_tp(capsys, hf_dir, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(out), "--tp", "3"],
           "num_attention_heads=2 is not divisible by TP=3")
    _no_output(out)


def test_truncated_checkpoint(capsys, ckpt, tmp_path):
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(ckpt, damaged)
    shard = sorted((damaged / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "out"
    _fails(capsys, ["convert", "mcore-to-hf", "--ckpt", str(damaged), "--out", str(out)], str(damaged), "corrupt or truncated")
    _no_output(out)


def test_checkpoint_without_metadata_is_incomplete(capsys, ckpt, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial)
    (partial / "megatron_spo_checkpoint.json").unlink()
    out = tmp_path / "out"
    _fails(capsys, ["convert", "mcore-to-hf", "--ckpt", str(partial), "--out", str(out)], "incomplete")
    _no_output(out)


def test_existing_output_is_not_overwritten(capsys, hf_dir, ckpt):
    before = sorted(p.name for p in ckpt.iterdir())
    _fails(capsys, ["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(ckpt)], "already exists")
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_command_line_exit_code_and_single_line(tmp_path):
    """As a user runs it: a separate process, status 2, one line on stderr naming the problem."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_spo", "convert", "mcore-to-hf", "--ckpt", str(tmp_path / "missing"),
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"megatron-spo convert: error: checkpoint {tmp_path / 'missing'} does not exist"]
    _no_output(out)
