"""`megatron-spo values estimate` end to end on a tiny model: the seeds' jsonl layout, scores from
the configured reward, over-long prompts counted, the `values merge` round trip, the same file on
2 ranks as on 1, the config read from YAML + flags + dotted overrides, and bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_spo import cli
from megatron_spo.errors import UserError
from megatron_spo.rollout import estimate
from tiny_models import make_tiny_model

N = 3
SUFFIX = "\n\nThe answer format must be: \\boxed{...}"


def parity_reward(response: str, ground_truth: str, config) -> float:
    """A reward whose value the test can recompute from the output: the response length's parity."""
    return float(len(response) % 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # qwen3: AutoTokenizer maps a qwen2 directory to Qwen2Tokenizer, whose byte-level
    # pre-tokenizer drops the tiny character vocabulary's whitespace
    return str(make_tiny_model(tmp_path_factory.mktemp("model"), "qwen3", seed=2, vocab_size=100))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = [
        {"prompt": "What is 2+3?", "reward_model": {"ground_truth": "5"}, "data_source": "toy"},
        {"prompt": [{"role": "user", "content": "What is 7*6?"}], "reward_model": {"ground_truth": "42"}},
        {"prompt": "z" * 300, "reward_model": {"ground_truth": "0"}, "data_source": "toy"},  # over-long
        {"prompt": "Name a prime.", "reward_model": {"ground_truth": "2"}, "data_source": "toy"},
    ]
    path = tmp_path_factory.mktemp("data") / "subset_0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def estimate_argv(data_file, model_dir, out_dir, *extra):
    return [
        "values", "estimate", "--data", data_file, "--model", model_dir, "--n", str(N),
        "--output-dir", str(out_dir), "max_response_tokens=12", "prompt.max_prompt_tokens=120",
        "reward.pool=inline", *extra,
    ]  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_estimate_writes_the_seed_layout_and_merge_reads_it(tmp_path, data_file, model_dir):
    out_dir = tmp_path / "offline" / "subset_0"
    assert cli.main(estimate_argv(data_file, model_dir, out_dir)) == 0
    records = read_jsonl(out_dir / "validation_data" / "0.jsonl")
    assert len(records) == 3 * N  # prompt 2 skipped
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(i, j) for i in (0, 1, 3) for j in range(N)]
    first = records[0]
    assert first["input"] == "user\nWhat is 2+3?" + SUFFIX + "\nassistant\n"  # chat template, specials dropped
    assert first["prompt"] == "What is 2+3?"
    assert first["ground_truth"] == "5" and first["data_source"] == "toy"
    assert records[N]["data_source"] == "subset_0"  # no field: the file's stem
    assert all(r["score"] == 0.0 for r in records)  # a random model boxes nothing
    assert all(r["finish_reason"] in ("stop", "length") for r in records)
    summary = json.loads((out_dir / "estimate_summary.json").read_text())
    assert summary["prompts_skipped_overlong"] == 1 and summary["skipped_indices"] == [2]
    assert summary["responses"] == 3 * N

    merged_file = tmp_path / "offline_values.json"
    assert cli.main([
        "values", "merge", "--input-dir", str(tmp_path / "offline"), "--output-file", str(merged_file),
        "--pattern", "*/validation_data/0.jsonl", "--strip-suffix", SUFFIX.strip(),
    ]) == 0  # fmt: skip
    merged = json.loads(merged_file.read_text())
    assert merged == {"What is 2+3?": [0.0] * N, "What is 7*6?": [0.0] * N, "Name a prime.": [0.0] * N}


def test_scores_come_from_the_configured_reward(tmp_path, data_file, model_dir):
    out_dir = tmp_path / "run"
    argv = estimate_argv(data_file, model_dir, out_dir, "reward.function=test_estimate:parity_reward")
    assert cli.main(argv) == 0
    records = read_jsonl(out_dir / "validation_data" / "0.jsonl")
    assert [r["score"] for r in records] == [float(len(r["output"]) % 2) for r in records]
    assert len({r["score"] for r in records}) == 2  # both values occur: the scores are not constant


def _estimate_on_rank(rank, world_size, argv):
    from megatron_spo.rollout import estimate as estimate_module

    return estimate_module.main(argv[2:])  # drop "values estimate"


@pytest.mark.distributed
def test_two_ranks_write_the_same_file_as_one(spawn, tmp_path, data_file, model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(estimate_argv(data_file, model_dir, one)) == 0
    assert spawn(2, _estimate_on_rank, estimate_argv(data_file, model_dir, two)) == [0, 0]
    assert read_jsonl(two / "validation_data" / "0.jsonl") == read_jsonl(one / "validation_data" / "0.jsonl")
    assert json.loads((two / "estimate_summary.json").read_text())["ranks"] == 2


def test_bad_input_names_the_file(tmp_path, model_dir):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        estimate.main(["--data", str(bad_json), "--model", model_dir, "--output-dir", str(tmp_path / "o")])
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text('{"text": "a", "answer": "1"}\n')
    with pytest.raises(UserError, match=r"noprompt.jsonl: record 0 has none of the prompt fields"):
        estimate.main(["--data", str(no_prompt), "--model", model_dir, "--output-dir", str(tmp_path / "o")])
    missing_answer = tmp_path / "noanswer.jsonl"
    missing_answer.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(UserError, match=r"noanswer.jsonl: record 1 has no 'answer'"):
        estimate.main(["--data", str(missing_answer), "--model", model_dir, "--output-dir", str(tmp_path / "o")])
    assert cli.main(["values", "estimate", "--data", str(tmp_path / "nope.jsonl"), "--model", model_dir,
                     "--output-dir", str(tmp_path / "o")]) == 2  # fmt: skip
    with pytest.raises(UserError, match=r"key 'n' expects int, got 'many'"):
        estimate.main(["--data", str(bad_json), "--model", model_dir, "--output-dir", str(tmp_path / "o"), "-n", "many"])
    with pytest.raises(UserError, match=r"^--dtype is now the config key engine.dtype: write engine.dtype=VALUE"):
        estimate.main(["--data", str(bad_json), "--model", model_dir, "--dtype", "bfloat16"])
    with pytest.raises(UserError, match=r"missing required key 'output_dir'"):
        estimate.main(["--data", str(bad_json), "--model", model_dir])


def test_config_file_flags_and_overrides(tmp_path, data_file, model_dir):
    config = tmp_path / "estimate.yaml"
    config.write_text(yaml.safe_dump({
        "data": data_file, "model": model_dir, "output_dir": str(tmp_path / "from_file"), "n": 5, "seed": 3,
        "max_response_tokens": 4, "prompt": {"max_prompt_tokens": 120}, "reward": {"pool": "inline"},
        "engine": {"max_num_seqs": 2},
    }))
    out_dir = tmp_path / "from_flag"
    # --output-dir beats the file; n=2 beats both the file and -n
    assert cli.main(["values", "estimate", "--config", str(config), "--output-dir", str(out_dir), "-n", "4",
                     "n=2"]) == 0
    records = read_jsonl(out_dir / "validation_data" / "0.jsonl")
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(i, j) for i in (0, 1, 3) for j in range(2)]
    assert not (tmp_path / "from_file").exists()
    summary = json.loads((out_dir / "estimate_summary.json").read_text())
    assert (summary["responses_per_prompt"], summary["model"]) == (2, model_dir)
    # a second estimate into the same directory would replace these results: refused, unless asked
    again = ["values", "estimate", "--config", str(config), "--output-dir", str(out_dir), "n=1"]
    assert cli.main(again) == 2
    assert read_jsonl(out_dir / "validation_data" / "0.jsonl") == records
    assert cli.main([*again, "overwrite=true"]) == 0
    assert len(read_jsonl(out_dir / "validation_data" / "0.jsonl")) == 3
