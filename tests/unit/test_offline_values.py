"""The offline-value pipeline: prompt extraction, `values merge`, `data split`, and bad input."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_spo import cli
from megatron_spo.errors import UserError
from megatron_spo.value import ValueConfig, ValueStore, prompt_keys
from megatron_spo.value.offline import extract_user_prompt, merge_offline_values

PROMPT = "Let x be a real number with x^2 = 4.\nThe user\nasks: find x > 0."  # contains "user\n"
SUFFIX = "The answer format must be: \\boxed{...}"


@pytest.mark.parametrize(
    "text",
    [
        # ChatML / Qwen with special tokens, with a system turn
        f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
        # the same decoded with skip_special_tokens=True (verl's validation dump)
        f"system\nYou are helpful.\nuser\n{PROMPT}\nassistant\n",
        f"user\n{PROMPT}\nassistant\n",
        # Qwen3 with thinking disabled appends an empty think block
        f"user\n{PROMPT}\nassistant\n<think>\n\n</think>\n\n",
        # Llama-3 with and without special tokens
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"
        f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{PROMPT}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        f"system\n\nCutting Knowledge Date: December 2023user\n\n{PROMPT}assistant\n\n",
        f"<bos><start_of_turn>user\n{PROMPT}<end_of_turn>\n<start_of_turn>model\n",
        f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{PROMPT} [/INST]",
        f"  {PROMPT}\n",  # plain text
    ],
    ids=["chatml", "chatml-decoded-system", "chatml-decoded", "qwen3-nothink", "llama3", "llama3-decoded",
         "gemma", "llama2", "plain"],
)
def test_extract_user_prompt_from_templates(text):
    assert extract_user_prompt(text) == PROMPT


def test_extract_strips_configured_suffix_only():
    text = f"<|im_start|>user\n{PROMPT}\n{SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    assert extract_user_prompt(text) == f"{PROMPT}\n{SUFFIX}"
    assert extract_user_prompt(text, strip_suffixes=[SUFFIX]) == PROMPT
    assert extract_user_prompt("plain text", template="chatml") is None


def test_extract_matches_a_real_decoded_chat_template(tmp_path):
    """verl dumps `tokenizer.decode(input_ids, skip_special_tokens=True)`; the key must survive it."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_models import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    for skip in (True, False):
        assert extract_user_prompt(tokenizer.decode(ids, skip_special_tokens=skip)) == PROMPT


def _write_runs(root: Path, runs: dict[str, list[dict | str]]) -> None:
    """Write the estimate step's layout: <root>/<run>/validation_data/0.jsonl."""
    for run, records in runs.items():
        path = root / run / "validation_data" / "0.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def _chatml(prompt: str) -> str:
    return f"system\nYou are a helpful assistant.\nuser\n{prompt}\n{SUFFIX}\nassistant\n"


def test_split_estimate_layout_merge_round_trip(tmp_path):
    prompts = [f"Problem {i}: compute {i} * {i}." for i in range(23)]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p, "answer": str(i * i)}) + "\n" for i, p in enumerate(prompts)))
    assert cli.main(["data", "split", "--dataset", str(dataset), "--output-dir", str(tmp_path / "splits"),
                     "--num-subsets", "5"]) == 0
    import pyarrow.parquet as pq

    subsets = [pq.read_table(tmp_path / "splits" / f"subset_{i}.parquet").to_pylist() for i in range(5)]
    assert [row["prompt"] for subset in subsets for row in subset] == prompts  # contiguous, order kept

    # the estimate step: 10 scored responses per prompt, one JSONL line each
    rng = np.random.default_rng(0)
    truth = {}
    runs = {}
    for i, subset in enumerate(subsets):
        records = []
        for row in subset:
            scores = rng.integers(0, 2, size=10).astype(float).tolist()
            truth[row["prompt"]] = scores
            records += [{"input": _chatml(row["prompt"]), "output": "...", "score": s, "step": 0} for s in scores]
        runs[f"offline_value_estimation_subset_{i}"] = records
    _write_runs(tmp_path / "est", runs)

    out = tmp_path / "offline_values.json"
    argv = ["values", "merge", "--input-dir", str(tmp_path / "est"), "--output-file", str(out),
            "--strip-suffix", SUFFIX, "--max-scores-per-prompt", "8", "--seed", "1"]
    assert cli.main(argv) == 0
    merged = json.loads(out.read_text())
    assert sorted(merged) == sorted(prompts)
    for prompt, scores in merged.items():
        assert len(scores) == 8
        # a subsample of this prompt's scores, in their original order
        it = iter(truth[prompt])
        assert all(any(s == t for t in it) for s in scores)
    first = out.read_text()
    assert cli.main(argv) == 0 and out.read_text() == first  # same seed, same file

    store = ValueStore.from_offline_values(out, ValueConfig(), dataset_prompts=prompts)
    assert store.num_missing == 0
    k = np.array([sum(s > 0 for s in merged[p]) for p in prompts])
    np.testing.assert_allclose(store.p_hat(prompt_keys(prompts)), (k + 0.5) / 9)


def test_merge_skips_and_counts_bad_lines(tmp_path, caplog):
    good = {"input": _chatml("Good prompt."), "score": 1.0}
    _write_runs(tmp_path, {
        "run_0": [good, "{not json", {"input": _chatml("No score.")}, {"input": _chatml("Text."), "score": "high"},
                  '{"input": "user\\nNaN prompt.\\nassistant\\n", "score": NaN}', {"score": 1.0}, good],
        "run_1": [{"input": _chatml("Good prompt."), "score": 0.0}, {"input": _chatml("Other."), "score": 0.0}],
    })
    with caplog.at_level(logging.WARNING, logger="megatron_spo.value"):
        merged, report = merge_offline_values(tmp_path, strip_suffixes=[SUFFIX])
    assert merged == {"Good prompt.": [1.0, 1.0, 0.0], "Other.": [0.0]}
    assert dict(report.skipped) == {
        "malformed JSON": 1, "record without 'score'": 1, "non-numeric score": 1,
        "NaN or infinite score": 1, "record without 'input' text": 1,
    }
    assert report.examples["malformed JSON"] == f"{tmp_path / 'run_0' / 'validation_data' / '0.jsonl'}:2"
    assert "skipped 5 of 9 lines" in caplog.text
    assert report.cross_subset_duplicates == 1
    assert "1 prompts appear in more than one file" in caplog.text
    summary = report.summary(merged)
    assert "skipped 1 lines: NaN or infinite score" in summary and "prompts: 2" in summary


def test_merge_refuses_empty_missing_or_unusable_input(tmp_path, capsys):
    out = str(tmp_path / "out.json")
    assert cli.main(["values", "merge", "--input-dir", str(tmp_path / "nope"), "--output-file", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["values", "merge", "--input-dir", str(tmp_path / "empty"), "--output-file", out]) == 2
    err = capsys.readouterr().err
    assert "no files match '*/validation_data/*.jsonl'" in err and err.count("\n") == 1  # one line, no traceback
    _write_runs(tmp_path / "bad", {"run": ["{oops", {"input": "x"}]})
    assert cli.main(["values", "merge", "--input-dir", str(tmp_path / "bad"), "--output-file", out]) == 2
    assert "no usable records" in capsys.readouterr().err
    assert not Path(out).exists()  # never a silently empty output


def test_values_estimate_dispatches_lazily(monkeypatch):
    from megatron_spo.value import values_cli

    calls = []
    fake = types.ModuleType("fake_estimate")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fake_estimate", fake)
    monkeypatch.setattr(values_cli, "_ESTIMATE_MODULE", "fake_estimate")
    assert cli.main(["values", "estimate", "--model", "m"]) == 0
    assert calls == [["--model", "m"]]
    monkeypatch.setattr(values_cli, "_ESTIMATE_MODULE", "megatron_spo.no_such_estimate")
    with pytest.raises(UserError, match="needs megatron_spo.no_such_estimate"):
        values_cli.main(["estimate"])


def test_data_split_bad_input(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert cli.main(["data", "split", "--dataset", str(data), "--output-dir", str(tmp_path / "o"), "--num-subsets", "3"]) == 2
    assert "--num-subsets must be between 1 and the 2 rows" in capsys.readouterr().err
    assert cli.main(["data", "split", "--dataset", str(tmp_path / "x.parquet"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "d.csv"
    bad.write_text("a,b\n")
    assert cli.main(["data", "split", "--dataset", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "unsupported file type '.csv'" in capsys.readouterr().err


def test_data_split_never_mixes_subsets_of_two_splits(tmp_path, capsys):
    import pyarrow.parquet as pq

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(f'{{"prompt": "a{i}"}}\n' for i in range(6)))
    second.write_text("".join(f'{{"prompt": "b{i}"}}\n' for i in range(4)))
    out = tmp_path / "splits"
    assert cli.main(["data", "split", "--dataset", str(first), "--output-dir", str(out), "--num-subsets", "3"]) == 0
    # a second split into the same directory is refused: subset_2 of the first would stay beside it
    assert cli.main(["data", "split", "--dataset", str(second), "--output-dir", str(out), "--num-subsets", "2"]) == 2
    assert "already holds 3 subset_*.parquet files" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["subset_0.parquet", "subset_1.parquet", "subset_2.parquet"]
    # --overwrite clears them all first: only the second split's subsets remain
    assert cli.main(["data", "split", "--dataset", str(second), "--output-dir", str(out), "--num-subsets", "2",
                     "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["subset_0.parquet", "subset_1.parquet"]
    rows = [r["prompt"] for i in range(2) for r in pq.read_table(out / f"subset_{i}.parquet").to_pylist()]
    assert rows == ["b0", "b1", "b2", "b3"]
