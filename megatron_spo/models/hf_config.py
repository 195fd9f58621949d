"""Read a Hugging Face causal-LM config into `ModelSpec`, the architecture description we build from.

Supported: `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` — GQA, QKV bias (Qwen2),
QK-norm (Qwen3), tied embeddings, RoPE theta with default / llama3 / linear scaling, RMSNorm
epsilon, SwiGLU. Anything else fails here, at once, with one message naming the unsupported value
and listing what is supported, before any weight is read.

Transformers 5.x keeps RoPE settings in `config.rope_parameters` (4.x: `rope_theta` and
`rope_scaling`); `AutoConfig` normalises both, and we read only the normalised form.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from megatron_spo.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What the Megatron builder and the weight bridge need to know about a model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()
    """Extra RoPE scaling parameters (llama3: factor, low/high_freq_factor, original length)."""

    @property
    def family(self) -> str:
        return {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[
            self.architecture
        ]

    def rope_param(self, name: str) -> float:
        return dict(self.rope_params)[name]

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None) -> None:
        """Fail with a clear message when the model cannot be split this way."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}")
        if self.num_kv_heads % tp:
            problems.append(f"num_key_value_heads={self.num_kv_heads} is not divisible by TP={tp}")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size} is not divisible by TP={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        chunks = pp * (vpp or 1)
        if self.num_layers % chunks:
            problems.append(
                f"num_hidden_layers={self.num_layers} is not divisible by PP x VPP = {chunks}"
            )
        if problems:
            raise UserError(f"{self.architecture} cannot be split at TP={tp}, PP={pp}: " + "; ".join(problems))


def read_config_json(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"model directory {hf_dir} " + ("is a file, not a directory" if Path(hf_dir).exists()
                                                             else "does not exist"))
    if not path.is_file():
        raise UserError(f"{path} is missing: {hf_dir} is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err


def load_hf_config(hf_dir: str | Path):
    """The transformers config object of `hf_dir`, after checking the architecture is supported."""
    raw = read_config_json(hf_dir)
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{Path(hf_dir) / 'config.json'}: unsupported architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{Path(hf_dir) / 'config.json'}: cannot be read by transformers: {err}") from err


def spec_from_hf_config(config) -> ModelSpec:
    """Translate a transformers config into a `ModelSpec`, refusing what we cannot build exactly."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    where = f"config ({arch})"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def unsupported(key: str, value: Any, supported: str) -> UserError:
        return UserError(f"{where}: unsupported {key}={value!r}; supported: {supported}")

    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise unsupported("hidden_act", act, "silu (SwiGLU)")
    if getattr(config, "mlp_bias", False):
        raise unsupported("mlp_bias", True, "False")
    attention_bias = bool(getattr(config, "attention_bias", False))
    if arch == "Qwen2ForCausalLM":
        qkv_bias = True  # Qwen2 always has q/k/v biases and no o_proj bias
    elif attention_bias:
        # Llama / Qwen3 put the bias on o_proj too, which Megatron's SelfAttention cannot express
        # without biases on every linear layer.
        raise unsupported("attention_bias", True, "False for Llama and Qwen3 (Qwen2 has QKV bias built in)")
    else:
        qkv_bias = False
    if getattr(config, "use_sliding_window", False):
        raise unsupported("use_sliding_window", True, "False (full attention in every layer)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise unsupported("layer_types", sorted(set(layer_types)), "full_attention only")

    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise unsupported("rope_type", rope_type, ", ".join(SUPPORTED_ROPE_TYPES))
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_params: dict[str, float] = {}
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope:
                raise UserError(f"{where}: llama3 RoPE scaling needs rope_parameters.{key}")
            rope_params[key] = float(rope[key])
    elif rope_type == "linear":
        rope_params["factor"] = float(rope["factor"])
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise unsupported("partial_rotary_factor", partial, "1.0")

    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelSpec(
        architecture=arch,
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        ffn_hidden_size=int(config.intermediate_size),
        rms_norm_eps=float(config.rms_norm_eps),
        max_position_embeddings=int(config.max_position_embeddings),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope_params=tuple(sorted(rope_params.items())),
    )


def load_model_spec(hf_dir: str | Path) -> ModelSpec:
    return spec_from_hf_config(load_hf_config(hf_dir))
