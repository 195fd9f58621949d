"""Typed records that cross the rollout <-> training boundary, and the engine interface.

A request is token ids (a prompt, possibly ending in a partial response, so engines continue from
a token-id prefix) plus sampling parameters; a result holds, per sample, the new token ids, their
log-probabilities under the sampling distribution, and why generation stopped. Every engine
(vLLM on GPU or CPU, the HF-transformers engine) implements `RolloutEngine`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterable, Literal, Sequence

import torch

FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    """Samples per request."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 disables it."""
    max_tokens: int = 256
    """New tokens per sample at most (finish reason "length" when reached)."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Token ids that end a sample (included in the output, finish reason "stop")."""
    stop: list[str] = dataclasses.field(default_factory=list)
    """Strings that end a sample once they appear in the decoded output."""
    seed: int | None = None
    """Per-request seed for reproducible sampling; None draws from the engine's generator."""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")


@dataclasses.dataclass(kw_only=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    """Prompt (and optionally a partial response) to continue from."""
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    request_id: str | None = None


@dataclasses.dataclass(kw_only=True)
class Completion:
    token_ids: list[int]
    """New tokens only (the prompt is not repeated)."""
    logprobs: list[float]
    """Log-probability of each new token under the sampling distribution (after temperature)."""
    finish_reason: FinishReason
    text: str | None = None
    """Decoded new tokens, when the engine has a tokenizer."""


@dataclasses.dataclass(kw_only=True)
class GenerationResult:
    request: GenerationRequest
    completions: list[Completion]


@dataclasses.dataclass(kw_only=True)
class Sample:
    """One scored trajectory, as training consumes it.

    `response_token_ids`, `response_logprobs` and `response_mask` are aligned token for token;
    the mask is 1 on model-generated tokens and 0 on tokens the environment inserted (tool
    output), which carry no gradient.
    """

    prompt_key: int
    """Stable id of the prompt (see `megatron_spo.value`)."""
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]
    response_mask: list[int]
    reward: float = 0.0
    finish_reason: FinishReason = "stop"
    prompt_text: str | None = None
    response_text: str | None = None
    ground_truth: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.response_token_ids)
        if len(self.response_logprobs) != n or len(self.response_mask) != n:
            raise ValueError(
                f"Sample response fields disagree in length: token_ids {n}, logprobs "
                f"{len(self.response_logprobs)}, mask {len(self.response_mask)}"
            )


MEMORY_TAGS = frozenset({"weights", "kv_cache"})
"""What an engine's `wake_up` can regain, vLLM's names."""


def check_sleep_level(level: int) -> None:
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 or 2, got {level}")


def wake_tags(tags: Sequence[str] | None) -> set[str]:
    """The tags a `wake_up(tags)` asks for (None: all), each checked."""
    wanted = set(MEMORY_TAGS if tags is None else tags)
    if wanted - MEMORY_TAGS:
        raise ValueError(f"wake_up tags must be 'weights' or 'kv_cache', got {sorted(wanted)}")
    return wanted


class RolloutEngine(abc.ABC):
    """What the trainer needs from an inference engine."""

    spmd: bool = False
    """True when one engine spans a rollout group of several ranks that all call `generate` with
    the same requests and all get the results (vLLM's `external_launcher`); False when each rank's
    engine stands alone, and a group's leader generates for it (`rollout.placement`)."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request; results are in request order."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named full tensors (any subset of the model's weights)."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory while the actor has the GPU: level 1 drops the KV cache and
        keeps the weights in host memory; level 2 drops both (the next weight sync refills them;
        what verl's colocated workers do). `generate` is refused until `wake_up`."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Regain what `sleep` released: "weights", "kv_cache" or both (None). Waking the weights
        alone lets a weight sync land before the KV cache takes its memory."""

    def shutdown(self) -> None:
        """Free every resource; the engine is unusable afterwards."""
