"""The embedded demo's tokenizer and model, made locally, seeded and deterministic.

The tokenizer is a byte-level BPE trained with `tokenizers` on the synthetic corpus of
`megatron_spo.demo.task` (a few hundred tokens; saved in Hugging Face format with a ChatML template
and <|im_start|>, <|im_end|> (eos) and <|endoftext|> (pad)); the model is a randomly initialised
Qwen2 causal LM with head_dim 32 (vLLM's CPU attention needs >= 32). `build_demo_assets` writes the
task's data files, the tokenizer and the model under one directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from megatron_spo.demo.task import DemoTaskConfig, generate_splits, sft_prompt, write_jsonl, write_parquet

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
# ChatML, as Qwen2 uses; the assistant turn is closed by <|im_end|>, which is the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(kw_only=True)
class TinyModelConfig:
    """The demo's Qwen2 model (random init)."""

    hidden_size: int = 128
    """Width; 128 with 4 heads of 32 keeps head_dim at vLLM's CPU minimum."""
    num_layers: int = 2
    """Transformer blocks; 2 learn the 1-2 step problems within a minute of CPU SFT."""
    num_attention_heads: int = 4
    """Query heads; head_dim = hidden_size / heads must be >= 32 for vLLM's CPU attention."""
    num_key_value_heads: int = 2
    """KV heads (GQA), so the Megatron bridge's grouped-query path is exercised."""
    intermediate_size: int = 384
    """SwiGLU hidden width (3x hidden)."""
    max_position_embeddings: int = 256
    """Prompt + response fit in well under 128 tokens."""
    tie_word_embeddings: bool = False
    """Untied, like Qwen2 models above 1.5B; the bridge handles both."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.hidden_size // self.num_attention_heads < 32:
            raise ValueError(
                f"head_dim = {self.hidden_size // self.num_attention_heads} < 32: vLLM's CPU attention refuses it"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def chat_text(tokenizer, prompt: str, response: str | None = None) -> str:
    """The exact string the model sees: ChatML user turn, assistant header, optional response."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    if response is not None:
        text += response + IM_END
    return text


def encode_sft_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a chat-formatted prompt + response; the mask is 1 on the
    response and its closing <|im_end|>, 0 on the prompt (supervised loss on the answer only)."""
    prompt_ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(chat_text(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat-formatted prompt does not tokenize to a prefix of prompt + response")
    return full_ids, [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))


def train_tokenizer(texts: list[str], out_dir: str | os.PathLike, vocab_size: int = 1024):
    """Byte-level BPE trained on `texts`, saved in HF format in `out_dir`; returns the HF tokenizer.

    Byte-level so any text round-trips (decode(encode(s)) == s); digits are single tokens (see
    below). `vocab_size` is an upper bound: on the demo corpus BPE runs out of pairs to merge
    first, ending with every word as one token (a few hundred tokens in all).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one, as Qwen2's tokenizer splits them: transformers loads a tokenizer saved
    # beside a Qwen2 config as `Qwen2Tokenizer`, which imposes that pre-tokenization; merges
    # learned across digits would never apply after loading.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: str | os.PathLike, tokenizer, cfg: TinyModelConfig | None = None):
    """A random-init Qwen2 causal LM sized for `tokenizer`, saved with `save_pretrained`; returns it."""
    import torch
    import transformers

    cfg = cfg or TinyModelConfig()
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private generator state: building the model must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = transformers.Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


@dataclasses.dataclass(kw_only=True)
class DemoAssets:
    """Where `build_demo_assets` put things."""

    root: Path
    train_jsonl: Path
    val_jsonl: Path
    sft_jsonl: Path
    model_dir: Path
    """HF model + tokenizer (random init), ready for `megatron-spo sft`."""


def build_demo_assets(
    out_dir: str | os.PathLike,
    task: DemoTaskConfig | None = None,
    model: TinyModelConfig | None = None,
    *,
    vocab_size: int = 1024,
) -> DemoAssets:
    """Write data/{train,val,sft}.{jsonl,parquet} and model/ (tokenizer + Qwen2) under `out_dir`."""
    task = task or DemoTaskConfig()
    root = Path(out_dir)
    splits = generate_splits(task)
    data_dir = root / "data"
    for name, records in splits.items():
        write_jsonl(records, data_dir / f"{name}.jsonl")
        write_parquet(records, data_dir / f"{name}.parquet")
    # The tokenizer sees exactly the strings training will show the model (chat-formatted).
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (fail early if missing)

    corpus = [f"user\n{sft_prompt(r['prompt'])}\nassistant\n{r['response']}\n" for r in splits["sft"]]
    corpus += [f"user\n{sft_prompt(r['prompt'])}\nassistant\n" for r in splits["train"]]
    model_dir = root / "model"
    tokenizer = train_tokenizer(corpus, model_dir, vocab_size=vocab_size)
    build_tiny_model(model_dir, tokenizer, model)
    return DemoAssets(
        root=root,
        train_jsonl=data_dir / "train.jsonl",
        val_jsonl=data_dir / "val.jsonl",
        sft_jsonl=data_dir / "sft.jsonl",
        model_dir=model_dir,
    )
