"""Multi-turn tool-augmented rollouts (ReTool-style): the model writes Python, a sandbox runs it,
the output goes back into the conversation, and the model continues.

Each trajectory is a small state machine (the authors' agent loop, seed 001):

    PENDING -> GENERATING -> (code blocks?) -> PROCESSING_TOOLS -> GENERATING -> ... -> TERMINATED

- GENERATING: one assistant turn, continued from the token-id prefix `prompt + response so far`
  through the `RolloutEngine` interface, stopping at `</code>` (`tool_call_stop`), EOS, or the
  remaining response budget. Its tokens enter the response with `response_mask` 1.
- PROCESSING_TOOLS: every ```<code>```python ...```</code>``` block of the turn runs in the
  sandbox, all concurrently; all results are kept, in block order (the upstream loop kept only
  the first). Each block's output (stdout, then stderr, then a timeout note) is cut to
  `max_tool_response_length` tokens by middle truncation (head + marker + tail) and wrapped as
  `<interpreter>\\n...\\n</interpreter>\\n`. These tokens enter the response with mask 0 and
  log-prob 0: the environment wrote them, so they carry no gradient.
- TERMINATED: a turn without code, `max_turns` assistant turns, or the response budget
  `max_response_length` reached (a tool response that does not fit is not appended, as in verl).

The response is the concatenation of all turns' and tool outputs' token ids; `response_mask`
and `response_logprobs` are aligned with it token for token, because tool text is tokenised
once here and the engine continues from exactly these ids (no re-tokenisation of the whole
conversation). Many trajectories are in flight at once: each engine call batches every
trajectory that is ready to generate, while other trajectories' tools run in a thread pool, so
the engine is not idle while code executes.

Grade `Sample.extra["model_text"]` (the model-written tokens only), not `response_text`: a
`\\boxed{}` that the code printed into an interpreter block is not the model's answer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import re
import time
from typing import Callable, Sequence

from megatron_spo.errors import UserError
from megatron_spo.rollout.sandbox import SandboxConfig, SandboxResult, run_python
from megatron_spo.rollout.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    Sample,
    SamplingParams,
)

CODE_BLOCK_RE = re.compile(r"<code>\s*```python\s*\n(.*?)```\s*</code>", re.DOTALL)


class State(enum.Enum):
    PENDING = "pending"
    GENERATING = "generating"
    PROCESSING_TOOLS = "processing_tools"
    TERMINATED = "terminated"


@dataclasses.dataclass(kw_only=True)
class AgentLoopConfig:
    max_turns: int = 8
    """Assistant turns at most per trajectory (the authors' ReTool setting)."""
    max_response_length: int = 16384
    """Response budget in tokens, model and tool tokens together (reference runs: 16k)."""
    max_tool_response_length: int = 256
    """Tokens kept of each code block's output (middle truncation); the authors' default."""
    truncation_marker: str = "\n...\n"
    """Inserted where the middle of a long tool output was cut (counts within the limit)."""
    tool_call_stop: list[str] = dataclasses.field(default_factory=lambda: ["</code>"])
    """Stop strings that end a turn so its code can run; [] lets a turn hold several blocks."""
    max_concurrent_tools: int = 8
    """Sandbox executions running at once (threads driving sandbox processes)."""
    temperature: float = 1.0
    """Sampling temperature of every turn (RL rollouts sample at 1.0)."""
    top_p: float = 1.0
    """Nucleus mass of every turn."""
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    """Limits and backend of the code sandbox."""

    def __post_init__(self):
        if self.max_turns < 1:
            raise UserError(f"agent.max_turns must be >= 1, got {self.max_turns}")
        if self.max_response_length < 1:
            raise UserError(f"agent.max_response_length must be >= 1, got {self.max_response_length}")
        if self.max_tool_response_length < 1:
            raise UserError(f"agent.max_tool_response_length must be >= 1, got {self.max_tool_response_length}")
        if self.max_concurrent_tools < 1:
            raise UserError(f"agent.max_concurrent_tools must be >= 1, got {self.max_concurrent_tools}")

    @classmethod
    def from_rollout(cls, rollout, **overrides) -> "AgentLoopConfig":
        """The loop's settings from the trainer's `rollout` section (`training.config.RolloutConfig`)."""
        fields = dict(
            max_turns=rollout.max_assistant_turns,
            max_response_length=rollout.max_response_tokens,
            max_tool_response_length=rollout.max_tool_response_tokens,
            max_concurrent_tools=rollout.max_concurrent_tools,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            sandbox=rollout.sandbox,
        )
        fields.update(overrides)
        return cls(**fields)


@dataclasses.dataclass(kw_only=True)
class AgentTask:
    prompt_key: int
    """Stable id of the prompt (see `megatron_spo.value`)."""
    prompt_token_ids: list[int]
    prompt_text: str | None = None
    ground_truth: str | None = None
    seed: int | None = None
    """Sampling seed of the first turn (turn t uses seed + 7919 t); None = the engine's."""


@dataclasses.dataclass(kw_only=True)
class AgentTrajectory:
    task: AgentTask
    state: State = State.PENDING
    response_ids: list[int] = dataclasses.field(default_factory=list)
    response_logprobs: list[float] = dataclasses.field(default_factory=list)
    response_mask: list[int] = dataclasses.field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    tool_time_s: float = 0.0
    finish_reason: str = "stop"
    terminated_by: str = ""
    pending_tools: list[concurrent.futures.Future] = dataclasses.field(default_factory=list)

    def extend(self, token_ids: Sequence[int], logprobs: Sequence[float], mask_value: int) -> None:
        self.response_ids.extend(token_ids)
        self.response_logprobs.extend(logprobs)
        self.response_mask.extend([mask_value] * len(token_ids))

    def terminate(self, reason: str, finish_reason: str = "stop") -> None:
        self.state, self.terminated_by, self.finish_reason = State.TERMINATED, reason, finish_reason


ToolRunner = Callable[[str], SandboxResult]


def parse_code_blocks(text: str) -> list[str]:
    """The code of every ```<code>```python ...```</code>``` block, in order."""
    return CODE_BLOCK_RE.findall(text)


def tool_output_text(result: SandboxResult) -> str:
    """What the model sees of one execution: stdout, then stderr, then a timeout note."""
    text = result.stdout + result.stderr
    if result.timed_out:
        text += "\nTimeoutError: execution did not finish in time (output so far above)"
    if result.output_truncated:
        text += "\n[output cut]"
    return text.strip("\n")


def truncate_middle(token_ids: list[int], max_tokens: int, marker_ids: list[int]) -> list[int]:
    """At most `max_tokens` ids: the head and tail of `token_ids` around `marker_ids`."""
    if len(token_ids) <= max_tokens:
        return token_ids
    keep = max_tokens - len(marker_ids)
    if keep < 2:  # too small for a marker: keep the head only
        return token_ids[:max_tokens]
    head, tail = (keep + 1) // 2, keep // 2
    return token_ids[:head] + marker_ids + token_ids[len(token_ids) - tail :]


class AgentLoop:
    """Runs many ReTool-style trajectories against one engine (see the module docstring)."""

    def __init__(self, engine: RolloutEngine, tokenizer, config: AgentLoopConfig,
                 tool_runner: ToolRunner | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.tool_runner = tool_runner or self._run_in_sandbox
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self._marker_ids = self._encode(config.truncation_marker) if config.truncation_marker else []
        self._open_ids = self._encode("<interpreter>\n")
        self._close_ids = self._encode("\n</interpreter>\n")

    def _run_in_sandbox(self, code: str) -> SandboxResult:
        sandbox = self.config.sandbox
        return run_python(code, timeout_s=sandbox.timeout_s, memory_mb=sandbox.memory_mb, config=sandbox)

    def run(self, tasks: Sequence[AgentTask]) -> list[Sample]:
        """Roll out every task to completion; Samples come back in task order."""
        trajectories = [AgentTrajectory(task=task) for task in tasks]
        with concurrent.futures.ThreadPoolExecutor(self.config.max_concurrent_tools,
                                                   thread_name_prefix="agent-tools") as tools:
            for trajectory in trajectories:
                trajectory.state = State.GENERATING
            while any(t.state is not State.TERMINATED for t in trajectories):
                generating = [t for t in trajectories if t.state is State.GENERATING]
                if generating:
                    self._generate_turn(generating, tools)
                else:  # only tools are running: wait for the first trajectory's tools to finish
                    running = [f for t in trajectories for f in t.pending_tools]
                    concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for trajectory in trajectories:
                    if trajectory.state is State.PROCESSING_TOOLS and all(f.done() for f in trajectory.pending_tools):
                        self.append_tool_outputs(trajectory)
        return [self.to_sample(t) for t in trajectories]

    # -- states ----------------------------------------------------------------------------------

    def _generate_turn(self, batch: list[AgentTrajectory], tools: concurrent.futures.Executor) -> None:
        results = self.engine.generate([self.turn_request(t) for t in batch])
        for trajectory, result in zip(batch, results):
            self.after_turn(trajectory, result.completions[0], tools)

    def turn_request(self, t: AgentTrajectory) -> GenerationRequest:
        """The next assistant turn of `t`: continued from its token-id prefix, stopping at a tool
        call or the remaining response budget (also what the async stream submits)."""
        return GenerationRequest(
            prompt_token_ids=t.task.prompt_token_ids + t.response_ids,
            params=SamplingParams(
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_tokens=self.config.max_response_length - len(t.response_ids),
                stop=list(self.config.tool_call_stop),
                seed=None if t.task.seed is None else t.task.seed + 7919 * t.turns,
            ),
            request_id=f"{t.task.prompt_key}/turn{t.turns}",
        )

    def after_turn(self, trajectory: AgentTrajectory, completion, tools: concurrent.futures.Executor) -> None:
        """Append a finished turn; terminate, or start its code blocks in the sandbox (`tools`)."""
        trajectory.extend(completion.token_ids, completion.logprobs, mask_value=1)
        trajectory.turns += 1
        if len(trajectory.response_ids) >= self.config.max_response_length:
            trajectory.terminate("length", finish_reason="length")
            return
        turn_text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        blocks = parse_code_blocks(turn_text)
        if not blocks:
            trajectory.terminate("no_tool_call", finish_reason=completion.finish_reason)
        elif trajectory.turns >= self.config.max_turns:
            trajectory.terminate("max_turns", finish_reason=completion.finish_reason)
        else:
            trajectory.state = State.PROCESSING_TOOLS
            trajectory.pending_tools = [tools.submit(self._timed_tool, code) for code in blocks]

    def _timed_tool(self, code: str) -> tuple[SandboxResult, float]:
        started = time.monotonic()
        return self.tool_runner(code), time.monotonic() - started

    def append_tool_outputs(self, trajectory: AgentTrajectory) -> None:
        """The finished tools' outputs (mask 0); the trajectory generates again or ends by length."""
        tool_ids: list[int] = []
        for future in trajectory.pending_tools:  # block order, whatever order they finished in
            result, elapsed_s = future.result()
            trajectory.tool_calls += 1
            trajectory.tool_time_s += elapsed_s
            trajectory.tool_failures += int(result.timed_out or result.exit_code != 0)
            output_ids = truncate_middle(self._encode(tool_output_text(result)),
                                         self.config.max_tool_response_length, self._marker_ids)
            tool_ids += self._open_ids + output_ids + self._close_ids
        trajectory.pending_tools = []
        if len(trajectory.response_ids) + len(tool_ids) >= self.config.max_response_length:
            trajectory.terminate("length", finish_reason="length")
            return
        trajectory.extend(tool_ids, [0.0] * len(tool_ids), mask_value=0)
        trajectory.state = State.GENERATING

    def to_sample(self, trajectory: AgentTrajectory) -> Sample:
        task = trajectory.task
        return Sample(
            prompt_key=task.prompt_key,
            prompt_token_ids=list(task.prompt_token_ids),
            response_token_ids=trajectory.response_ids,
            response_logprobs=trajectory.response_logprobs,
            response_mask=trajectory.response_mask,
            finish_reason=trajectory.finish_reason,
            prompt_text=task.prompt_text,
            response_text=self.tokenizer.decode(trajectory.response_ids, skip_special_tokens=True),
            ground_truth=task.ground_truth,
            extra={
                # what the model itself wrote: grade this, so an answer the code printed into
                # an <interpreter> block cannot earn the reward
                "model_text": self.tokenizer.decode(
                    [t for t, m in zip(trajectory.response_ids, trajectory.response_mask) if m],
                    skip_special_tokens=True),
                "num_turns": trajectory.turns,
                "num_tool_calls": trajectory.tool_calls,
                "tool_failures": trajectory.tool_failures,
                "tool_time_s": trajectory.tool_time_s,
                "terminated_by": trajectory.terminated_by,
            },
        )


class AgentEngine(RolloutEngine):
    """An engine whose `generate` runs the agent loop: each request's n completions are whole
    tool-using trajectories (completion j's first turn seeded `params.seed + j`), the text to
    grade being what the model wrote (`model_text`). Evaluation with `rollout.agent: tool` uses
    it, so held-out accuracy is measured the way the policy is trained: with its tools."""

    def __init__(self, engine: RolloutEngine, tokenizer, config: AgentLoopConfig):
        self.engine, self.tokenizer = engine, tokenizer
        self.loop = AgentLoop(engine, tokenizer, config)
        self.spmd = getattr(engine, "spmd", False)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        tasks = [AgentTask(prompt_key=i, prompt_token_ids=list(r.prompt_token_ids),
                           seed=None if r.params.seed is None else r.params.seed + j)
                 for i, r in enumerate(requests) for j in range(r.params.n)]
        samples = iter(self.loop.run(tasks))
        results = []
        for request in requests:
            completions = []
            for _ in range(request.params.n):
                s = next(samples)
                completions.append(Completion(token_ids=s.response_token_ids, logprobs=s.response_logprobs,
                                              finish_reason=s.finish_reason, text=s.extra["model_text"]))
            results.append(GenerationResult(request=request, completions=completions))
        return results

    def update_weights(self, named_tensors) -> None:
        self.engine.update_weights(named_tensors)
