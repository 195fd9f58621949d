"""Tiny Hugging Face models and a locally built tokenizer, for tests and benchmarks.

Nothing is downloaded: configs are written here, weights are random (seeded), and the tokenizer
is a character-level vocabulary built with `tokenizers` and saved in HF format.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = ("llama", "qwen2", "qwen3")


def make_tiny_tokenizer(out_dir: str | Path):
    """Character-level tokenizer over printable ASCII plus chat special tokens; returns it."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE without merges = one token per character, whitespace included
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str = "qwen2", **overrides):
    """A small HF config of the given family (head_dim 32 so vLLM's CPU attention accepts it)."""
    import transformers

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "llama":
        common.update(attention_bias=False, mlp_bias=False, head_dim=32)
        common.update(overrides)
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        common.update(overrides)
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        common.update(head_dim=32, attention_bias=False)
        common.update(overrides)
        return transformers.Qwen3Config(**common)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Save a randomly initialised tiny HF causal LM (and tokenizer) into `out_dir`; return it."""
    import transformers

    config = tiny_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # HF initialises norms to 1 and biases to 0; perturb them so a mapping mistake shows.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    out_dir = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    if with_tokenizer:
        make_tiny_tokenizer(out_dir)
    return out_dir
