"""Pushing the actor's new weights into the rollout engine: one engine-side reload per sync.

The weight bridge (`megatron_spo.models.bridge.export_hf_weights`) turns the actor's TP x PP
shards into a stream of `(hf_name, full_tensor)`; this module consumes that stream lazily in
buckets of about `bucket_mb` megabytes and hands the engine ONE stream of all of them in ONE
`engine.update_weights` call (vLLM's `reload_weights` re-runs its whole-model reload on every
call, so a call per bucket cost about 32 reloads per sync for an 8B model). The engine pulls a
bucket only when it has consumed the previous one, so memory held by the sync stays one bucket
plus one layer (and one tensor), not the model. Buckets are cut only between decoder layers
(`...layers.<i>.`), so a layer's q/k/v or gate/up always travel together.

Each sync reports its wall time and bytes, logged and returned as `WeightSyncStats`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Iterable

import torch

from megatron_spo.errors import UserError
from megatron_spo.rollout.types import RolloutEngine

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class WeightSyncConfig:
    bucket_mb: float = 512.0
    """Megabytes (10**6 bytes) of tensors gathered ahead of the engine (a decoder layer larger
    than this travels alone): the transient memory of a sync, a fraction of a GPU's. All buckets
    of a sync go to the engine in one call."""

    def __post_init__(self):
        if self.bucket_mb <= 0:
            raise UserError(f"weight_sync.bucket_mb must be > 0, got {self.bucket_mb}")


@dataclasses.dataclass(kw_only=True)
class WeightSyncStats:
    seconds: float
    """Wall time from the first pull of the stream to the engine's last update."""
    bytes: int
    """Bytes of tensor data pushed."""
    tensors: int
    buckets: int
    max_bucket_bytes: int
    """Largest bucket pushed: the transient memory the sync needed."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


def layer_of(name: str) -> str:
    """The unit a bucket may not split: `model.layers.3` for that layer's tensors, else the name."""
    match = _LAYER_PREFIX.match(name)
    return match.group(1) if match else name


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterable[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into consecutive buckets of at most `bucket_bytes`,
    cutting only where the layer changes (a layer larger than a bucket travels alone, and the
    tensors of a layer are expected to arrive together, as the bridge exports them). Pulls from
    the stream only as needed."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    layer: list[tuple[str, torch.Tensor]] = []  # the current layer's tensors, not yet placed
    layer_size = 0
    current = None
    for name, tensor in named_tensors:
        if layer and layer_of(name) != current:
            if bucket and size + layer_size > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket += layer
            size += layer_size
            layer, layer_size = [], 0
        current = layer_of(name)
        layer.append((name, tensor))
        layer_size += tensor.numel() * tensor.element_size()
    if bucket and size + layer_size > bucket_bytes:
        yield bucket
        bucket, size = [], 0
    bucket += layer
    if bucket:
        yield bucket


def sync_weights(
    engine: RolloutEngine,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: WeightSyncConfig | None = None,
) -> WeightSyncStats:
    """Push `named_tensors` (HF names, full tensors) into `engine` in one `update_weights` call
    that streams them bucket by bucket."""
    config = config or WeightSyncConfig()
    bucket_bytes = int(config.bucket_mb * 1e6)
    start = time.perf_counter()
    counts = {"bytes": 0, "tensors": 0, "buckets": 0, "max_bucket": 0}

    def stream():
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            counts["bytes"] += size
            counts["tensors"] += len(bucket)
            counts["buckets"] += 1
            counts["max_bucket"] = max(counts["max_bucket"], size)
            yield from bucket
            del bucket  # let the bucket's tensors go before the next one is gathered

    engine.update_weights(stream())
    stats = WeightSyncStats(
        seconds=time.perf_counter() - start,
        bytes=counts["bytes"],
        tensors=counts["tensors"],
        buckets=counts["buckets"],
        max_bucket_bytes=counts["max_bucket"],
    )
    logger.info(
        "weight sync: %d tensors, %.1f MB in %d buckets, %.3f s (%.2f GB/s)",
        stats.tensors,
        stats.bytes / 1e6,
        stats.buckets,
        stats.seconds,
        stats.gb_per_s,
    )
    return stats
