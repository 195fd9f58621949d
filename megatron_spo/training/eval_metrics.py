"""Evaluation math as pure functions: accuracy, unbiased pass@k, maj@k.

Inputs are per prompt: the n sampled responses' graded correctness (bool) and, for maj@k, their
extracted final answers (the reward's answer extraction; None when a response has no answer).

- accuracy (avg@n): the mean correctness over all samples of all prompts, i.e. the expected
  accuracy of one sample; with n = 1 it is plain accuracy.
- pass@k: the probability that at least one of k samples is correct, estimated without bias from
  n >= k samples with c correct (Chen et al. 2021, "Evaluating Large Language Models Trained on
  Code", arXiv 2107.03374):  pass@k = 1 - C(n - c, k) / C(n, k), computed as the product
  1 - prod_{i = n - c + 1}^{n} (1 - k / i) so large n does not overflow.
- maj@k: majority vote over the first k samples' extracted answers (responses without an answer
  do not vote); the prompt counts as solved when the voted answer was graded correct. This is the
  metric the SPO paper reports (maj@32). Ties go to the answer whose first vote came earliest,
  so the result does not depend on hashing or sort order. Answers are compared as given (exact
  strings): normalise them first (or pass `key=`) when equal values can be spelled differently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence


def accuracy(correct: Sequence[Sequence[bool]]) -> float:
    """Mean correctness over every sample of every prompt (avg@n)."""
    flat = [bool(c) for per_prompt in correct for c in per_prompt]
    if not flat:
        raise ValueError("accuracy of an empty set of samples is undefined")
    return sum(flat) / len(flat)


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples of which c are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over prompts."""
    if not correct:
        raise ValueError("pass@k of no prompts is undefined")
    return sum(pass_at_k_single(len(c), sum(map(bool, c)), k) for c in correct) / len(correct)


def majority_vote(answers: Sequence[Hashable | None], key: Callable[[Hashable], Hashable] | None = None) -> int | None:
    """Index of the first response carrying the most frequent answer (None if nobody answered).

    Returning an index (not the answer) lets the caller reuse that response's grade.
    """
    counts: dict[Hashable, int] = {}
    first_index: dict[Hashable, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        k = key(answer) if key is not None else answer
        counts[k] = counts.get(k, 0) + 1
        first_index.setdefault(k, i)
    if not counts:
        return None
    winner = max(counts, key=lambda a: (counts[a], -first_index[a]))
    return first_index[winner]


def maj_at_k_single(
    answers: Sequence[Hashable | None],
    correct: Sequence[bool],
    k: int,
    key: Callable[[Hashable], Hashable] | None = None,
) -> bool:
    """Whether the majority answer of the first k samples is correct."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} grades")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj@{k} needs 1 <= k <= n samples, got n={len(answers)}")
    index = majority_vote(answers[:k], key)
    return index is not None and bool(correct[index])


def maj_at_k(
    answers: Sequence[Sequence[Hashable | None]],
    correct: Sequence[Sequence[bool]],
    k: int,
    key: Callable[[Hashable], Hashable] | None = None,
) -> float:
    """Share of prompts whose majority answer over the first k samples is correct."""
    if len(answers) != len(correct) or not answers:
        raise ValueError("maj@k needs the same, non-zero number of prompts in answers and grades")
    return sum(maj_at_k_single(a, c, k, key) for a, c in zip(answers, correct)) / len(answers)


@dataclasses.dataclass(kw_only=True)
class EvalSummary:
    num_prompts: int
    samples_per_prompt: int
    accuracy: float
    """avg@n: mean correctness of single samples."""
    pass_at: dict[int, float]
    """k -> unbiased pass@k."""
    maj_at: dict[int, float]
    """k -> maj@k."""

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/accuracy": self.accuracy}
        out.update({f"{prefix}/pass@{k}": v for k, v in self.pass_at.items()})
        out.update({f"{prefix}/maj@{k}": v for k, v in self.maj_at.items()})
        return out


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself: the usual pass@k / maj@k report."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(
    answers: Sequence[Sequence[Hashable | None]],
    correct: Sequence[Sequence[bool]],
    ks: Sequence[int] | None = None,
    key: Callable[[Hashable], Hashable] | None = None,
) -> EvalSummary:
    """Accuracy, pass@k and maj@k for prompts that each have the same number n of samples."""
    sizes = {len(c) for c in correct}
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    ks = list(ks) if ks is not None else default_ks(n)
    return EvalSummary(
        num_prompts=len(correct),
        samples_per_prompt=n,
        accuracy=accuracy(correct),
        pass_at={k: pass_at_k(correct, k) for k in ks},
        maj_at={k: maj_at_k(answers, correct, k, key) for k in ks},
    )
