"""Choosing and configuring a rollout engine.

`EngineConfig` is the one config both engines read; `make_engine(config)` builds the engine it
names. The `hf` engine (plain transformers, `hf_engine.py`) is the embedded default and runs
anywhere; the `vllm` engine (`vllm_engine.py`) is imported only when asked for, so a machine
without vLLM never pays its import.

Helpers shared by both engines live here too: the stop-string check and the finish-reason rule,
so both engines end a sample at the same token for the same reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Sequence

from megatron_spo.errors import UserError
from megatron_spo.rollout.types import RolloutEngine

ENGINES = ("hf", "vllm")


@dataclasses.dataclass(kw_only=True)
class EngineConfig:
    model: str
    """Hugging Face model directory (config.json, weights, tokenizer)."""
    name: Literal["hf", "vllm"] = "hf"
    """Which engine: `hf` (transformers, the CPU default) or `vllm` (in-process vllm.LLM)."""
    dtype: str = "float32"
    """Compute dtype of the engine's weights; float32 on CPU so results match training exactly."""
    seed: int = 0
    """Seed of the engine's own generator, used by requests that carry no seed."""
    max_model_len: int | None = None
    """Prompt + response tokens at most; None takes the model's max_position_embeddings."""
    max_num_seqs: int = 256
    """Sequences decoded together in one batch (hf) or scheduled at once (vllm)."""
    load_weights: bool = True
    """Load weights from `model`; False builds the model from its config with random weights,
    for engines whose weights always arrive through `update_weights` (the trainer's case)."""
    tensor_parallel_size: int = 1
    """vllm: rollout tensor parallelism R, dividing the torchrun world size: one engine per block
    of R consecutive ranks (vLLM's `external_launcher`; 1 = one engine per rank, on that rank's
    own GPU), every rank of a block sending it the same requests. May differ from the actor's TP:
    weights arrive as full HF tensors."""
    kv_cache_gib: int = 1
    """vllm on CPU: KV-cache memory in whole GiB (VLLM_CPU_KVCACHE_SPACE); 1 GiB is plenty for
    tiny models and tests, real models want tens."""
    gpu_memory_utilization: float = 0.5
    """vllm on GPU: fraction of device memory vLLM may take; 0.5 leaves the rest to the
    colocated Megatron actor."""
    enable_sleep_mode: bool = False
    """vllm on GPU: allow `sleep()` to free weights and KV cache while the actor trains."""

    def __post_init__(self):
        if self.name not in ENGINES:
            raise UserError(f"engine.name: unknown engine {self.name!r}; valid: {', '.join(ENGINES)}")
        if not (Path(self.model) / "config.json").is_file():
            raise UserError(f"engine.model: {self.model} is not a Hugging Face model directory (no config.json)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"engine.dtype: {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.max_num_seqs < 1:
            raise UserError(f"engine.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.tensor_parallel_size < 1:
            raise UserError(f"engine.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


def make_engine(config: EngineConfig) -> RolloutEngine:
    """Build the engine `config.name` names."""
    if config.name == "hf":
        from megatron_spo.rollout.hf_engine import HFEngine

        return HFEngine(config)
    from megatron_spo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(config)


def find_stop_string(text: str, stops: Sequence[str], new_chars: int) -> int | None:
    """End offset (exclusive) in `text` of the first stop string that ends within the last
    `new_chars` characters, or None. Only the newest characters can complete a stop string that
    earlier checks did not already find, so older matches are not looked at again."""
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at + len(stop) < best):
            best = at + len(stop)
    return best
