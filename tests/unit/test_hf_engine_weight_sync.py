"""Weight sync: one engine call per sync, streaming buckets cut only between decoder layers,
bounded in size, pulled lazily."""

from __future__ import annotations

import torch

from megatron_spo.rollout.weight_sync import WeightSyncConfig, iter_buckets, layer_of, sync_weights

LAYER_TENSORS = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight"]


def stream(num_layers=4, numel=250):
    """embed, then per layer 4 tensors of `numel` fp32 values (1000 bytes each), then norm."""
    yield "model.embed_tokens.weight", torch.zeros(numel)
    for i in range(num_layers):
        for name in LAYER_TENSORS:
            yield f"model.layers.{i}.{name}", torch.zeros(numel)
    yield "model.norm.weight", torch.zeros(numel)


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens.weight"


def test_buckets_never_split_a_layer_and_respect_the_size():
    buckets = list(iter_buckets(stream(), bucket_bytes=9000))  # two layers (8000 B) fit, not three
    names = [[name for name, _ in bucket] for bucket in buckets]
    assert sum(len(n) for n in names) == 1 + 4 * 4 + 1  # everything, once, in order
    assert [n for bucket in names for n in bucket] == [n for n, _ in stream()]
    for bucket in buckets:
        assert sum(t.numel() * 4 for _, t in bucket) <= 9000
    seen_in = {}
    for index, bucket in enumerate(names):
        for name in bucket:
            seen_in.setdefault(layer_of(name), set()).add(index)
    assert all(len(indices) == 1 for indices in seen_in.values())
    # a layer larger than the bucket travels alone
    small = list(iter_buckets(stream(), bucket_bytes=1500))
    assert [len(b) for b in small] == [1, 4, 4, 4, 4, 1]


class RecordingEngine:
    """Consumes the sync's stream, recording at each tensor how many the source had produced."""

    def __init__(self, produced):
        self.produced = produced
        self.calls = 0
        self.seen = []  # (tensors consumed so far, tensors produced by the source then)

    def update_weights(self, named_tensors):
        self.calls += 1
        for _ in named_tensors:
            self.seen.append((len(self.seen) + 1, self.produced[0]))


def test_one_engine_call_per_sync_pulls_the_stream_lazily_and_reports_bytes():
    produced = [0]

    def counting_stream():
        for item in stream(num_layers=6):
            produced[0] += 1
            yield item

    engine = RecordingEngine(produced)
    stats = sync_weights(engine, counting_stream(), WeightSyncConfig(bucket_mb=0.009))
    assert engine.calls == 1  # one engine-side reload per sync, whatever the bucket count
    for consumed, produced_then in engine.seen:
        # pulled ahead of the engine: at most one bucket (9 tensors of 1 kB), the next layer and
        # the tensor that showed the layer had ended
        assert produced_then - consumed <= 9 + len(LAYER_TENSORS) + 1
    assert stats.tensors == len(engine.seen) == 1 + 6 * 4 + 1
    assert stats.bytes == stats.tensors * 1000
    assert stats.buckets == 3  # 1 + 4*6 + 1 kB in two-layer buckets
    assert stats.max_bucket_bytes <= 9000
