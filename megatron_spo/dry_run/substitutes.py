"""What the dry run puts where a GPU run reads data it does not have here.

Each substitute keeps the real code path and its worst case: the rollout engine answers every
request with the longest response allowed (so every micro-batch fills the token budget), weights
are "read" with the HF checkpoint's shapes but no data (so the bridge's real slicing and copies
run), prompts have the maximum prompt length. Rewards alternate 1, 0 by prompt, so both branches of
every reward-dependent path run. None of them needs the model's weights, tokenizer or the data.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from megatron_spo.rollout.types import Completion, GenerationRequest, GenerationResult, RolloutEngine


@functools.lru_cache(maxsize=None)
def hf_shapes(model_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF tensor name -> (shape, dtype) of the checkpoint that `model_dir/config.json` describes,
    from transformers' own model class instantiated on the meta device (no weights). Cached: the
    loader and the plan's engine size both ask; callers must not change the dict."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # a tied checkpoint stores the embedding only
    return shapes


class ShapeReader:
    """The safetensors reader's interface over shapes only: each read returns a host tensor of the
    requested slice's shape (uninitialised), as safetensors would before the copy to the GPU."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.shapes = shapes
        self.bytes_read = 0

    def check(self, name: str) -> None:
        if name not in self.shapes:
            raise KeyError(f"the HF model class has no tensor {name!r}")

    def shape(self, name: str) -> list[int]:
        return list(self.shapes[name][0])

    def __call__(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        shape, dtype = self.shapes[name]
        shape = list(shape)
        if dim is not None:
            shape[dim] = stop - start
        self.bytes_read += int(np.prod(shape)) * dtype.itemsize
        return torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        pass


def shapes_only_loader(model_dir: str | Path):
    """A `TrainerParts.load_model`: build the model on the accelerator and load it through the
    bridge from a `ShapeReader` (the real load path, without the weights)."""

    def load(path, parallel, *, dtype, seed, recompute="none", sequence_parallel=False):
        from megatron_spo.models.bridge import WeightBridge
        from megatron_spo.models.builder import build_model
        from megatron_spo.models.hf_config import load_model_spec

        spec = load_model_spec(model_dir)
        spec.check_parallel(parallel.tp, parallel.pp, parallel.vpp)
        bridge = WeightBridge(spec, parallel)
        chunks = build_model(spec, parallel, dtype=dtype, seed=seed, recompute=recompute,
                             sequence_parallel=sequence_parallel)
        reader = ShapeReader({k: (s, dtype) for k, (s, _) in hf_shapes(str(model_dir)).items()})
        with torch.no_grad():
            bridge.load_hf(chunks, model_dir, reader=reader)
        return spec, chunks, bridge

    return load


class WorstCaseEngine(RolloutEngine):
    """Every sample runs to `max_tokens` (or the context length): the longest rollout the config
    allows. Token ids cycle through the vocabulary (never an end token in practice); each
    sampled token's log-probability is -1. Weight updates are consumed and counted."""

    def __init__(self, *, vocab_size: int, max_model_len: int | None, live_bytes=None,
                 broadcast_bucket_mb: float | None = None):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.synced_bytes = 0
        self.synced_tensors = 0
        self.broadcast_bucket_mb = broadcast_bucket_mb
        """Set (parallel.rollout_ranks): the weights are packed into device buckets as the trainer
        rank of a disaggregated job broadcasts them (`rollout.remote`), to a group that drops them."""
        self.broadcast_buckets = 0
        self.broadcast_bucket_bytes = 0
        self.live_bytes = live_bytes  # () -> accelerator bytes the trainer holds now
        self.live_at_generate = 0  # the most the trainer held while this engine generated

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self.live_bytes is not None:
            self.live_at_generate = max(self.live_at_generate, self.live_bytes())
        results = []
        for request in requests:
            p = request.params
            room = p.max_tokens
            if self.max_model_len is not None:
                room = min(room, self.max_model_len - len(request.prompt_token_ids))
            completions = []
            for j in range(p.n):
                ids = [(3 + j + t) % self.vocab_size for t in range(room)]
                completions.append(Completion(token_ids=ids, logprobs=[-1.0] * room, finish_reason="length", text=""))
            results.append(GenerationResult(request=request, completions=completions))
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        counted = self._count(named_tensors)
        if self.broadcast_bucket_mb is None:
            for _ in counted:
                pass
            return
        from megatron_spo.rollout import remote
        from megatron_spo.rollout.weight_sync import iter_buckets

        group = _DroppingGroup()
        for bucket in iter_buckets(counted, int(self.broadcast_bucket_mb * 1e6)):
            remote._broadcast_bucket(group, bucket)
            self.broadcast_buckets += 1
            self.broadcast_bucket_bytes = max(self.broadcast_bucket_bytes, group.largest)

    def _count(self, named_tensors):
        for name, tensor in named_tensors:
            self.synced_bytes += tensor.numel() * tensor.element_size()
            self.synced_tensors += 1
            yield name, tensor

    def shutdown(self) -> None:
        pass


class _DroppingGroup:
    """The weight broadcast's group as seen from its root, on the simulated GPU: every tensor must
    be on the device (NCCL carries no host tensors); the bytes go nowhere. A header is a pickle,
    so its bytes are made real (`meta` holds none) the way the root reads its own header back."""

    def __init__(self):
        self.largest = 0

    def rank(self) -> int:
        return 0

    def broadcast(self, tensors, options):
        from megatron_spo import platform
        from megatron_spo.dry_run.audit import DeviceMixError

        for tensor in tensors:
            if tensor.device != platform.device():
                raise DeviceMixError(f"weight broadcast (rollout.remote) on a nccl group got a {tensor.device.type} "
                                     "tensor")
            self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return _Done()


class _Done:
    def wait(self) -> None:
        pass


class SilentTokenizer:
    """The tokenizer calls the trainer makes on generated ids, without a vocabulary."""

    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return ""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return []


@dataclasses.dataclass
class _Scored:
    scores: list[float]
    metrics: dict


class AlternatingScorer:
    """The scoring pool's interface: rewards alternate 1, 0, 1, ... within each scored batch, so
    groups (GRPO), continuations (SPO-chain) and tree leaves (SPO-tree) differ and every
    advantage path carries non-zero values."""

    def score(self, texts: Sequence[str], answers: Sequence[str]) -> _Scored:
        return _Scored(scores=[float(i % 2 == 0) for i in range(len(texts))], metrics={})

    def close(self) -> None:
        pass
