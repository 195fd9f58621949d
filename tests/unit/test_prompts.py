"""Prompt building: chat template or plain text, the answer-format suffix, over-long prompts."""

from __future__ import annotations

import pytest

from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig, build_prompts
from tiny_models import make_tiny_tokenizer

SUFFIX = "\n\nThe answer format must be: \\boxed{...}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def plain_tokenizer(tokenizer):
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    plain.chat_template = None
    return plain


def test_chat_template_with_answer_suffix(tokenizer):
    batch = build_prompts(["What is 1+1?"], tokenizer, PromptConfig())
    [prompt] = batch.prompts
    assert prompt.text == "<|im_start|>user\nWhat is 1+1?" + SUFFIX + "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.token_ids == tokenizer.encode(prompt.text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(prompt.token_ids[0]) == "<|im_start|>"  # one special token
    assert (batch.skipped, batch.num_truncated) == ([], 0)


def test_chat_messages_suffix_goes_to_the_last_user_message(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    [prompt] = build_prompts([messages], tokenizer, PromptConfig(answer_format_suffix=" [boxed]")).prompts
    assert "Q1<|im_end|>" in prompt.text
    assert "Q2 [boxed]<|im_end|>\n<|im_start|>assistant\n" in prompt.text
    assert messages[3]["content"] == "Q2"  # the input is not modified


def test_plain_text_without_a_template_and_without_suffix(plain_tokenizer, tokenizer):
    config = PromptConfig(answer_format_suffix="")
    [prompt] = build_prompts(["What is 1+1?"], plain_tokenizer, config).prompts
    assert prompt.text == "What is 1+1?"
    [forced] = build_prompts(["What is 1+1?"], tokenizer, PromptConfig(answer_format_suffix="", use_chat_template="never")).prompts
    assert forced.text == "What is 1+1?"
    with pytest.raises(UserError, match="no chat template"):
        build_prompts(["x"], plain_tokenizer, PromptConfig(use_chat_template="always"))


def test_overlong_prompts_are_skipped_and_counted(tokenizer):
    config = PromptConfig(answer_format_suffix="", max_prompt_tokens=30)
    batch = build_prompts(["short", "x" * 40, "also short", "y" * 50], tokenizer, config)
    assert [p.index for p in batch.prompts] == [0, 2]
    assert batch.skipped == [1, 3]


def test_overlong_prompts_truncated_keep_their_end(tokenizer):
    config = PromptConfig(answer_format_suffix="", max_prompt_tokens=30, overlong="truncate")
    batch = build_prompts(["short", "x" * 40], tokenizer, config)
    assert batch.num_truncated == 1 and batch.skipped == []
    long = batch.prompts[1]
    assert long.truncated and len(long.token_ids) == 30
    assert long.text.endswith("x<|im_end|>\n<|im_start|>assistant\n")  # the generation prompt survives


def test_overlong_error_and_bad_prompts(tokenizer):
    with pytest.raises(UserError, match="prompt 1 has .* tokens"):
        build_prompts(["a", "b" * 100], tokenizer, PromptConfig(max_prompt_tokens=80, overlong="error"))
    with pytest.raises(UserError, match="prompt 0: message 0"):
        build_prompts([[{"content": "no role"}]], tokenizer, PromptConfig())
    with pytest.raises(UserError, match="prompt 0: expected a string"):
        build_prompts([42], tokenizer, PromptConfig())
    with pytest.raises(UserError, match="prompt.overlong"):
        PromptConfig(overlong="drop")
