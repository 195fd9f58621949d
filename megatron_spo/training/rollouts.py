"""Sample construction of each algorithm: what one data-parallel rank trains on in a step.

Every algorithm turns the step's prompts into a `Rollout` (sequences with masks, rewards and,
where the algorithm has them, per-token advantages or soft values); the trainer then runs the same
forward passes and actor update over it. Only this module and the algorithm's objective
(`training.objectives`) differ between algorithms:

    spo, grpo, soft_spo   n responses per prompt (single turn, or the tool agent loop)
    spo_chain             the same, then K continuations from each cut point's token prefix
                          (`algorithms.segment_chain`), giving per-token segment advantages
    spo_tree              a tree per prompt grown level by level (`algorithms.segment_tree`);
                          every edge with a non-zero advantage is one sequence (with edge
                          replay, at most N per question a step, `algorithms.spo_tree`)
    soft_spo              plus sequences from an external file and a replay buffer

Sampling seeds derive from (run seed, step, position of the prompt in the step's global batch),
so what a prompt generates does not depend on how the batch is split over ranks, and a resumed
run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from megatron_spo.rollout.types import GenerationRequest, Sample, SamplingParams


@dataclasses.dataclass
class Prompt:
    """A training prompt: its value-store key, token ids and ground truth."""

    key: int
    raw: str
    token_ids: list[int]
    answer: str


@dataclasses.dataclass(kw_only=True)
class Sampling:
    """How an algorithm samples: temperature (also the loss's), nucleus, top-k, response budget."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int


@dataclasses.dataclass
class Rollout:
    """This rank's sequences of a step, aligned lists (one entry per sequence)."""

    prompt_index: list[int] = dataclasses.field(default_factory=list)
    """Position of each sequence's prompt in the step's global batch (-1: not from the batch)."""
    prompts: list[Prompt] = dataclasses.field(default_factory=list)
    contexts: list[list[int]] = dataclasses.field(default_factory=list)
    """Tokens before the response: the prompt, or the prompt + the parent prefix (tree edges)."""
    responses: list[list[int]] = dataclasses.field(default_factory=list)
    masks: list[list[int]] = dataclasses.field(default_factory=list)
    """1 on model tokens, 0 on tool output (no gradient)."""
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    """The engine's sampling log-probs (NaN for external sequences)."""
    rewards: list[float] = dataclasses.field(default_factory=list)
    """Training reward of each sequence (tree edges: the child's value)."""
    token_advantages: list[list[float]] | None = None
    """Raw per-response-token advantages (spo_chain, spo_tree)."""
    q0: list[float] | None = None
    """Soft value of each sequence's prompt (soft_spo)."""
    episode_rewards: list[float] = dataclasses.field(default_factory=list)
    """Task rewards of complete responses, for reporting (tree: every leaf)."""
    episode_index: list[int] = dataclasses.field(default_factory=list)
    """Position of each episode's prompt in the step's global batch."""
    generated_tokens: int = 0
    """Tokens the engine produced for these sequences this step (continuations and tree nodes too)."""
    grader_failures: float = 0.0

    def add(self, index: int, prompt: Prompt, context: list[int], response: list[int], mask: list[int],
            logprobs: list[float], reward: float) -> None:
        self.prompt_index.append(index)
        self.prompts.append(prompt)
        self.contexts.append(list(context))
        self.responses.append(list(response))
        self.masks.append(list(mask))
        self.logprobs.append(list(logprobs))
        self.rewards.append(float(reward))

    def __len__(self) -> int:
        return len(self.responses)

    def split(self, positions: Sequence[int]) -> dict[int, Rollout]:
        """One part per prompt position of `positions` (a position without sequences gets an
        empty part), sequences in their order here. The counters (`generated_tokens`,
        `grader_failures`) belong to the whole call that made them, not to one prompt: they ride
        with the first position's part, so parts spread over ranks and summed count them once."""
        if self.q0 is not None:
            raise ValueError("split a rollout before q0 is attached")
        parts = {p: Rollout(token_advantages=None if self.token_advantages is None else []) for p in positions}
        for row, p in enumerate(self.prompt_index):
            part = parts[p]
            part.add(p, self.prompts[row], self.contexts[row], self.responses[row], self.masks[row],
                     self.logprobs[row], self.rewards[row])
            if self.token_advantages is not None:
                part.token_advantages.append(list(self.token_advantages[row]))
        for p, reward in zip(self.episode_index, self.episode_rewards):
            parts[p].episode_rewards.append(reward)
            parts[p].episode_index.append(p)
        if positions:
            first = parts[positions[0]]
            first.generated_tokens, first.grader_failures = self.generated_tokens, self.grader_failures
        return parts

    @classmethod
    def concat(cls, parts: Sequence[Rollout]) -> Rollout:
        """The parts one after another (counters summed); the inverse of `split`."""
        with_advantages = {part.token_advantages is not None for part in parts}
        if len(with_advantages) > 1:
            raise ValueError("cannot concatenate rollouts with and without token advantages")
        out = cls(token_advantages=[] if with_advantages == {True} else None)
        for part in parts:
            for field in ("prompt_index", "prompts", "contexts", "responses", "masks", "logprobs", "rewards",
                          "episode_rewards", "episode_index"):
                getattr(out, field).extend(getattr(part, field))
            if part.token_advantages is not None:
                out.token_advantages.extend(part.token_advantages)
            out.generated_tokens += part.generated_tokens
            out.grader_failures += part.grader_failures
        return out


class PromptScorer:
    """Scores token-id responses to the prompts of a rank's share of the batch, in the worker pool.

    Both call forms of the algorithms' `ScoreFn`: per item, and `score_batch` for many at once.
    `offset` is added to every score (soft-SPO's reward shift)."""

    def __init__(self, pool, tokenizer, answers: Sequence[str], *, offset: float = 0.0):
        self.pool, self.tokenizer, self.answers, self.offset = pool, tokenizer, list(answers), offset
        self.failures = 0.0

    def texts(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.tokenizer.decode(list(ids), skip_special_tokens=True) for ids in token_ids]

    def score_texts(self, texts: Sequence[str], indices: Sequence[int]) -> list[float]:
        if not texts:
            return []
        scored = self.pool.score(list(texts), [self.answers[i] for i in indices])
        self.failures += sum(scored.metrics.get(f"reward/failures_{kind}", 0.0)
                             for kind in ("error", "timeout", "nonfinite"))
        return [s + self.offset for s in scored.scores]

    def score_batch(self, items) -> list[float]:
        return self.score_texts(self.texts([ids for _, ids, _ in items]), [i for i, _, _ in items])

    def __call__(self, index, response_token_ids, finish_reason) -> float:
        return self.score_batch([(index, response_token_ids, finish_reason)])[0]


def step_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of the prompt at `index` of step `step`'s global batch."""
    return (seed * 1_000_003 + (step + 1) * 10_007 + index) % (2**31 - 1)


def generate(engine, tokenizer, scorer: PromptScorer, batch: Sequence[Prompt], mine: Sequence[int], *,
             n: int, sampling: Sampling, seeds: Sequence[int], agent_config=None,
             truncated_reward: float | None = None, train_on_stop_token: bool = True) -> Rollout:
    """n responses to each prompt `batch[i]`, i in `mine`, scored; single turn or the tool agent.

    `scorer.answers` is indexed by position in `batch`; `seeds[i]` seeds prompt `batch[i]`. With
    `truncated_reward` set, a response cut by length scores it ungraded; with
    `train_on_stop_token` false, the stop token ending a finished single-turn response gets mask 0
    (the segment algorithms' reference choices, `algorithms.segment_chain` / `segment_loss`).
    """
    rollout = Rollout()
    if agent_config is not None:
        from megatron_spo.rollout.agent_loop import AgentLoop, AgentTask

        tasks = [AgentTask(prompt_key=batch[i].key, prompt_token_ids=batch[i].token_ids, prompt_text=batch[i].raw,
                           ground_truth=batch[i].answer, seed=seeds[i] + 104_729 * j)
                 for i in mine for j in range(n)]
        samples = AgentLoop(engine, tokenizer, agent_config).run(tasks) if tasks else []
        owners = [i for i in mine for _ in range(n)]
        # grade what the model wrote, not what the code printed (agent_loop's docstring)
        rewards = _score_finished(scorer, [s.extra["model_text"] for s in samples], owners,
                                  [s.finish_reason for s in samples], truncated_reward)
        for i, sample, reward in zip(owners, samples, rewards):
            rollout.add(i, batch[i], sample.prompt_token_ids, sample.response_token_ids, sample.response_mask,
                        sample.response_logprobs, reward)
            rollout.generated_tokens += sum(sample.response_mask)
    else:
        requests = [
            GenerationRequest(prompt_token_ids=batch[i].token_ids, params=SamplingParams(
                n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_tokens=sampling.max_tokens, seed=seeds[i]))
            for i in mine
        ]
        results = engine.generate(requests) if requests else []
        owners = [i for i, result in zip(mine, results) for _ in result.completions]
        completions = [c for result in results for c in result.completions]
        texts = [c.text if c.text is not None else tokenizer.decode(c.token_ids, skip_special_tokens=True)
                 for c in completions]
        rewards = _score_finished(scorer, texts, owners, [c.finish_reason for c in completions], truncated_reward)
        for i, completion, reward in zip(owners, completions, rewards):
            mask = [1] * len(completion.token_ids)
            if not train_on_stop_token and completion.finish_reason == "stop" and mask:
                mask[-1] = 0  # the EOS / stop token the engine returns with the response
            rollout.add(i, batch[i], batch[i].token_ids, completion.token_ids, mask, completion.logprobs, reward)
            rollout.generated_tokens += len(completion.token_ids)
    rollout.episode_rewards = list(rollout.rewards)
    rollout.episode_index = list(rollout.prompt_index)
    rollout.grader_failures = scorer.failures
    return rollout


def _score_finished(scorer: PromptScorer, texts: Sequence[str], owners: Sequence[int],
                    finish_reasons: Sequence[str], truncated_reward: float | None) -> list[float]:
    """Grades of `texts`; with `truncated_reward` set, those cut by length get it ungraded."""
    graded = [j for j, reason in enumerate(finish_reasons) if truncated_reward is None or reason != "length"]
    scores = dict(zip(graded, scorer.score_texts([texts[j] for j in graded], [owners[j] for j in graded])))
    return [scores[j] if j in scores else float(truncated_reward) for j in range(len(texts))]


def attach_chain_advantages(rollout: Rollout, engine, pool, tokenizer, config, old_logprobs,
                            seeds: Sequence[int]) -> None:
    """SPO-chain: per-token segment advantages from K continuations at each cut point.

    `old_logprobs` holds each sequence's response-token log-probs under the actor at the sampling
    temperature; `seeds[i]` seeds the continuations of sequence i. Grader failures of the
    continuations add to `rollout.grader_failures`."""
    from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
    from megatron_spo.training.algorithms.segment_chain import build_chain_samples

    samples = [
        Sample(prompt_key=p.key, prompt_token_ids=ctx, response_token_ids=resp, response_logprobs=lps,
               response_mask=mask, reward=reward)
        for p, ctx, resp, lps, mask, reward in zip(rollout.prompts, rollout.contexts, rollout.responses,
                                                  rollout.logprobs, rollout.masks, rollout.rewards)
    ]
    # continuations of sequence i score against its own prompt: index by sequence
    scorer = PromptScorer(pool, tokenizer, [p.answer for p in rollout.prompts])
    counting = CountingEngine(engine)
    built = build_chain_samples(samples, counting, scorer, config, old_logprobs=old_logprobs, sample_seeds=seeds)
    rollout.grader_failures += scorer.failures
    rollout.token_advantages = [s.extra[TOKEN_ADVANTAGES_KEY] for s in built]
    rollout.generated_tokens += counting.tokens


def tree_rollout(engine, pool, tokenizer, batch: Sequence[Prompt], mine: Sequence[int], config,
                 seeds: Sequence[int]) -> Rollout:
    """SPO-tree: grow a tree per prompt `batch[i]`, i in `mine`; every kept edge becomes a sequence."""
    from megatron_spo.training.algorithms import TOKEN_ADVANTAGES_KEY
    from megatron_spo.training.algorithms.segment_tree import build_tree_samples

    local = [batch[i] for i in mine]
    scorer = PromptScorer(pool, tokenizer, [p.answer for p in local])  # indexed by local position
    counting = CountingEngine(engine)
    samples, roots = build_tree_samples([p.token_ids for p in local], counting, scorer, config,
                                        prompt_keys=list(range(len(local))), prompt_seeds=[seeds[i] for i in mine])
    rollout = Rollout(token_advantages=[], grader_failures=scorer.failures)
    for sample in samples:
        i = mine[sample.prompt_key]  # the local position, given as the key above
        rollout.add(i, batch[i], sample.prompt_token_ids, sample.response_token_ids, sample.response_mask,
                    sample.response_logprobs, sample.reward)
        rollout.token_advantages.append(sample.extra[TOKEN_ADVANTAGES_KEY])
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.is_leaf:
            rollout.episode_rewards.append(node.reward)
            rollout.episode_index.append(mine[node.prompt_index])
        stack.extend(node.children)
    rollout.generated_tokens = counting.tokens
    return rollout


class CountingEngine:
    """Passes requests to an engine and counts the tokens it generates."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, 0

    def generate(self, requests):
        results = self.engine.generate(requests)
        self.tokens += sum(len(c.token_ids) for r in results for c in r.completions)
        return results
