"""Soft-SPO's off-policy file against the trainer's own prompts (issue 14, items 15-16): text
records are built exactly as dataset prompts are and end with EOS; Q0 belongs to the exact context
a sequence is trained with; the file's rewards get `reward_offset` like every other reward.

Everything runs on scripted stand-ins: a character tokenizer with a toy chat template, an engine
that always answers "4", a grader that compares the answer."""

import json
import math
from types import SimpleNamespace

import pytest

from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.rollout.types import Completion, GenerationResult, Sample
from megatron_spo.training.algorithms.base import AlgorithmSetup, StepContext
from megatron_spo.training.algorithms.soft_spo import (
    SoftSPO,
    SoftSPOConfig,
    check_offpolicy,
    context_key,
    load_offpolicy_jsonl,
)
from megatron_spo.training.config import BatchConfig, RolloutConfig
from megatron_spo.training.data import load_prompts

QUESTION = "What is 2+2?"
PROMPT_CONFIG = PromptConfig(answer_format_suffix=" [boxed]")


class ChatCharTokenizer:
    """One token per character, a toy chat template, EOS = token 0."""

    chat_template = "toy"
    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


TOKENIZER = ChatCharTokenizer()
TEMPLATED = TOKENIZER.encode(f"<user>{QUESTION} [boxed]<assistant>")
BARE = TOKENIZER.encode(QUESTION)  # the question alone: what text records used to become


class AnsweringEngine:
    """Every completion is "4" then EOS; remembers each request's prompt."""

    def __init__(self):
        self.prompts = []

    def generate(self, requests):
        self.prompts += [list(r.prompt_token_ids) for r in requests]
        answer = Completion(token_ids=[ord("4"), 0], logprobs=[-0.1, -0.1], finish_reason="stop", text="4")
        return [GenerationResult(request=r, completions=[answer] * r.params.n) for r in requests]


class ExactGrader:
    """The scoring pool: 1 when the response is the answer, else 0."""

    def score(self, texts, answers):
        return SimpleNamespace(scores=[float(t == a) for t, a in zip(texts, answers)], metrics={})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _dataset_prompt(tmp_path):
    dataset = _write(tmp_path / "train.jsonl", [{"prompt": QUESTION, "answer": "4"}])
    (prompt,), skipped = load_prompts([str(dataset)], "prompt", "answer", TOKENIZER, PROMPT_CONFIG)
    assert skipped == 0 and prompt.token_ids == TEMPLATED
    return prompt


def _one_rank_ctx(engine) -> StepContext:
    """DP = 1: this rank generates every position and keeps every result."""
    return StepContext(step=0, seed=0, dp=1, dp_rank=0, tokenizer=TOKENIZER, engine=engine, scorer=ExactGrader(),
                       plan=lambda owners: SimpleNamespace(generate=list(range(len(owners))), results=None),
                       exchange=lambda held, route: held, actor=None, logprobs=None,
                       reference=SimpleNamespace(export_hf=lambda: {}), load_engine_weights=lambda weights: None)


def test_text_records_are_built_like_dataset_prompts_and_end_with_eos(tmp_path):
    prompt = _dataset_prompt(tmp_path)
    path = _write(tmp_path / "seqs.jsonl", [
        {"prompt": QUESTION, "response": "4", "reward": 1},
        {"prompt": [{"role": "user", "content": QUESTION}], "response": "4\u0000", "reward": 1},
    ])
    text, messages = load_offpolicy_jsonl(path, tokenizer=TOKENIZER, prompt_config=PROMPT_CONFIG)
    # the chat template and the answer-format suffix, as the on-policy prompt has them
    assert text.prompt_token_ids == messages.prompt_token_ids == prompt.token_ids
    assert text.response_token_ids == messages.response_token_ids == [ord("4"), 0]  # EOS once, not twice
    assert text.prompt_key == messages.prompt_key == prompt.key and text.prompt_text == QUESTION


def test_overlong_text_records_follow_the_prompt_length_policy(tmp_path):
    path = _write(tmp_path / "seqs.jsonl", [{"prompt": QUESTION, "response": "4", "reward": 1}])
    short = len(TEMPLATED) - 1
    with pytest.raises(UserError, match=f"{path}:1: prompt 0 has {len(TEMPLATED)} tokens"):
        load_offpolicy_jsonl(path, tokenizer=TOKENIZER,
                             prompt_config=PromptConfig(answer_format_suffix=" [boxed]", max_prompt_tokens=short,
                                                        overlong="error"))
    with pytest.raises(UserError, match=f"all 1 prompts are longer than data.prompt.max_prompt_tokens={short}"):
        load_offpolicy_jsonl(path, tokenizer=TOKENIZER,
                             prompt_config=PromptConfig(answer_format_suffix=" [boxed]", max_prompt_tokens=short))
    (kept,) = load_offpolicy_jsonl(path, tokenizer=TOKENIZER, prompt_config=PromptConfig(
        answer_format_suffix=" [boxed]", max_prompt_tokens=short, overlong="truncate"))
    assert kept.prompt_token_ids == TEMPLATED[1:]  # the end kept, as for dataset prompts


def test_q0_is_per_context_and_file_rewards_are_shifted_like_the_policys(tmp_path):
    prompt = _dataset_prompt(tmp_path)
    path = _write(tmp_path / "seqs.jsonl", [
        # the dataset's question as text: the same templated context as the on-policy prompt
        {"prompt": QUESTION, "response": "4", "reward": 1.0, "answer": "4"},
        # the bare question's tokens, keyed like the dataset prompt, with another answer: another context
        {"prompt_token_ids": BARE, "response_token_ids": [ord("5"), 0], "reward": 0.0, "answer": "5",
         "prompt_key": prompt.key},
    ])
    config = SoftSPOConfig(beta=0.01, q0_num_samples=2, reward_offset=-1.0, offpolicy_files=[str(path)],
                           offpolicy_per_step=2)
    cfg = SimpleNamespace(algorithm=SimpleNamespace(soft_spo=config), data=SimpleNamespace(prompt=PROMPT_CONFIG),
                          rollout=RolloutConfig(n=1), batch=BatchConfig(train_batch_size=1, mini_batch_size=1), seed=0)
    soft = SoftSPO.from_config(cfg, AlgorithmSetup(prompts=[prompt], tokenizer=TOKENIZER))
    engine = AnsweringEngine()
    ctx = _one_rank_ctx(engine)
    soft.before_generation(ctx, [prompt])
    # one reference request per context: the on-policy prompt's (shared with the text record) and the bare one's
    assert sorted(engine.prompts) == sorted([TEMPLATED, BARE])
    rollout = soft.generate(ctx, [prompt])
    assert rollout.contexts == [TEMPLATED, TEMPLATED, BARE]  # the policy's sequence, then the file's two
    # the reference answers "4": right for the templated context (1 - 1 = 0 each, Q0 = 0), wrong for the
    # bare one's "5" (0 - 1 = -1; r / beta clamped at -20: Q0 = 0.01 * -20)
    assert rollout.q0 == pytest.approx([0.0, 0.0, -0.2])
    # task rewards 1 (policy), 1 and 0 (file), each + reward_offset; the reported episode keeps the task's
    assert rollout.rewards == [0.0, 0.0, -1.0] and rollout.episode_rewards == [1.0]
    assert soft.q0 == pytest.approx({context_key(TEMPLATED): 0.0, context_key(BARE): -0.2})


def _sample(token_ids, reward=0.0, **extra):
    return Sample(prompt_key=1, prompt_token_ids=token_ids, response_token_ids=[5], response_logprobs=[math.nan],
                  response_mask=[1], reward=reward, ground_truth="4", extra={"source": f"f:{len(extra)}", **extra})


def test_file_rewards_the_shifted_scale_cannot_hold_are_refused():
    """cross_entropy needs rewards <= 0: a file reward of 1 is fine shifted by -1, refused unshifted."""
    record = _sample([1, 2], reward=1.0)
    with pytest.raises(UserError, match=r"f:0: reward 1.0 \+ algorithm.soft_spo.reward_offset 0.0 > 0"):
        check_offpolicy([record], SoftSPOConfig(loss_type="cross_entropy"))
    assert check_offpolicy([record], SoftSPOConfig(loss_type="cross_entropy", reward_offset=-1.0)) == {}
    assert check_offpolicy([record], SoftSPOConfig()) == {}  # the squared loss takes any reward


def test_file_q0_values_are_per_context_and_must_agree():
    same, other = _sample([1, 2], q0=-0.1), _sample([2, 1], q0=-0.3)
    assert check_offpolicy([same, other, _sample([1, 2], q0=-0.1)], SoftSPOConfig()) == {
        context_key([1, 2]): -0.1, context_key([2, 1]): -0.3}
    with pytest.raises(UserError, match="'q0' -0.2 differs from -0.1"):
        check_offpolicy([same, _sample([1, 2], q0=-0.2)], SoftSPOConfig())
