"""Soft Policy Optimization: off-policy RL for LLMs with a soft-Q parameterised policy.

Reference: Cohen et al., "Soft Policy Optimization: Online Off-Policy RL for Sequence Models"
(arXiv 2503.05453) and the authors' number-guessing example. The policy's log-ratio to a frozen
reference is read as a soft advantage, so any sequence (from the current policy, a replay buffer,
or an external file) can be regressed onto its reward:

    A_t  = beta (log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))      completion tokens
    Q_T  = clamp(Q0, -q0_clamp, q0_clamp) + clamp(sum_t A_t, -adv_clamp, adv_clamp)
    squared:        l = (Q_T - r)^2
    cross_entropy:  p = exp(min(Q_T, 0)), q = exp(r),
                    l = -[q min(Q_T, 0) + (1 - q) log(1 - p + 1e-8)]      (rewards r <= 0)
    loss = mean over sequences of l
    Q0   = beta log mean_i exp(clamp(r_i / beta, -20, 0))                  r_i ~ pi_ref(. | x)

computed with logsumexp. The fixed point is log pi_theta = log pi_ref + (r - Q0) / beta, i.e.
pi* proportional to pi_ref exp(r / beta) once Q0 is the soft value beta log E_ref[exp(r / beta)].
The clamp on r / beta assumes rewards in [-20 beta, 0]; outside it Q0 is biased (as the authors').
Deliberate difference: Q0 is per prompt (the authors' example has one prompt, hence one Q0).

Trainer interface (tensors (B, T) over response tokens; mask 0 on padding and tool output):

    q0 = estimate_prompt_q0(prompt_token_ids, reference_engine, score_fn, config)   # list, per prompt
    out = soft_spo_loss(logprobs, ref_logprobs, response_mask, rewards, q0_per_sequence, config)
    out.loss.backward()

`logprobs` are teacher-forced under pi_theta (temperature 1), `ref_logprobs` under the frozen
reference. Off-policy sequences from a file: `load_offpolicy_jsonl(path, tokenizer=..., prompt_config=...)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from typing import Literal, Sequence

import numpy as np
import torch

from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from megatron_spo.rollout.records import raw_user_prompt, read_jsonl_objects
from megatron_spo.rollout.types import GenerationRequest, RolloutEngine, Sample, SamplingParams
from megatron_spo.training.algorithms.base import Algorithm
from megatron_spo.training.algorithms.segment_chain import ScoreFn, score_all
from megatron_spo.value.keys import prompt_key as text_prompt_key

SoftLossType = Literal["squared", "cross_entropy"]
logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class SoftSPOConfig:
    """Soft-SPO hyperparameters; defaults are the authors' (arXiv 2503.05453 example).

    One reward scale: the loss and Q0 see every reward as task reward + `reward_offset`. That
    holds for the policy's sequences (scored by the grader), the replay buffer's (kept shifted),
    the reference samples behind Q0, and the off-policy files: a file's "reward" is a task reward
    on the grader's scale (1 / 0 on a binary task, not 0 / -1) and is shifted like the others. A
    file's "q0" is a soft value on the shifted scale (as Q0 is estimated), used as given. With
    `loss_type: cross_entropy` a file whose shifted rewards are > 0 is refused when loaded.
    """

    beta: float = 0.01
    """Softness: the weight of the log-ratio to pi_ref in Q; smaller trusts rewards more.
    Rewards are in reward units, beta in reward units per nat."""
    loss_type: SoftLossType = "squared"
    """`squared` regresses Q_T onto r; `cross_entropy` treats exp(Q_T), exp(r) as probabilities
    (needs rewards <= 0)."""
    q0_clamp: float = 10.0
    """|Q0| is clamped to this (reward units), authors' value."""
    advantage_sum_clamp: float = 10.0
    """|sum_t A_t| is clamped to this (reward units), authors' value; bounds one sequence's pull."""
    q0_exponent_min: float = -20.0
    """Lower clamp of r / beta inside the Q0 estimate (authors' value): a sample worse than
    20 beta below 0 counts as -20 beta, so exp does not underflow to a useless 0."""
    q0_exponent_max: float = 0.0
    """Upper clamp of r / beta inside the Q0 estimate (authors' value; rewards are <= 0)."""
    q0_num_samples: int = 256
    """Samples from pi_ref per prompt for Q0 (authors' value)."""
    cross_entropy_eps: float = 1e-8
    """Inside log(1 - p + eps) of the cross-entropy loss (authors' value)."""
    max_response_tokens: int = 1024
    """Budget of the reference samples drawn for Q0, in tokens."""
    reward_offset: float = 0.0
    """Added to every task reward (policy, off-policy file, Q0's reference samples) before the
    loss and the Q0 estimate. The Q0 clamp and the cross_entropy loss assume rewards <= 0: binary
    {0, 1} rewards want -1.0 (0 for a correct answer, -1 for a wrong one)."""
    offpolicy_files: list[str] = dataclasses.field(default_factory=list)
    """Trainer: external sequences (jsonl, `load_offpolicy_jsonl`) mixed into every step. Text
    prompts are built like the dataset's (`data.prompt`: chat template, answer-format suffix) and
    text responses end with EOS. A record needs its prompt's ground truth as "answer" (to estimate
    Q0 from reference samples) or a "q0" value of its own (records of one context must agree)."""
    offpolicy_per_step: int = 0
    """Trainer: external sequences added to each step (drawn without replacement, seeded)."""
    replay_buffer_size: int = 0
    """Trainer: the most recent policy sequences kept per rank for replay; 0 = no replay."""
    replay_per_step: int = 0
    """Trainer: sequences drawn from the replay buffer into each step, per rank."""

    def __post_init__(self):
        if self.offpolicy_per_step < 0 or self.replay_buffer_size < 0 or self.replay_per_step < 0:
            raise ValueError("offpolicy_per_step, replay_buffer_size and replay_per_step must be >= 0")
        if self.offpolicy_per_step and not self.offpolicy_files:
            raise ValueError("offpolicy_per_step > 0 needs offpolicy_files")
        if self.replay_per_step and not self.replay_buffer_size:
            raise ValueError("replay_per_step > 0 needs replay_buffer_size > 0")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in ("squared", "cross_entropy"):
            raise ValueError(f"loss_type must be 'squared' or 'cross_entropy', got {self.loss_type!r}")
        if self.q0_exponent_min > self.q0_exponent_max:
            raise ValueError("q0_exponent_min must be <= q0_exponent_max")
        if self.q0_num_samples < 1 or self.max_response_tokens < 1:
            raise ValueError("q0_num_samples and max_response_tokens must be >= 1")


@dataclasses.dataclass(kw_only=True)
class SoftSPOLossOutput:
    loss: torch.Tensor
    """Scalar: mean over sequences of the per-sequence loss."""
    per_sequence_loss: torch.Tensor
    """(B,)"""
    q_terminal: torch.Tensor
    """(B,) Q_T, detached."""
    advantage_sum: torch.Tensor
    """(B,) unclamped sum_t A_t, detached."""


def soft_token_advantages(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """(B, T) A_t = beta (log pi_theta - log pi_ref), 0 where mask is 0."""
    return beta * (logprobs - ref_logprobs) * mask.to(logprobs.dtype)


def terminal_q(
    token_advantages: torch.Tensor, q0: torch.Tensor | float, config: SoftSPOConfig
) -> torch.Tensor:
    """(B,) Q_T = clamp(Q0) + clamp(sum_t A_t); q0 is a scalar or (B,)."""
    q0 = torch.as_tensor(q0, dtype=token_advantages.dtype, device=token_advantages.device)
    return q0.clamp(-config.q0_clamp, config.q0_clamp) + token_advantages.sum(dim=-1).clamp(
        -config.advantage_sum_clamp, config.advantage_sum_clamp
    )


def soft_q_loss(q_terminal: torch.Tensor, rewards: torch.Tensor, config: SoftSPOConfig) -> torch.Tensor:
    """(B,) per-sequence loss of Q_T against rewards (module docstring)."""
    if config.loss_type == "squared":
        return (q_terminal - rewards).square()
    if bool((rewards > 0).any()):
        raise ValueError("the cross_entropy soft-SPO loss needs rewards <= 0 (q = exp(r) is a probability)")
    q_nonpositive = q_terminal.clamp_max(0.0)
    p = q_nonpositive.exp()
    q = rewards.exp()
    return -(q * q_nonpositive + (1.0 - q) * torch.log(1.0 - p + config.cross_entropy_eps))


def soft_spo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    q0: torch.Tensor | float,
    config: SoftSPOConfig,
) -> SoftSPOLossOutput:
    """The soft-SPO loss of a batch: logprobs, ref_logprobs, mask (B, T); rewards, q0 (B,)."""
    rewards = rewards.to(logprobs.dtype)
    advantages = soft_token_advantages(logprobs, ref_logprobs, mask, config.beta)
    q_t = terminal_q(advantages, q0, config)
    per_sequence = soft_q_loss(q_t, rewards, config)
    return SoftSPOLossOutput(
        loss=per_sequence.mean(),
        per_sequence_loss=per_sequence,
        q_terminal=q_t.detach(),
        advantage_sum=advantages.sum(dim=-1).detach(),
    )


def estimate_q0(rewards: Sequence[float] | torch.Tensor, config: SoftSPOConfig) -> float:
    """Q0 = beta log mean_i exp(clamp(r_i / beta)) over rewards of pi_ref samples (logsumexp)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if r.numel() == 0:
        raise ValueError("estimate_q0 needs at least one reward")
    exponents = (r / config.beta).clamp(config.q0_exponent_min, config.q0_exponent_max)
    return float(config.beta * (torch.logsumexp(exponents, dim=0) - math.log(r.numel())))


def estimate_prompt_q0(
    prompt_token_ids: Sequence[Sequence[int]],
    reference_engine: RolloutEngine,
    score_fn: ScoreFn,
    config: SoftSPOConfig,
    *,
    seed: int | None = None,
    prompt_seeds: Sequence[int] | None = None,
) -> list[float]:
    """Q0 per prompt from `q0_num_samples` samples of pi_ref (one engine call).

    The engine must serve the reference weights and sample from them as they are (temperature
    1, no top-p / top-k), or Q0 is the soft value of a different policy. Prompt i samples with
    seed `prompt_seeds[i]` when given, else `seed + i`.
    """
    requests = [
        GenerationRequest(
            prompt_token_ids=list(prompt),
            params=SamplingParams(
                n=config.q0_num_samples,
                temperature=1.0,
                top_p=1.0,
                top_k=-1,
                max_tokens=config.max_response_tokens,
                seed=prompt_seeds[i] if prompt_seeds is not None else (None if seed is None else seed + i),
            ),
            request_id=f"soft-spo-q0-{i}",
        )
        for i, prompt in enumerate(prompt_token_ids)
    ]
    results = reference_engine.generate(requests) if requests else []
    scores = iter(score_all(score_fn, [(i, c.token_ids, c.finish_reason)
                                       for i, result in enumerate(results) for c in result.completions]))
    return [estimate_q0([next(scores) for _ in result.completions], config) for result in results]


def context_key(token_ids: Sequence[int]) -> int:
    """A stable 63-bit key of a token sequence (same ids -> same key on every machine). Q0 is keyed
    by the context a sequence is trained with, so two contexts never share a Q0, while an on-policy
    prompt and a file record that template to the same token ids do."""
    digest = hashlib.blake2b(",".join(map(str, token_ids)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def _token_ids_field(record: dict, key: str, where: str) -> list[int]:
    value = record[key]
    is_token_id = lambda t: isinstance(t, int) and not isinstance(t, bool) and t >= 0  # noqa: E731
    if not isinstance(value, list) or not all(is_token_id(t) for t in value):
        raise UserError(f"{where}: '{key}' must be a list of non-negative token ids, got {str(value)[:80]}")
    return value


def _finite(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: '{key}' must be a finite number, got {value!r}")
    return float(value)


def _text_part(record: dict, part: str, where: str, tokenizer):
    if part not in record:
        raise UserError(f"{where}: missing '{part}' (or '{part}_token_ids'); keys: {sorted(record)}")
    if tokenizer is None:
        raise UserError(f"{where}: '{part}' is text but no tokenizer was given; pass one or use '{part}_token_ids'")
    return record[part]


def _prompt_ids(record: dict, where: str, tokenizer, prompt_config: PromptConfig) -> list[int] | None:
    """The context of a record: its "prompt_token_ids" as given, or its "prompt" (text or chat
    messages) built exactly as the trainer builds dataset prompts (chat template, answer-format
    suffix, length policy of `prompt_config`); None when over-long and skipped."""
    if "prompt_token_ids" in record:
        return _token_ids_field(record, "prompt_token_ids", where)
    prompt = _text_part(record, "prompt", where, tokenizer)
    try:
        built = build_prompts([prompt], tokenizer, prompt_config)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    return built.prompts[0].token_ids if built.prompts else None


def _response_ids(record: dict, where: str, tokenizer) -> list[int]:
    """A record's "response_token_ids" as given, or its "response" text encoded on its own (so the
    tokens are exactly the completion) and closed by the tokenizer's EOS, as a finished policy
    response is."""
    if "response_token_ids" in record:
        return _token_ids_field(record, "response_token_ids", where)
    text = _text_part(record, "response", where, tokenizer)
    if not isinstance(text, str):
        raise UserError(f"{where}: 'response' must be a string, got {type(text).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"{where}: the tokenizer has no eos token, which ends a text response")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids if ids and ids[-1] == eos else ids + [eos]


def load_offpolicy_jsonl(
    path: str | os.PathLike, *, tokenizer=None, prompt_config: PromptConfig | None = None
) -> list[Sample]:
    """Read external sequences for soft-SPO training, one JSON object per line:

        {"prompt": "...", "response": "...", "reward": 0.0}
        {"prompt_token_ids": [1, 2], "response_token_ids": [3, 4, 5], "reward": 1.0}

    A text "prompt" (a string or chat messages, as in the dataset) is built as the trainer builds
    its dataset prompts with `prompt_config` (the run's `data.prompt`; default `PromptConfig()`):
    chat template, answer-format suffix, over-long policy (a skipped record is logged). A text
    "response" is encoded alone and ends with `tokenizer.eos_token_id`. Token-id fields are used as
    given. "reward" is a task reward (the trainer adds `reward_offset`). Optional "answer" (the
    prompt's ground truth) and "q0" (its soft value) are kept for the trainer. The prompt key is the
    record's integer "prompt_key" if present, else the value store's key of the prompt's last user
    message (`megatron_spo.value.keys.prompt_key`, as the dataset's), else `context_key` of its
    token ids. Blank lines are skipped. Behaviour log-probabilities are unknown for external data:
    `response_logprobs` are NaN (soft-SPO does not use them). Every problem raises `UserError`
    naming the file and line.
    """
    path, prompt_config = os.fspath(path), prompt_config or PromptConfig()
    try:
        numbered_records = read_jsonl_objects(path)
    except OSError as error:
        raise UserError(f"cannot read off-policy sequences file {path}: {error.strerror}") from None
    samples, skipped = [], 0
    for line_number, record in numbered_records:
        where = f"{path}:{line_number}"
        prompt_ids = _prompt_ids(record, where, tokenizer, prompt_config)
        response_ids = _response_ids(record, where, tokenizer)
        if not response_ids:
            raise UserError(f"{where}: the response is empty")
        if "reward" not in record:
            raise UserError(f"{where}: missing 'reward'; keys: {sorted(record)}")
        reward = _finite(record["reward"], "reward", where)
        prompt_text = None
        if "prompt" in record:
            try:
                prompt_text = raw_user_prompt(record["prompt"])
            except UserError as error:
                raise UserError(f"{where}: 'prompt': {error}") from None
        prompt_key = record.get("prompt_key", None)
        if prompt_key is None:
            prompt_key = context_key(prompt_ids) if prompt_text is None else text_prompt_key(prompt_text)
        elif isinstance(prompt_key, bool) or not isinstance(prompt_key, int):
            raise UserError(f"{where}: 'prompt_key' must be an integer, got {prompt_key!r}")
        if prompt_ids is None:
            skipped += 1
            continue
        samples.append(Sample(
            prompt_key=prompt_key, prompt_token_ids=prompt_ids, response_token_ids=response_ids,
            response_logprobs=[math.nan] * len(response_ids), response_mask=[1] * len(response_ids),
            reward=reward, prompt_text=prompt_text,
            response_text=record.get("response") if isinstance(record.get("response"), str) else None,
            ground_truth=None if record.get("answer") is None else str(record["answer"]),
            extra={"source": where, **({"q0": _finite(record["q0"], "q0", where)} if "q0" in record else {})},
        ))
    too_long = f"longer than data.prompt.max_prompt_tokens={prompt_config.max_prompt_tokens} tokens"
    if skipped:
        logger.warning("%s: %d of %d off-policy records skipped: prompt %s", path, skipped, skipped + len(samples),
                       too_long)
    if not samples:
        raise UserError(f"{path}: no sequences " + (f"(all {skipped} prompts are {too_long})" if skipped
                                                      else "(the file is empty)"))
    return samples


def check_offpolicy(samples: Sequence[Sample], config: SoftSPOConfig) -> dict[int, float]:
    """Refuse off-policy sequences the trainer cannot use; returns the files' Q0 per context key."""
    given_q0: dict[int, tuple[float, str]] = {}
    for s in samples:
        where = s.extra["source"]
        if s.ground_truth is None and "q0" not in s.extra:
            raise UserError(f"{where}: an off-policy sequence needs its prompt's 'answer' "
                            "(to estimate Q0 from reference samples) or a 'q0' value")
        if config.loss_type == "cross_entropy" and s.reward + config.reward_offset > 0:
            raise UserError(f"{where}: reward {s.reward} + algorithm.soft_spo.reward_offset {config.reward_offset} "
                            "> 0, but the cross_entropy loss needs rewards <= 0 (a file's 'reward' is a task "
                            "reward, shifted like the policy's)")
        if "q0" in s.extra:
            key = context_key(s.prompt_token_ids)
            q0, first = given_q0.setdefault(key, (s.extra["q0"], where))
            if q0 != s.extra["q0"]:
                raise UserError(f"{where}: 'q0' {s.extra['q0']} differs from {q0} given at {first} "
                                "for the same context")
    return {key: q0 for key, (q0, _) in given_q0.items()}


class SoftSPO(Algorithm):
    """Soft SPO as a trainer algorithm (`training.algorithms.base`).

    Each step trains on the policy's fresh sequences, this rank's share of `offpolicy_per_step`
    sequences drawn from the external files, and `replay_per_step` sequences from this rank's
    replay buffer of recent policy sequences; every training reward is shifted by `reward_offset`
    (the reported episode rewards keep the task's). Every sequence carries the Q0 of its context
    (`context_key` of its token ids): the file's `q0` where given, else estimated once from
    `q0_num_samples` samples of the frozen reference (loaded into the engine for that, before the
    actor's weights). Log-probs are read at temperature 1: the soft Q is defined on the policy
    itself, whatever sampled the sequence.
    """

    name = "soft_spo"
    needs_reference = True

    def __init__(self, config: SoftSPOConfig, offpolicy: list[Sample], *, rollout, batch, seed: int,
                 tp_group=None):
        from megatron_spo.training.algorithms.grpo import rollout_sampling, tool_agent
        from megatron_spo.training.objectives import SoftObjective

        self.config, self.offpolicy, self.seed = config, offpolicy, seed
        self.given_q0 = check_offpolicy(offpolicy, config)  # context key -> the files' Q0
        self.n = rollout.n
        self.sampling = rollout_sampling(rollout)
        self.agent = tool_agent(rollout, self.sampling)
        self.train_batch_size = batch.train_batch_size
        self.objective = SoftObjective(config=config, tp_group=tp_group)
        self.q0: dict[int, float] = {}  # context key -> soft value of the context under the reference
        self.reference_tokens = 0  # tokens sampled from the reference for Q0
        self.replay: list[dict] = []  # this rank's recent policy sequences

    @classmethod
    def from_config(cls, cfg, setup) -> SoftSPO:
        """Off-policy text records are built with the run's tokenizer and `data.prompt`, as the
        dataset's prompts are."""
        soft = cfg.algorithm.soft_spo
        samples = [s for path in soft.offpolicy_files
                   for s in load_offpolicy_jsonl(path, tokenizer=setup.tokenizer, prompt_config=cfg.data.prompt)]
        return cls(soft, samples, rollout=cfg.rollout, batch=cfg.batch, seed=cfg.seed, tp_group=setup.tp_group)

    @property
    def loss_temperature(self) -> float:
        return 1.0

    # ------------------------------------------------------------------ Q0

    def before_generation(self, ctx, batch) -> None:
        """Q0 of the step's contexts not seen before (policy prompts and drawn file records), from
        the files' `q0` or samples of the reference. Computed once per context (the reference is
        frozen), split over the rollout groups, shared by all ranks."""
        from megatron_spo.training import rollouts

        contexts = [(p.token_ids, p.answer) for p in batch]
        contexts += [(s.prompt_token_ids, s.ground_truth) for s in self.offpolicy_draw(ctx.step)]
        needed: dict[int, tuple[list[int], str]] = {}  # context key -> (context, ground truth)
        for token_ids, answer in contexts:
            key = context_key(token_ids)
            if key in self.q0 or key in needed:
                continue
            if key in self.given_q0:
                self.q0[key] = self.given_q0[key]
            else:
                needed[key] = (token_ids, answer)
        if not needed:
            return
        keys = sorted(needed)
        ctx.load_engine_weights(ctx.reference.export_hf())
        plan = ctx.plan([None] * len(keys))  # every rank needs every Q0
        mine = [keys[i] for i in plan.generate]
        scorer = rollouts.PromptScorer(ctx.scorer, ctx.tokenizer, [needed[k][1] for k in mine],
                                       offset=self.config.reward_offset)
        seeds = [rollouts.step_seed(self.seed + 17, 0, k % (2**31 - 1)) for k in mine]
        counting = rollouts.CountingEngine(ctx.engine)
        values = estimate_prompt_q0([needed[k][0] for k in mine], counting, scorer, self.config, prompt_seeds=seeds)
        # the tokens of the whole call ride with its first prompt, so they are counted once
        found = {i: (value, counting.tokens if j == 0 else 0) for j, (i, value) in enumerate(zip(plan.generate, values))}
        found = ctx.exchange(found, plan.results)
        self.q0.update({keys[i]: value for i, (value, _) in found.items()})
        self.reference_tokens += sum(tokens for _, tokens in found.values())

    # ------------------------------------------------------------------ sequences

    def generate(self, ctx, batch):
        rollout = super().generate(ctx, batch)
        # the training reward is shifted; episode_rewards (reported) keep the task's
        rollout.rewards = [r + self.config.reward_offset for r in rollout.rewards]
        self.add_offpolicy(ctx, rollout)
        return rollout

    def offpolicy_draw(self, step: int) -> list[Sample]:
        """External sequences of a step (the same draw on every rank)."""
        count = min(self.config.offpolicy_per_step, len(self.offpolicy))
        if not count:
            return []
        rng = np.random.default_rng([self.seed, step, 1])
        return [self.offpolicy[i] for i in sorted(rng.choice(len(self.offpolicy), count, replace=False))]

    def add_offpolicy(self, ctx, rollout) -> None:
        """This rank's share of the external sequences, then replayed sequences; the fresh policy
        sequences go into the replay buffer; every sequence gets its context's Q0."""
        from megatron_spo.training.rollouts import Prompt

        soft = self.config
        fresh = [dict(key=p.key, context=c, response=r, mask=m, reward=w)
                 for p, c, r, m, w in zip(rollout.prompts, rollout.contexts, rollout.responses, rollout.masks,
                                         rollout.rewards)]
        for sample in self.offpolicy_draw(ctx.step)[ctx.dp_rank :: ctx.dp]:
            prompt = Prompt(key=sample.prompt_key, raw=sample.prompt_text or "", token_ids=sample.prompt_token_ids,
                            answer=sample.ground_truth or "")
            rollout.add(-1, prompt, sample.prompt_token_ids, sample.response_token_ids, sample.response_mask,
                        sample.response_logprobs, sample.reward + soft.reward_offset)  # a task reward, shifted
        if soft.replay_per_step and self.replay:
            rng = np.random.default_rng([self.seed, ctx.step, 2, ctx.dp_rank])
            picks = rng.choice(len(self.replay), min(soft.replay_per_step, len(self.replay)), replace=False)
            for i in sorted(picks):
                old = self.replay[i]
                prompt = Prompt(key=old["key"], raw="", token_ids=old["context"], answer="")
                rollout.add(-1, prompt, old["context"], old["response"], old["mask"],
                            [float("nan")] * len(old["response"]), old["reward"])
        if soft.replay_buffer_size:
            self.replay = (self.replay + fresh)[-soft.replay_buffer_size :]
        rollout.q0 = [self.q0[context_key(context)] for context in rollout.contexts]

    # ------------------------------------------------------------------ training

    def prepare(self, ctx, rollout, batch, old):
        """The soft-Q regression needs no advantages: rewards and Q0 per sequence."""
        return batch.replace(rewards=torch.tensor(rollout.rewards, dtype=torch.float32),
                             q0=torch.tensor(rollout.q0, dtype=torch.float32)), None

    def after_update(self, ctx, rollout) -> dict[str, float]:
        return {"rollout/reference_tokens": float(self.reference_tokens)}

    def state_dict(self) -> dict:
        return {"replay": self.replay, "q0": dict(self.q0), "reference_tokens": self.reference_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.replay, self.q0 = state["replay"], dict(state["q0"])
        self.reference_tokens = state["reference_tokens"]
