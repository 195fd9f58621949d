"""Turning dataset prompts into the token ids a rollout engine is given.

A prompt is either a string (the user's message) or a list of chat messages
(`[{"role": ..., "content": ...}, ...]`). With a tokenizer that has a chat template (and
`use_chat_template` not turned off) the messages go through the template with the generation
prompt appended; otherwise the message contents are joined as plain text. The authors append an
answer-format instruction to every math prompt ("The answer format must be: \\boxed{...}",
seed 001 / DESIGN.md); here it is a config option added to the last user message.

Prompts longer than `max_prompt_tokens` are skipped and counted, truncated (keeping their end, so
the question's tail and the generation prompt survive) and counted, or refused, as configured;
never passed on silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

from megatron_spo.errors import UserError

Message = dict[str, str]
OVERLONG_POLICIES = ("skip", "truncate", "error")


@dataclasses.dataclass(kw_only=True)
class PromptConfig:
    answer_format_suffix: str = "\n\nThe answer format must be: \\boxed{...}"
    """Appended to the last user message; "" disables it. The default is the authors' instruction
    (seed 001), separated from the question by a blank line."""
    use_chat_template: Literal["auto", "always", "never"] = "auto"
    """"auto" applies the tokenizer's chat template when it has one; "always" requires one;
    "never" sends plain text (message contents joined by blank lines)."""
    max_prompt_tokens: int = 2048
    """Prompt length limit in tokens; 2048 holds long competition-math statements plus the
    chat template with room to spare."""
    overlong: Literal["skip", "truncate", "error"] = "skip"
    """What happens to a longer prompt: "skip" it (counted), "truncate" it to its last
    `max_prompt_tokens` tokens (counted), or "error" (stop with the prompt's index)."""

    def __post_init__(self):
        if self.use_chat_template not in ("auto", "always", "never"):
            raise UserError(
                f"prompt.use_chat_template: {self.use_chat_template!r} is not one of auto, always, never"
            )
        if self.overlong not in OVERLONG_POLICIES:
            raise UserError(f"prompt.overlong: {self.overlong!r} is not one of {', '.join(OVERLONG_POLICIES)}")
        if self.max_prompt_tokens < 1:
            raise UserError(f"prompt.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclasses.dataclass(kw_only=True)
class BuiltPrompt:
    index: int
    """Position of the prompt in the input sequence."""
    text: str
    """The full text the model sees (chat-templated when a template was used)."""
    token_ids: list[int]
    truncated: bool = False


@dataclasses.dataclass(kw_only=True)
class PromptBatch:
    prompts: list[BuiltPrompt]
    """Prompts that passed, in input order."""
    skipped: list[int]
    """Input indices of prompts skipped for length."""
    num_truncated: int = 0


def to_messages(prompt: Any, *, where: str = "prompt") -> list[Message]:
    """A string becomes one user message; a list of {"role", "content"} dicts is checked."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
                raise UserError(f"{where}: message {i} is not a {{'role': ..., 'content': str}} dict: {message!r}")
            messages.append({"role": str(message["role"]), "content": message["content"]})
        return messages
    raise UserError(f"{where}: expected a string or a non-empty list of chat messages, got {prompt!r:.80}")


def with_answer_suffix(messages: list[Message], suffix: str) -> list[Message]:
    """Append `suffix` to the last user message (a copy; the input is left alone)."""
    if not suffix:
        return messages
    messages = [dict(m) for m in messages]
    for message in reversed(messages):
        if message["role"] == "user":
            message["content"] += suffix
            return messages
    messages.append({"role": "user", "content": suffix.lstrip()})
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(messages: list[Message], tokenizer, config: PromptConfig) -> str:
    """The text the model sees for `messages` under `config`."""
    use_template = config.use_chat_template == "always" or (
        config.use_chat_template == "auto" and has_chat_template(tokenizer)
    )
    if use_template:
        if not has_chat_template(tokenizer):
            raise UserError(
                "prompt.use_chat_template is 'always' but the tokenizer has no chat template "
                "(set it to 'auto' or 'never')"
            )
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def build_prompts(prompts: Sequence[Any], tokenizer, config: PromptConfig) -> PromptBatch:
    """Render, tokenize and length-check `prompts` (strings or chat-message lists)."""
    built: list[BuiltPrompt] = []
    skipped: list[int] = []
    num_truncated = 0
    for index, prompt in enumerate(prompts):
        messages = with_answer_suffix(to_messages(prompt, where=f"prompt {index}"), config.answer_format_suffix)
        text = render(messages, tokenizer, config)
        # the template already holds any special tokens the model expects
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        truncated = False
        if len(token_ids) > config.max_prompt_tokens:
            if config.overlong == "error":
                raise UserError(
                    f"prompt {index} has {len(token_ids)} tokens, more than prompt.max_prompt_tokens="
                    f"{config.max_prompt_tokens} (set prompt.overlong to skip or truncate)"
                )
            if config.overlong == "skip":
                skipped.append(index)
                continue
            token_ids = token_ids[-config.max_prompt_tokens :]
            text = tokenizer.decode(token_ids)
            truncated = True
            num_truncated += 1
        built.append(BuiltPrompt(index=index, text=text, token_ids=token_ids, truncated=truncated))
    return PromptBatch(prompts=built, skipped=skipped, num_truncated=num_truncated)


def load_tokenizer(model_dir):
    """The tokenizer saved with a model, as its own class when saved as a plain `tokenizers` file.

    `AutoTokenizer` would substitute the architecture's tokenizer class (e.g. `Qwen2Tokenizer`)
    and its pre-tokenizer, which changes how a custom vocabulary splits text.
    """
    import json
    from pathlib import Path

    import transformers

    config_path = Path(model_dir) / "tokenizer_config.json"
    saved_class = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))
