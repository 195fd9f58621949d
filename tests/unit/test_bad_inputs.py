"""Every command against one shared set of broken inputs: a user mistake is exit status 2 and one
line of ours on stderr that names the file, key or value at fault, with no traceback and nothing
written. The commands run in-process through `megatron_spo.cli.main`, which returns the exit
status and prints the error line exactly as `python -m megatron_spo` does; every case is refused
before a model is loaded (the tiny model only makes the model paths valid).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Broken (and a few good) inputs, shared by every case."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {"root": root, "model": make_tiny_model(root / "model")}

    def write(name: str, content: str | bytes) -> Path:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = path
        return path

    write("good.jsonl", '{"prompt": "1+1", "answer": "2", "response": "2"}\n')
    write("not_utf8.jsonl", b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "\xff\xfe", "answer": "2"}\n')
    write("corrupt.parquet", b"PAR1 not a parquet file PAR1")
    write("binary.yaml", bytes(range(256)))
    write("empty.jsonl", "")
    write("null_prompt.jsonl", '{"prompt": null, "answer": "2"}\n')
    write("empty_prompt.jsonl", '{"prompt": "1+1", "answer": "2"}\n{"prompt": "  ", "answer": "4"}\n')
    write("empty_answer.jsonl", '{"prompt": "1+1", "answer": ""}\n')
    write("duplicate.jsonl", "".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                     for p, a in (("1+1", "2"), ("2+2", "4"), ("1+1", "3"))))
    write("a_file", "not a directory")
    (root / "a_dir").mkdir()
    paths["a_dir"] = root / "a_dir"
    (root / "read_only").mkdir()
    paths["read_only"] = root / "read_only"
    estimated = root / "estimated"
    (estimated / "validation_data").mkdir(parents=True)
    (estimated / "validation_data" / "0.jsonl").write_text("{}\n")
    paths["estimated"] = estimated
    subsets = root / "subsets"
    subsets.mkdir()
    (subsets / "subset_7.parquet").write_bytes(b"an earlier split")
    paths["subsets"] = subsets
    run = root / "bad_run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "reward/mean": 0.5}\n\xff\xfe\n{"step": 2}\n')
    paths["bad_run"] = run
    return paths


# (case id, argv with {name} placeholders for the inputs, text the error line must hold)
CASES = [
    # command-line mistakes argparse catches: one line too, not its usage block
    ("train unknown flag", ["train", "--bogus"], ["unrecognized arguments: --bogus", "megatron-spo train --help"]),
    ("convert bad int", ["convert", "hf-to-mcore", "--hf-dir", "{model}", "--out", "{root}/mcore", "--tp", "zero"],
     ["--tp: invalid int value: 'zero'", "megatron-spo convert hf-to-mcore --help"]),
    ("demo unknown flag", ["demo", "--what"], ["unrecognized arguments: --what"]),
    # files that are not what their name says
    ("train binary yaml", ["train", "--config", "{binary.yaml}"], ["binary.yaml", "not UTF-8"]),
    ("sft binary yaml", ["sft", "--config", "{binary.yaml}"], ["binary.yaml", "not UTF-8"]),
    ("eval binary yaml", ["eval", "--config", "{binary.yaml}"], ["binary.yaml", "not UTF-8"]),
    ("train non-utf8 data", ["train", "model.hf_dir={model}", "data.train_files=[{not_utf8.jsonl}]",
                             "run_dir={root}/run", "data.answer_key=answer"], ["not_utf8.jsonl:2", "not UTF-8"]),
    ("eval non-utf8 data", ["eval", "--model", "{model}", "--data", "{not_utf8.jsonl}"],
     ["not_utf8.jsonl:2", "not UTF-8"]),
    ("estimate non-utf8 data", ["values", "estimate", "--model", "{model}", "--data", "{not_utf8.jsonl}",
                                "--output-dir", "{root}/estimate"], ["not_utf8.jsonl:2", "not UTF-8"]),
    ("sft non-utf8 data", ["sft", "--model", "{model}", "--data", "{not_utf8.jsonl}", "--out", "{root}/sft"],
     ["not_utf8.jsonl:2", "not UTF-8"]),
    ("split non-utf8 data", ["data", "split", "--dataset", "{not_utf8.jsonl}", "--output-dir", "{root}/split"],
     ["not_utf8.jsonl:2", "not UTF-8"]),
    ("eval corrupt parquet", ["eval", "--model", "{model}", "--data", "{corrupt.parquet}"],
     ["corrupt.parquet", "not a readable parquet file"]),
    ("estimate corrupt parquet", ["values", "estimate", "--model", "{model}", "--data", "{corrupt.parquet}",
                                  "--output-dir", "{root}/estimate"], ["corrupt.parquet", "parquet"]),
    ("sft corrupt parquet", ["sft", "--model", "{model}", "--data", "{corrupt.parquet}", "--out", "{root}/sft"],
     ["corrupt.parquet", "parquet"]),
    ("split corrupt parquet", ["data", "split", "--dataset", "{corrupt.parquet}", "--output-dir", "{root}/split"],
     ["corrupt.parquet", "not a readable parquet file"]),
    ("split empty file", ["data", "split", "--dataset", "{empty.jsonl}", "--output-dir", "{root}/split"],
     ["empty.jsonl is empty"]),
    ("plot non-utf8 metrics", ["plot", "{bad_run}", "--out", "{root}/plots"], ["bad_run/metrics.jsonl", "not UTF-8"]),
    # records a run cannot use
    ("train null prompt", ["train", "model.hf_dir={model}", "data.train_files=[{null_prompt.jsonl}]",
                           "run_dir={root}/run", "data.answer_key=answer"],
     ["null_prompt.jsonl: record 0 has 'prompt' but it is null"]),
    ("eval null prompt", ["eval", "--model", "{model}", "--data", "{null_prompt.jsonl}"],
     ["null_prompt.jsonl: record 0 has 'prompt' but it is null"]),
    ("train empty prompt", ["train", "model.hf_dir={model}", "data.train_files=[{empty_prompt.jsonl}]",
                            "run_dir={root}/run", "data.answer_key=answer"],
     ["empty_prompt.jsonl: record 1 has an empty 'prompt'"]),
    ("estimate empty answer", ["values", "estimate", "--model", "{model}", "--data", "{empty_answer.jsonl}",
                               "--output-dir", "{root}/estimate"], ["empty_answer.jsonl: record 0 has an empty 'answer'"]),
    ("train empty answer", ["train", "model.hf_dir={model}", "data.train_files=[{empty_answer.jsonl}]",
                            "run_dir={root}/run", "data.answer_key=answer"],
     ["empty_answer.jsonl: record 0 has an empty 'answer'"]),
    ("train duplicate prompt", ["train", "model.hf_dir={model}", "data.train_files=[{duplicate.jsonl}]",
                                "run_dir={root}/run", "data.answer_key=answer"],
     ["duplicate.jsonl: record 2 repeats the prompt of record 0", "'1+1'", "another answer ('3', not '2')"]),
    ("train duplicate across files", ["train", "model.hf_dir={model}", "run_dir={root}/run", "data.answer_key=answer",
                                      "data.train_files=[{good.jsonl}, {duplicate.jsonl}]"],
     ["duplicate.jsonl: record 2 repeats the prompt of record 0 of", "good.jsonl"]),
    # values out of range
    ("train tp 0", ["train", "model.hf_dir={model}", "data.train_files=[{good.jsonl}]", "run_dir={root}/run",
                    "parallel.tp=0"], ["parallel", "tp=0"]),
    ("sft tp 0 after a flag", ["sft", "--model", "{model}", "tp=0", "--data", "{good.jsonl}", "--out", "{root}/sft"],
     ["tp must be >= 1, got 0"]),
    ("convert --tp 0", ["convert", "hf-to-mcore", "--hf-dir", "{model}", "--out", "{root}/mcore", "--tp", "0"],
     ["--tp must be >= 1, got 0"]),
    ("convert --hf-dir a file", ["convert", "hf-to-mcore", "--hf-dir", "{a_file}", "--out", "{root}/mcore"],
     ["a_file is a file, not a directory"]),
    ("eval temperature", ["eval", "--model", "{model}", "--data", "{good.jsonl}", "temperature=-1"],
     ["temperature must be >= 0, got -1"]),
    ("eval top_p", ["eval", "--model", "{model}", "--data", "{good.jsonl}", "top_p=1.5"], ["top_p", "1.5"]),
    ("estimate top_k", ["values", "estimate", "--model", "{model}", "--data", "{good.jsonl}",
                        "--output-dir", "{root}/estimate", "top_k=-5"], ["top_k", "-5"]),
    ("estimate temperature nan", ["values", "estimate", "--model", "{model}", "--data", "{good.jsonl}",
                                  "--output-dir", "{root}/estimate", "temperature=nan"], ["temperature", "nan"]),
    # output locations
    ("eval --out a directory", ["eval", "--model", "{model}", "--data", "{good.jsonl}", "--out", "{a_dir}"],
     ["a_dir is a directory"]),
    ("eval --out under a file", ["eval", "--model", "{model}", "--data", "{good.jsonl}", "--out", "{a_file}/r.json"],
     ["a_file is a file, not a directory"]),
    ("estimate --output-dir a file", ["values", "estimate", "--model", "{model}", "--data", "{good.jsonl}",
                                      "--output-dir", "{a_file}"], ["a_file is a file"]),
    ("estimate over earlier results", ["values", "estimate", "--model", "{model}", "--data", "{good.jsonl}",
                                       "--output-dir", "{estimated}"], ["estimated already holds", "overwrite=true"]),
    ("split over other subsets", ["data", "split", "--dataset", "{good.jsonl}", "--output-dir", "{subsets}",
                                  "--num-subsets", "1"], ["subsets already holds 1 subset_*.parquet", "--overwrite"]),
    ("split --output-dir a file", ["data", "split", "--dataset", "{good.jsonl}", "--output-dir", "{a_file}"],
     ["a_file is a file"]),
    ("sft --out a file", ["sft", "--model", "{model}", "--data", "{good.jsonl}", "--out", "{a_file}",
                          "overwrite=true"], ["a_file is a file"]),
    ("merge --output-file a directory", ["values", "merge", "--input-dir", "{estimated}", "--output-file", "{a_dir}"],
     ["a_dir is a directory"]),
    ("demo --out a file", ["demo", "--out", "{a_file}"], ["--out", "a_file is a file"]),
    ("train run_dir a file", ["train", "model.hf_dir={model}", "data.train_files=[{good.jsonl}]",
                              "run_dir={a_file}"], ["run_dir", "a_file is a file"]),
] + [
    # every output location, read-only
    (f"{verb} read-only output", argv, ["read_only", "is not writable"])
    for verb, argv in (
        ("train", ["train", "model.hf_dir={model}", "data.train_files=[{good.jsonl}]", "run_dir={read_only}/run",
                   "data.answer_key=answer"]),
        ("sft", ["sft", "--model", "{model}", "--data", "{good.jsonl}", "--out", "{read_only}/sft"]),
        ("eval", ["eval", "--model", "{model}", "--data", "{good.jsonl}", "--out", "{read_only}/eval.json"]),
        ("estimate", ["values", "estimate", "--model", "{model}", "--data", "{good.jsonl}",
                      "--output-dir", "{read_only}/estimate"]),
        ("merge", ["values", "merge", "--input-dir", "{estimated}", "--output-file", "{read_only}/values.json"]),
        ("split", ["data", "split", "--dataset", "{good.jsonl}", "--output-dir", "{read_only}/split"]),
        ("convert", ["convert", "hf-to-mcore", "--hf-dir", "{model}", "--out", "{read_only}/mcore"]),
        ("plot", ["plot", "{estimated}", "--out", "{read_only}/plots"]),
        ("demo", ["demo", "--out", "{read_only}/demo"]),
    )
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(inputs, case, argv, expected, capsys, monkeypatch):
    from megatron_spo.cli import main

    argv = [re.sub(r"\{([\w.]+)\}", lambda m: str(inputs[m.group(1)]), arg) for arg in argv]
    if "read-only" in case:
        # a read-only directory, also for root (whom permission bits do not stop): the access check says so
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == inputs["read_only"]
                            else real_access(path, mode, **kw))
    # `values` and `eval` call logging.basicConfig, binding a handler to this test's stderr; give
    # each case a fresh root logger so no case writes to an earlier case's closed stream
    monkeypatch.setattr(logging.root, "handlers", [])
    before = _tree(inputs["root"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"megatron-spo {argv[0]}: error: ") and "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    assert _tree(inputs["root"]) == before  # no output, not even an empty directory


def test_a_repeated_prompt_with_the_same_answer_is_dropped_and_counted(inputs, tmp_path, capsys):
    from megatron_spo.rollout.records import load_prompt_records
    from megatron_spo.training import train_cli
    from megatron_spo.training.config import load_train_config

    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                                for p, a in (("1+1", "2"), ("2+2", "4"), ("1+1", "2"), ("2+2", " 4"))))
    records, dropped = load_prompt_records([str(inputs["good.jsonl"]), str(repeated)], "prompt", "answer")
    assert [r["prompt"] for r in records] == ["1+1", "2+2"] and dropped == 3
    config = load_train_config(None, [f"model.hf_dir={inputs['model']}", f"data.train_files=[{repeated}]",
                                      f"run_dir={tmp_path / 'run'}", "data.answer_key=answer"])
    capsys.readouterr()
    train_cli._check_inputs(config)  # what `train` runs before building anything
    assert "data: 2 of 4 records repeat an earlier prompt with the same answer and are dropped" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
