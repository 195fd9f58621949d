"""`evaluate()` (training.evaluation) and `megatron-spo eval`: exact metrics from an engine with known
answers, the CLI end to end on a tiny model (table, JSON, per-group rows) reading the same YAML +
dotted overrides as `train`, the same numbers on 2 ranks as on 1, and bad input as one clear line."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import pytest
import yaml

from megatron_spo import cli
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.rollout.rewards import RewardConfig
from megatron_spo.rollout.types import Completion, GenerationResult, RolloutEngine
from megatron_spo.training import evaluation
from megatron_spo.training.eval_metrics import pass_at_k_single
from megatron_spo.training.evaluation import EvalConfig
from tiny_models import make_tiny_model, make_tiny_tokenizer

INLINE = RewardConfig(pool="inline", math_verify=False)


class CannedEngine(RolloutEngine):
    """Answers each question with fixed responses (identified by the question text in the prompt)."""

    def __init__(self, tokenizer, answers: dict[str, list[str]]):
        self.tokenizer, self.answers, self.seen = tokenizer, answers, []

    def generate(self, requests):
        results = []
        for request in requests:
            text = self.tokenizer.decode(request.prompt_token_ids)
            (question,) = [q for q in self.answers if q in text]
            self.seen.append((question, request.params.n, request.params.seed, request.params.temperature))
            responses = self.answers[question][: request.params.n]
            completions = [Completion(token_ids=[1], logprobs=[0.0], finish_reason="stop", text=r) for r in responses]
            results.append(GenerationResult(request=request, completions=completions))
        return results

    def update_weights(self, named_tensors):
        raise NotImplementedError


RECORDS = [
    {"prompt": "What is 2+3?", "answer": "5", "data_source": "s1", "difficulty": 1},
    {"prompt": "What is 6*7?", "answer": "42", "data_source": "s2", "difficulty": 2},
    {"prompt": "What is 9-2?", "answer": "7", "data_source": "s2", "difficulty": 2},
]
ANSWERS = {
    # correct: 1 1 0 1; votes 5, 5, 3, 5
    "What is 2+3?": ["so \\boxed{5}", "\\boxed{ 5 }", "\\boxed{3}", "it is \\boxed{5}."],
    # correct: 0 1 1 0; votes 41, 42, 42, none (no box)
    "What is 6*7?": ["\\boxed{41}", "\\boxed{42}", "\\boxed{42}", "42"],
    # correct: 0 0 0 0
    "What is 9-2?": ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_metrics_are_exact_for_known_answers(tokenizer):
    engine = CannedEngine(tokenizer, ANSWERS)
    result = evaluation.evaluate(engine, tokenizer, RECORDS, EvalConfig(n=4, ks=[1, 2, 4]), seed=10, reward=INLINE)
    # by hand: per prompt c = 3, 2, 0 correct of 4
    #   accuracy = 5/12; pass@1 = (3/4 + 2/4 + 0)/3 = 5/12
    #   pass@2 = (1 + (1 - C(2,2)/C(4,2)) + 0)/3 = (1 + 5/6)/3 = 11/18; pass@4 = 2/3
    #   maj@1: 5 yes, 41 no, 1 no = 1/3; maj@2: 41/42 tie -> first (41) no = 1/3; maj@4: 42 wins = 2/3
    expected = {"accuracy": Fraction(5, 12), "pass@1": Fraction(5, 12), "pass@2": Fraction(11, 18),
                "pass@4": Fraction(2, 3), "maj@1": Fraction(1, 3), "maj@2": Fraction(1, 3), "maj@4": Fraction(2, 3)}
    assert result["overall"] == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-12)
    assert result["num_prompts"] == 3 and result["samples_per_prompt"] == 4
    # s1 = prompt 0 alone; s2 = prompts 1 and 2
    assert result["by_data_source"]["s1"] == pytest.approx(
        {"num_prompts": 1, "accuracy": 0.75, "pass@1": 0.75, "pass@2": 1.0, "pass@4": 1.0,
         "maj@1": 1.0, "maj@2": 1.0, "maj@4": 1.0})
    assert result["by_data_source"]["s2"] == pytest.approx(
        {"num_prompts": 2, "accuracy": 0.25, "pass@1": 0.25, "pass@2": 5 / 12, "pass@4": 0.5,
         "maj@1": 0.0, "maj@2": 0.0, "maj@4": 0.5})
    assert list(result["by_difficulty"]) == ["1", "2"]
    assert result["by_difficulty"]["2"] == result["by_data_source"]["s2"]
    assert [p["scores"] for p in result["prompts"]] == [[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [0.0] * 4]
    assert result["prompts"][1]["predictions"] == ["41", "42", "42", None]
    # the engine got the eval sampling settings; prompt i's seed is seed + i * n
    assert [(n, seed, t) for _, n, seed, t in engine.seen] == [(4, 10, 0.6), (4, 14, 0.6), (4, 18, 0.6)]
    table = evaluation.format_table(result)
    assert "overall" in table and "data_source=s2" in table and "difficulty=1" in table and "maj@4" in table


def test_custom_keys_threshold_and_overlong_prompts(tokenizer):
    records = [{"q": {"text": r["prompt"]}, "gt": r["answer"]} for r in RECORDS]
    records.append({"q": {"text": "x" * 400}, "gt": "0"})  # longer than max_prompt_tokens: skipped
    settings = EvalConfig(n=2, prompt_key="q.text", answer_key="gt")
    short = PromptConfig(max_prompt_tokens=200)
    result = evaluation.evaluate(CannedEngine(tokenizer, ANSWERS), tokenizer, records, settings, prompt=short,
                                 reward=INLINE)
    # the first two samples: c = 2, 1, 0 -> accuracy 3/6; no group fields -> no by_ tables
    assert result["overall"]["accuracy"] == pytest.approx(0.5)
    assert result["prompts_skipped_overlong"] == 1 and result["num_prompts"] == 3
    assert not any(key.startswith("by_") for key in result)
    # a threshold above the reward's maximum: nothing is correct
    strict = dataclasses.replace(settings, correct_min_score=1.5)
    assert evaluation.evaluate(CannedEngine(tokenizer, ANSWERS), tokenizer, records, strict, prompt=short,
                               reward=INLINE)["overall"]["pass@2"] == 0.0


def test_groups_are_listed_numbers_first_by_value(tokenizer):
    records = [dict(r, difficulty=d, data_source=s) for r, d, s in zip(RECORDS, (10, 2, 2), ("b", "a", "10"))]
    result = evaluation.evaluate(CannedEngine(tokenizer, ANSWERS), tokenizer, records, EvalConfig(n=1),
                                 reward=INLINE)
    assert list(result["by_difficulty"]) == ["2", "10"]
    assert list(result["by_data_source"]) == ["10", "a", "b"]
    assert result["by_difficulty"]["10"]["accuracy"] == 1.0  # prompt 0's first sample is right


def test_evaluate_refuses_records_without_the_answer(tokenizer):
    records = [dict(RECORDS[0]), {"prompt": "What is 6*7?"}]
    with pytest.raises(UserError, match=r"record 1 has no 'answer'"):
        evaluation.evaluate(CannedEngine(tokenizer, ANSWERS), tokenizer, records, EvalConfig(n=1), reward=INLINE)
    with pytest.raises(UserError, match=r"ks \[3\]: every k must be within 1..n=2"):
        EvalConfig(n=2, ks=[3])


# ----------------------------------------------------------------------------- the CLI on a tiny model


def parity_reward(response: str, ground_truth: str, config) -> float:
    """A reward the test can recompute from the output: the response length's parity."""
    return float(len(response) % 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # llama: a qwen2 directory gets Qwen2Tokenizer, which drops the tiny vocabulary's whitespace
    return str(make_tiny_model(tmp_path_factory.mktemp("model"), "llama", seed=3, vocab_size=100))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def eval_argv(data_file, model_dir, out, *extra):
    return ["eval", "--model", model_dir, "--data", data_file, "-n", "4", "--out", str(out), "max_response_tokens=6",
            "reward.pool=inline", "reward.function=test_eval_cli:parity_reward", *extra]  # fmt: skip


def test_cli_prints_a_table_and_writes_consistent_json(tmp_path, data_file, model_dir, capsys):
    out = tmp_path / "res" / "eval.json"
    assert cli.main(eval_argv(data_file, model_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "data_source=s1" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]  # no temp file left
    assert result["engine"] == "hf" and result["ranks"] == 1 and result["sampling"]["n"] == 4
    scores = [p["scores"] for p in result["prompts"]]
    assert len(scores) == 3 and all(len(s) == 4 for s in scores)
    assert {s for row in scores for s in row} == {0.0, 1.0}  # the parity reward really varies
    # the reported numbers are the metrics of the recorded grades
    assert result["overall"]["accuracy"] == pytest.approx(sum(map(sum, scores)) / 12)
    for k in (1, 2, 4):
        expected = sum(pass_at_k_single(4, int(sum(s)), k) for s in scores) / 3
        assert result["overall"][f"pass@{k}"] == pytest.approx(expected)
    assert result["overall"]["maj@4"] == 0.0  # a float reward extracts no answers: nothing to vote
    assert result["by_data_source"]["s1"]["num_prompts"] == 1


class CharTokenizer:
    """One token per character, no chat template: enough for build_prompts and CannedEngine, and
    spares each spawned rank the transformers import."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def _evaluate_on_rank(rank, world_size):
    import torch.distributed as dist

    # evaluate() needs only a process group; a plain gloo one spares each rank Megatron's import
    # (~15 s on a loaded 2-core machine), which platform.init_distributed would pay
    dist.init_process_group("gloo")
    engine = CannedEngine(CharTokenizer(), ANSWERS)
    result = evaluation.evaluate(engine, CharTokenizer(), RECORDS, EvalConfig(n=4, ks=[1, 2, 4]),
                                 reward=INLINE, rank=rank, world_size=world_size, group=dist.group.WORLD)
    return result, [question for question, *_ in engine.seen]


@pytest.mark.distributed
def test_two_ranks_split_the_prompts_and_report_what_one_rank_reports(spawn):
    single = evaluation.evaluate(CannedEngine(CharTokenizer(), ANSWERS), CharTokenizer(), RECORDS,
                                 EvalConfig(n=4, ks=[1, 2, 4]), reward=INLINE)
    assert single["overall"]["maj@4"] == pytest.approx(2 / 3)  # the hand-checked case above
    (rank0, seen0), (rank1, seen1) = spawn(2, _evaluate_on_rank)
    assert seen0 == [RECORDS[0]["prompt"], RECORDS[2]["prompt"]] and seen1 == [RECORDS[1]["prompt"]]
    assert rank1 == {} and rank0 == single


def test_cli_reads_yaml_then_flags_then_overrides(tmp_path, data_file, model_dir, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "model": model_dir, "data": data_file, "n": 8, "max_response_tokens": 6, "ks": [1, 2],
        "seed": 5, "engine": {"name": "hf", "max_num_seqs": 4}, "prompt": {"max_prompt_tokens": 200},
        "reward": {"pool": "inline", "function": "test_eval_cli:parity_reward"},
    }))
    out = tmp_path / "eval.json"
    # the flag -n beats the file, the dotted override beats both
    assert cli.main(["eval", "--config", str(config), "-n", "4", "--out", str(out), "n=2", "top_k=-1"]) == 0
    result = json.loads(out.read_text())
    assert result["sampling"] == {"n": 2, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_response_tokens": 6,
                                  "seed": 5}
    assert list(result["overall"]) == ["accuracy", "pass@1", "pass@2", "maj@1", "maj@2"]  # ks from the file
    assert result["config"]["engine"] == {**result["config"]["engine"], "name": "hf", "max_num_seqs": 4}
    assert "model" not in result["config"]["engine"]  # the engine's model is `model`
    assert all(len(p["scores"]) == 2 for p in result["prompts"])


def _one_line_error(capsys, argv) -> str:
    """The error line; nothing else on stderr unless the model was loaded (its progress bar)."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("megatron-spo eval: error: ")
    assert len(lines) == 1 or "Loading weights" in lines[0], lines
    return lines[-1]


def test_bad_input_is_one_line(tmp_path, model_dir, data_file, capsys):
    missing = tmp_path / "nope.jsonl"
    assert f"data: {missing} is not a file" in _one_line_error(capsys, ["eval", "--model", model_dir,
                                                                        "--data", str(missing)])
    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    err = _one_line_error(capsys, ["eval", "--model", model_dir, "--data", str(no_answer), "reward.pool=inline"])
    assert "noanswer.jsonl: record 1 has no 'answer'" in err
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text('{"text": "a", "answer": "1"}\n')
    err = _one_line_error(capsys, ["eval", "--model", model_dir, "--data", str(no_prompt), "reward.pool=inline"])
    assert "record 0 has none of the prompt fields" in err
    err = _one_line_error(capsys, ["eval", "--model", str(tmp_path), "--data", str(no_answer)])
    assert "is not a Hugging Face model directory" in err
    base = ["eval", "--model", model_dir, "--data", data_file]
    assert "key 'n' expects int, got 'four'" in _one_line_error(capsys, [*base, "-n", "four"])
    assert "'engine.name' expects one of 'hf', 'vllm', got 'sglang'" in _one_line_error(capsys, [*base, "--engine",
                                                                                                 "sglang"])
    assert "unknown key 'temprature'" in _one_line_error(capsys, [*base, "temprature=1"])
    assert "eval ks [8]: every k must be within 1..n=4" in _one_line_error(capsys, [*base, "-n", "4", "ks=[8]"])
    assert "unknown key 'engine.model'" in _one_line_error(capsys, [*base, "engine.model=/x"])
    assert "missing required key 'data'" in _one_line_error(capsys, ["eval", "--model", model_dir])
    err = _one_line_error(capsys, [*base, "--max-tokens", "6"])
    assert err.endswith("--max-tokens is now the config key max_response_tokens: write max_response_tokens=VALUE "
                        "(or set it in --config FILE)")
    assert "reward.thinking=true" in _one_line_error(capsys, [*base, "--thinking"])


def test_the_trainer_evaluates_with_the_run_s_settings(tmp_path, tokenizer):
    """`evaluate_policy`: eval.* with the training defaults resolved (record fields from data.*,
    prompts built as data.prompt, seeds from the run's seed), metrics named eval/<metric>."""
    from types import SimpleNamespace

    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    records = [{"question": r["prompt"], "solution": r["answer"]} for r in RECORDS]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = from_dict(TrainConfig, {
        "model": {"hf_dir": str(tmp_path / "model")}, "seed": 10,
        "data": {"train_files": [str(train)], "prompt_key": "question", "answer_key": "solution",
                 "prompt": {"max_prompt_tokens": 200}},
        "rollout": {"reward": {"pool": "inline", "math_verify": False}},
        "eval": {"n": 4, "ks": [1, 2, 4]},
    })
    engine = CannedEngine(tokenizer, ANSWERS)
    parallel = SimpleNamespace(rank=0, world_size=1, host_group=None)
    metrics = evaluation.evaluate_policy(engine, tokenizer, records, cfg, parallel=parallel)
    assert metrics["eval/accuracy"] == pytest.approx(5 / 12) and metrics["eval/maj@4"] == pytest.approx(2 / 3)
    assert [(n, seed, t) for _, n, seed, t in engine.seen] == [(4, 10, 0.6), (4, 14, 0.6), (4, 18, 0.6)]
