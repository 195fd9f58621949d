"""The ReTool-style agent loop, driven by a scripted stand-in for the model.

`ScriptedEngine` implements the real `RolloutEngine` interface: it continues from the request's
token-id prefix, honours stop strings, max_tokens and EOS like the HF engine, and plays a fixed
text per turn. The tokenizer is the character-level one built locally by `tiny_models`.
"""

from __future__ import annotations

import threading

import pytest
from tiny_models import make_tiny_tokenizer

from megatron_spo.errors import UserError
from megatron_spo.rollout.agent_loop import (
    AgentLoop,
    AgentLoopConfig,
    AgentTask,
    parse_code_blocks,
    truncate_middle,
)
from megatron_spo.rollout.sandbox import SandboxConfig, SandboxResult
from megatron_spo.rollout.types import Completion, GenerationResult, RolloutEngine

EOS = "<|im_end|>"


def code(source: str) -> str:
    return f"<code>```python\n{source}\n```</code>"


class ScriptedEngine(RolloutEngine):
    """Plays `scripts[prompt][turn]` for the trajectory whose prompt prefixes the request."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]], on_generate=None):
        self.tokenizer = tokenizer
        self.scripts = {tuple(tokenizer.encode(p, add_special_tokens=False)): turns for p, turns in scripts.items()}
        self.turn_of = {key: 0 for key in self.scripts}
        self.calls: list[list] = []  # the requests of every generate() call
        self.on_generate = on_generate

    def _script_for(self, prompt_ids):
        for key in self.scripts:
            if tuple(prompt_ids[: len(key)]) == key:
                return key
        raise AssertionError("request does not start with any scripted prompt")

    def generate(self, requests):
        self.calls.append(list(requests))
        if self.on_generate:
            self.on_generate(len(self.calls))
        results = []
        for request in requests:
            key = self._script_for(request.prompt_token_ids)
            turn = self.turn_of[key]
            self.turn_of[key] += 1
            ids = self.tokenizer.encode(self.scripts[key][turn], add_special_tokens=False)
            finish = "stop"
            for k in range(1, len(ids) + 1):  # stop strings end the turn, inclusive
                if any(s in self.tokenizer.decode(ids[:k]) for s in request.params.stop):
                    ids = ids[:k]
                    break
            if len(ids) > request.params.max_tokens:
                ids, finish = ids[: request.params.max_tokens], "length"
            # a distinct log-prob per turn, to check alignment
            logprobs = [-0.01 * (turn + 1)] * len(ids)
            results.append(GenerationResult(request=request, completions=[
                Completion(token_ids=ids, logprobs=logprobs, finish_reason=finish)]))
        return results

    def update_weights(self, named_tensors):
        raise NotImplementedError("scripted")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _task(tokenizer, prompt: str, key: int = 0) -> AgentTask:
    return AgentTask(prompt_key=key, prompt_token_ids=tokenizer.encode(prompt, add_special_tokens=False),
                     prompt_text=prompt, ground_truth="42")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


FAST_SANDBOX = SandboxConfig(timeout_s=20)  # generous: sympy-free snippets finish in << 1 s


def test_two_tool_calls_in_one_turn_are_both_answered_in_order(tokenizer):
    turn0 = ("Compute both.\n" + code("import time\ntime.sleep(0.5)\nprint('first', 6 * 7)")
             + "\n" + code("print('second')"))
    turn1 = "So the answer is \\boxed{42}." + EOS
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, turn1]})
    config = AgentLoopConfig(tool_call_stop=[], sandbox=FAST_SANDBOX)
    [sample] = AgentLoop(engine, tokenizer, config).run([_task(tokenizer, "Q: ")])

    # the first block finishes last (it sleeps), yet its output comes first
    tool_text = "<interpreter>\nfirst 42\n</interpreter>\n<interpreter>\nsecond\n</interpreter>\n"
    assert sample.response_text == turn0 + tool_text + "So the answer is \\boxed{42}."
    n0, n_tool, n1 = len(_ids(tokenizer, turn0)), len(_ids(tokenizer, tool_text)), len(_ids(tokenizer, turn1))
    assert sample.response_token_ids == _ids(tokenizer, turn0) + _ids(tokenizer, tool_text) + _ids(tokenizer, turn1)
    assert sample.response_mask == [1] * n0 + [0] * n_tool + [1] * n1
    assert sample.response_logprobs == [-0.01] * n0 + [0.0] * n_tool + [-0.02] * n1
    assert sample.extra["num_turns"] == 2
    assert sample.extra["num_tool_calls"] == 2
    assert sample.extra["terminated_by"] == "no_tool_call"
    assert sample.extra["model_text"] == turn0 + "So the answer is \\boxed{42}."
    # the second turn continued from exactly prompt + turn 0 + tool output
    second_request = engine.calls[1][0]
    assert second_request.prompt_token_ids == _ids(tokenizer, "Q: ") + sample.response_token_ids[: n0 + n_tool]


def test_tool_calls_of_a_turn_run_concurrently(tokenizer):
    barrier = threading.Barrier(2, timeout=10)  # breaks (and the test fails) if calls run one by one

    def tool_runner(source: str) -> SandboxResult:
        barrier.wait()
        return SandboxResult(stdout=f"ran {source.strip()}\n", stderr="", exit_code=0, timed_out=False)

    turn0 = code("a") + code("b")
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, "done" + EOS]})
    loop = AgentLoop(engine, tokenizer, AgentLoopConfig(tool_call_stop=[]), tool_runner=tool_runner)
    [sample] = loop.run([_task(tokenizer, "Q: ")])
    assert "<interpreter>\nran a\n</interpreter>\n<interpreter>\nran b\n</interpreter>\n" in sample.response_text


def test_turn_stops_at_code_end_so_hallucinated_output_is_never_kept(tokenizer):
    turn0 = code("print(2 + 2)") + "\n<interpreter>\n5\n</interpreter>\n"  # the model guesses the output
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, "\\boxed{4}" + EOS]})
    [sample] = AgentLoop(engine, tokenizer, AgentLoopConfig(sandbox=FAST_SANDBOX)).run([_task(tokenizer, "Q: ")])
    assert sample.response_text == code("print(2 + 2)") + "<interpreter>\n4\n</interpreter>\n\\boxed{4}"


def test_tool_output_is_middle_truncated_exactly(tokenizer):
    turn0 = code("print('A' * 50 + 'B' * 50)")
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, "ok" + EOS]})
    config = AgentLoopConfig(max_tool_response_length=30, truncation_marker="\n...\n", sandbox=FAST_SANDBOX)
    [sample] = AgentLoop(engine, tokenizer, config).run([_task(tokenizer, "Q: ")])
    # 30 tokens = 13 head + 5 marker + 12 tail (character-level tokenizer: 1 char = 1 token)
    kept = "A" * 13 + "\n...\n" + "B" * 12
    assert sample.response_text == turn0 + f"<interpreter>\n{kept}\n</interpreter>\n" + "ok"
    tool_tokens = [t for t, m in zip(sample.response_token_ids, sample.response_mask) if m == 0]
    assert len(tool_tokens) == len("<interpreter>\n") + 30 + len("\n</interpreter>\n")


def test_truncate_middle_by_hand():
    assert truncate_middle(list(range(10)), 10, [-1]) == list(range(10))
    assert truncate_middle(list(range(10)), 6, [-1]) == [0, 1, 2, -1, 8, 9]
    assert truncate_middle(list(range(10)), 7, [-1, -1]) == [0, 1, 2, -1, -1, 8, 9]
    assert truncate_middle(list(range(10)), 2, [-1, -1]) == [0, 1]  # no room for a marker


def test_max_turns_is_respected(tokenizer):
    turns = [f"step {i} " + code(f"print({i})") for i in range(6)]
    engine = ScriptedEngine(tokenizer, {"Q: ": turns})
    config = AgentLoopConfig(max_turns=3, sandbox=FAST_SANDBOX)
    [sample] = AgentLoop(engine, tokenizer, config).run([_task(tokenizer, "Q: ")])
    assert len(engine.calls) == 3
    assert sample.extra["num_turns"] == 3
    assert sample.extra["num_tool_calls"] == 2  # the third turn's code is not run
    assert sample.extra["terminated_by"] == "max_turns"
    expected = (turns[0] + "<interpreter>\n0\n</interpreter>\n" + turns[1] + "<interpreter>\n1\n</interpreter>\n"
                + turns[2])
    assert sample.response_text == expected


def test_response_budget_cuts_generation(tokenizer):
    turn0 = code("print('x' * 5)")
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, "y" * 100]})
    config = AgentLoopConfig(max_response_length=80, sandbox=FAST_SANDBOX)
    [sample] = AgentLoop(engine, tokenizer, config).run([_task(tokenizer, "Q: ")])
    tool_len = len("<interpreter>\nxxxxx\n</interpreter>\n")
    assert engine.calls[1][0].params.max_tokens == 80 - len(turn0) - tool_len
    assert len(sample.response_token_ids) == 80
    assert sample.finish_reason == "length"
    assert sample.extra["terminated_by"] == "length"


def test_tool_output_that_does_not_fit_the_budget_is_not_appended(tokenizer):
    turn0 = code("print('z' * 40)")
    engine = ScriptedEngine(tokenizer, {"Q: ": [turn0, "never"]})
    config = AgentLoopConfig(max_response_length=len(turn0) + 20, sandbox=FAST_SANDBOX)
    [sample] = AgentLoop(engine, tokenizer, config).run([_task(tokenizer, "Q: ")])
    assert sample.response_text == turn0
    assert sample.response_mask == [1] * len(turn0)
    assert sample.finish_reason == "length"
    assert len(engine.calls) == 1


def test_many_trajectories_in_flight_engine_busy_while_tools_run(tokenizer):
    # A's tool blocks until the engine has been called a second time, which happens only if the
    # loop keeps generating for B and C while A's code is still running.
    engine_called_again = threading.Event()

    def on_generate(call_number):
        if call_number >= 2:
            engine_called_again.set()

    def tool_runner(source: str) -> SandboxResult:
        if "slow" in source:
            waited = engine_called_again.wait(timeout=10)
            return SandboxResult(stdout="slow done" if waited else "engine was idle", stderr="",
                                 exit_code=0, timed_out=False)
        return SandboxResult(stdout=f"fast {source.strip()}", stderr="", exit_code=0, timed_out=False)

    engine = ScriptedEngine(tokenizer, {
        "A: ": [code("slow"), "A done" + EOS],
        "B: ": [code("1"), code("2"), "B done" + EOS],
        "C: ": ["no tools here" + EOS],
    }, on_generate=on_generate)
    tasks = [_task(tokenizer, p, key=i) for i, p in enumerate(["A: ", "B: ", "C: "])]
    samples = AgentLoop(engine, tokenizer, AgentLoopConfig(), tool_runner=tool_runner).run(tasks)

    assert [s.prompt_key for s in samples] == [0, 1, 2]
    assert len(engine.calls[0]) == 3  # all three trajectories generate in one batch
    assert "<interpreter>\nslow done\n</interpreter>\n" in samples[0].response_text
    assert samples[1].response_text.count("<interpreter>") == 2
    assert samples[2].response_text == "no tools here"
    for sample in samples:
        assert len(sample.response_mask) == len(sample.response_token_ids) == len(sample.response_logprobs)
        model_text = "".join(tokenizer.decode([t]) for t, m in zip(sample.response_token_ids, sample.response_mask) if m)
        assert "<interpreter>" not in model_text
        assert sample.extra["model_text"] == model_text.replace(EOS, "")


def test_failing_code_returns_its_traceback(tokenizer):
    engine = ScriptedEngine(tokenizer, {"Q: ": [code("1 / 0"), "oops" + EOS]})
    [sample] = AgentLoop(engine, tokenizer, AgentLoopConfig(sandbox=FAST_SANDBOX)).run([_task(tokenizer, "Q: ")])
    assert "ZeroDivisionError: division by zero\n</interpreter>" in sample.response_text
    assert sample.extra["tool_failures"] == 1


def test_parse_code_blocks():
    text = "a " + code("x = 1\nprint(x)") + " b <code>```python\nprint(2)```</code> <code>not python</code>"
    assert parse_code_blocks(text) == ["x = 1\nprint(x)\n", "print(2)"]
    assert parse_code_blocks("no code") == []


@pytest.mark.parametrize("field", ["max_turns", "max_response_length", "max_tool_response_length",
                                   "max_concurrent_tools"])
def test_bad_agent_config_is_a_user_error(field):
    with pytest.raises(UserError, match=f"agent.{field}"):
        AgentLoopConfig(**{field: 0})


def test_config_from_the_trainers_rollout_section():
    from megatron_spo.training.config import RolloutConfig

    rollout = RolloutConfig(max_assistant_turns=3, max_response_tokens=1000, max_tool_response_tokens=64,
                            temperature=0.7, sandbox=SandboxConfig(timeout_s=2), max_concurrent_tools=5)
    assert AgentLoopConfig.from_rollout(rollout).max_concurrent_tools == 5
    config = AgentLoopConfig.from_rollout(rollout, max_concurrent_tools=2)
    assert (config.max_turns, config.max_response_length, config.max_tool_response_length) == (3, 1000, 64)
    assert (config.temperature, config.sandbox.timeout_s, config.max_concurrent_tools) == (0.7, 2, 2)


def test_agent_engine_gives_whole_trajectories_graded_on_the_model_text(tokenizer):
    """`AgentEngine.generate` (the tool agent's evaluation): each completion is a whole
    trajectory, its text what the model wrote (a box the code printed does not count)."""
    from megatron_spo.rollout.agent_loop import AgentEngine
    from megatron_spo.rollout.types import GenerationRequest, SamplingParams

    turn0 = code("print('\\\\boxed{1}')")
    turn1 = "So \\boxed{42}." + EOS
    engine = ScriptedEngine(tokenizer, {"Q1: ": [turn0, turn1], "Q2: ": ["\\boxed{7}" + EOS]})
    agent = AgentEngine(engine, tokenizer, AgentLoopConfig(sandbox=FAST_SANDBOX))
    results = agent.generate([GenerationRequest(prompt_token_ids=_ids(tokenizer, p), params=SamplingParams(seed=3))
                              for p in ("Q1: ", "Q2: ")])
    [c1], [c2] = [r.completions for r in results]
    assert c1.text == turn0 + "So \\boxed{42}."  # not the interpreter's \boxed{1}
    tool_text = "<interpreter>\n\\boxed{1}\n</interpreter>\n"
    assert c1.token_ids == _ids(tokenizer, turn0) + _ids(tokenizer, tool_text) + _ids(tokenizer, turn1)
    assert c2.text == "\\boxed{7}" and c2.finish_reason == "stop"
    assert [len(call) for call in engine.calls] == [2, 1]  # both first turns in one batch
    assert engine.calls[0][0].params.seed == 3
