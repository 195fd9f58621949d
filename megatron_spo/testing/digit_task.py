"""The 3-digit number task: a policy whose prefix values can be enumerated exactly.

A "model" writes a number digit by digit (tokens 0-9 are the digits, token 10 is EOS) and is
rewarded `R = -|n - t| / 999` for the number n it wrote against the target t of the prompt
(an unfinished answer scores -1). Its next-token distribution is scripted (`DigitPolicy`), so the
value of any prefix, V(prefix) = E[R | prefix], is a finite sum over at most 10^3 completions
(`exact_prefix_value`). `TabularDigitPolicy` is the learnable version (a table of logits per
prefix, with differentiable `teacher_forced_logprobs`), so an algorithm's whole loop -- sample,
build samples, loss, optimizer step, weight sync -- can be run and checked against the exact
expected reward. `DigitTaskEngine` is a real `RolloutEngine` over either policy that honours
n, temperature, top_p, top_k, max_tokens, stop tokens and seeds, and continues from token-id
prefixes; the segment and soft-SPO tests check Monte Carlo estimates against the enumeration,
and users can do the same to sanity-check a configuration before spending GPU time.

Prompt encoding: every token id >= `PROMPT_TOKEN_BASE` belongs to the prompt; a prompt is
`[PROMPT_TOKEN_BASE + t]`, so the engine reads the response prefix as the tokens after the last
prompt token.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Iterable, Sequence

import torch

from megatron_spo.rollout.types import (
    Completion,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
)

NUM_DIGITS = 3
EOS_TOKEN = 10
VOCAB_SIZE = 11
PROMPT_TOKEN_BASE = 1000
_TOKENS = range(VOCAB_SIZE)
UNFINISHED_REWARD = -1.0
"""Reward of a response that is not exactly three digits followed by EOS (the worst score)."""


def prompt_for_target(target: int) -> list[int]:
    """Prompt token ids asking for `target` (0..999)."""
    if not 0 <= target <= 999:
        raise ValueError(f"target must be in 0..999, got {target}")
    return [PROMPT_TOKEN_BASE + target]


def target_of_prompt(prompt_token_ids: Sequence[int]) -> int:
    return prompt_token_ids[-1] - PROMPT_TOKEN_BASE


def split_prompt(token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(prompt, response prefix): the prompt ends at the last token >= PROMPT_TOKEN_BASE."""
    last_prompt = max(i for i, tok in enumerate(token_ids) if tok >= PROMPT_TOKEN_BASE)
    return list(token_ids[: last_prompt + 1]), list(token_ids[last_prompt + 1 :])


def digit_reward(response_token_ids: Sequence[int], target: int) -> float:
    """-|n - t| / 999 for a response "d d d EOS"; UNFINISHED_REWARD otherwise."""
    digits = list(response_token_ids)
    if len(digits) != NUM_DIGITS + 1 or digits[-1] != EOS_TOKEN or any(d > 9 for d in digits[:-1]):
        return UNFINISHED_REWARD
    number = digits[0] * 100 + digits[1] * 10 + digits[2]
    return -abs(number - target) / 999.0


@dataclasses.dataclass(kw_only=True)
class DigitPolicy:
    """Scripted base (temperature 1) next-token probabilities.

    - first digit: `first_digit_probs`;
    - second digit: a digit in `confident_digits` as first digit is repeated with probability
      `confidence` (so that token is "high-probability"), otherwise uniform;
    - third digit: proportional to `third_digit_weights`;
    - then EOS with probability 1.
    """

    first_digit_probs: list[float] = dataclasses.field(default_factory=lambda: [0.1] * 10)
    confident_digits: tuple[int, ...] = (0, 1, 2, 3, 4)
    confidence: float = 0.95
    third_digit_weights: list[float] = dataclasses.field(
        default_factory=lambda: [10.0 - d for d in range(10)]
    )

    def base_distribution(self, response_prefix: Sequence[int]) -> list[float]:
        """(VOCAB_SIZE,) probabilities of the next token after `response_prefix`."""
        position = len(response_prefix)
        probs = [0.0] * VOCAB_SIZE
        if position == 0:
            total = sum(self.first_digit_probs)
            probs[:10] = [p / total for p in self.first_digit_probs]
        elif position == 1:
            first = response_prefix[0]
            if first in self.confident_digits:
                rest = (1.0 - self.confidence) / 9
                probs[:10] = [self.confidence if d == first else rest for d in range(10)]
            else:
                probs[:10] = [0.1] * 10
        elif position == 2:
            total = sum(self.third_digit_weights)
            probs[:10] = [w / total for w in self.third_digit_weights]
        else:
            probs[EOS_TOKEN] = 1.0
        return probs

    def sampling_distribution(
        self, response_prefix: Sequence[int], temperature: float, top_p: float = 1.0, top_k: int = -1
    ) -> list[float]:
        return apply_sampling(self.base_distribution(response_prefix), temperature, top_p, top_k)

    def load_weights(self, name: str, tensor: torch.Tensor) -> None:
        if name != "first_digit_probs" or tuple(tensor.shape) != (10,):
            raise KeyError(f"DigitPolicy has only 'first_digit_probs' (10,), got {name!r} {tuple(tensor.shape)}")
        self.first_digit_probs = [float(p) for p in tensor]


class TabularDigitPolicy:
    """A learnable policy for the digit task: one row of 10 digit logits per prefix of 0, 1 or
    2 digits (111 rows, `state_index`), EOS after the third digit. Train `logits` with torch and
    push them to a `DigitTaskEngine` with `update_weights([("logits", logits)])`."""

    NUM_STATES = 1 + 10 + 100

    def __init__(self, logits: torch.Tensor | None = None):
        self.logits = torch.zeros(self.NUM_STATES, 10) if logits is None else logits.detach().clone()

    @staticmethod
    def state_index(response_prefix: Sequence[int]) -> int:
        if len(response_prefix) == 0:
            return 0
        if len(response_prefix) == 1:
            return 1 + response_prefix[0]
        return 11 + 10 * response_prefix[0] + response_prefix[1]

    def base_distribution(self, response_prefix: Sequence[int]) -> list[float]:
        if len(response_prefix) >= NUM_DIGITS:
            return [0.0] * EOS_TOKEN + [1.0]
        return torch.softmax(self.logits[self.state_index(response_prefix)].double(), dim=0).tolist() + [0.0]

    def sampling_distribution(
        self, response_prefix: Sequence[int], temperature: float, top_p: float = 1.0, top_k: int = -1
    ) -> list[float]:
        return apply_sampling(self.base_distribution(response_prefix), temperature, top_p, top_k)

    def load_weights(self, name: str, tensor: torch.Tensor) -> None:
        if name != "logits" or tuple(tensor.shape) != (self.NUM_STATES, 10):
            raise KeyError(f"TabularDigitPolicy has only 'logits' {(self.NUM_STATES, 10)}, got {name!r}")
        self.logits = tensor.detach().clone()


def table_index(full_responses: Sequence[Sequence[int]], start: Sequence[int]) -> torch.Tensor:
    """(B, T) long: where each token full_responses[b][start[b]:] sits in the flattened
    (111 * 10) logits table of `TabularDigitPolicy`; EOS after three digits and right padding
    point at one extra entry past the table (log-probability 0)."""
    width = max(len(r) - s for r, s in zip(full_responses, start))
    padding_index = TabularDigitPolicy.NUM_STATES * 10
    rows = []
    for response, first in zip(full_responses, start):
        row = [
            TabularDigitPolicy.state_index(response[:t]) * 10 + response[t]
            for t in range(first, min(len(response), NUM_DIGITS))
        ]
        rows.append(row + [padding_index] * (width - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def gather_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities at `index` (from `table_index`) under `logits` (111, 10) at
    `temperature` (the actor's view: no top-p). Differentiable in `logits`."""
    table = torch.log_softmax(logits / temperature, dim=-1).flatten()
    return torch.cat([table, table.new_zeros(1)])[index]


def teacher_forced_logprobs(
    logits: torch.Tensor, full_responses: Sequence[Sequence[int]], start: Sequence[int], temperature: float
) -> torch.Tensor:
    """(B, T) log-probabilities of tokens full_responses[b][start[b]:] under a tabular policy,
    right-padded with 0 (see `table_index`, `gather_logprobs`)."""
    return gather_logprobs(logits, table_index(full_responses, start), temperature)


def apply_sampling(base: Sequence[float], temperature: float, top_p: float = 1.0, top_k: int = -1) -> list[float]:
    """The distribution an engine samples from: p^(1/T) renormalised, then top-k, then top-p
    (the smallest most-likely set with mass >= top_p), renormalised; temperature 0 is greedy."""
    if temperature == 0:
        best = max(range(len(base)), key=lambda i: base[i])
        return [1.0 if i == best else 0.0 for i in range(len(base))]
    tempered = [p ** (1.0 / temperature) if p > 0 else 0.0 for p in base]
    total = sum(tempered)
    probs = [p / total for p in tempered]
    order = sorted(range(len(base)), key=lambda i: -probs[i])
    keep: set[int] = set()
    mass = 0.0
    for rank, token in enumerate(order):
        if probs[token] == 0 or (top_k > 0 and rank >= top_k):
            break
        keep.add(token)
        mass += probs[token]
        if mass >= top_p - 1e-12:
            break
    kept_total = sum(probs[i] for i in keep)
    return [probs[i] / kept_total if i in keep else 0.0 for i in range(len(base))]


def exact_prefix_value(
    policy: DigitPolicy | TabularDigitPolicy,
    response_prefix: Sequence[int],
    target: int,
    *,
    temperature: float,
    top_p: float = 1.0,
    max_response_tokens: int = NUM_DIGITS + 1,
) -> tuple[float, float]:
    """(E[R | prefix], Var[R | prefix]) under the sampling distribution, by enumeration."""

    def moments(prefix: list[int]) -> tuple[float, float]:  # (E[R], E[R^2])
        if prefix and prefix[-1] == EOS_TOKEN:
            reward = digit_reward(prefix, target)
            return reward, reward * reward
        if len(prefix) >= max_response_tokens:
            return UNFINISHED_REWARD, UNFINISHED_REWARD**2
        first = second = 0.0
        for token, p in enumerate(policy.sampling_distribution(prefix, temperature, top_p)):
            if p > 0:
                m1, m2 = moments(prefix + [token])
                first += p * m1
                second += p * m2
        return first, second

    mean, second_moment = moments(list(response_prefix))
    return mean, max(second_moment - mean * mean, 0.0)


class DigitTaskEngine(RolloutEngine):
    """A `RolloutEngine` sampling from a `DigitPolicy` (pure Python, deterministic per seed).

    `calls` records the number of requests of every `generate` call, so tests can check batching.
    """

    def __init__(self, policy: DigitPolicy | TabularDigitPolicy, *, seed: int = 0):
        self.policy = policy
        self.rng = random.Random(seed)
        self.calls: list[int] = []
        # (prefix, temperature, top_p, top_k) -> (probs, cumulative weights); the prefix space is
        # tiny, and recomputing the distribution dominated the tests' time
        self._distributions: dict[tuple, tuple[list[float], list[float]]] = {}

    def _distribution(self, prefix: list[int], params: SamplingParams) -> tuple[list[float], list[float]]:
        key = (tuple(prefix), params.temperature, params.top_p, params.top_k)
        if key not in self._distributions:
            probs = self.policy.sampling_distribution(prefix, params.temperature, params.top_p, params.top_k)
            self._distributions[key] = (probs, list(itertools.accumulate(probs)))
        return self._distributions[key]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(len(requests))
        return [
            GenerationResult(request=request, completions=self._complete(request))
            for request in requests
        ]

    def _complete(self, request: GenerationRequest) -> list[Completion]:
        params: SamplingParams = request.params
        rng = random.Random(params.seed) if params.seed is not None else self.rng
        _, prefix = split_prompt(request.prompt_token_ids)
        stop_tokens = set(params.stop_token_ids) | {EOS_TOKEN}
        completions = []
        for _ in range(params.n):
            response = list(prefix)
            new_tokens: list[int] = []
            logprobs: list[float] = []
            finish_reason: FinishReason = "length"
            while len(new_tokens) < params.max_tokens:
                probs, cumulative = self._distribution(response, params)
                token = rng.choices(_TOKENS, cum_weights=cumulative)[0]
                new_tokens.append(token)
                logprobs.append(math.log(probs[token]))
                response.append(token)
                if token in stop_tokens:
                    finish_reason = "stop"
                    break
            completions.append(
                Completion(token_ids=new_tokens, logprobs=logprobs, finish_reason=finish_reason)
            )
        return completions

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's weights (`DigitPolicy`: first_digit_probs; `TabularDigitPolicy`: logits)."""
        for name, tensor in named_tensors:
            self.policy.load_weights(name, tensor)
        self._distributions.clear()
