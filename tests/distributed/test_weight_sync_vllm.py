"""vLLM under torchrun (`external_launcher`, the GPU path's executor): one engine at rollout TP=2
over two gloo ranks, or one engine per rank at rollout TP=1, fed by a TP=2 and then a PP=2
Megatron actor through the bridge; greedy outputs equal HF's with the actor's weights on both
ranks. Skipped where vLLM is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from test_weight_sync import LAYOUTS, hf_greedy, make_actor_and_engine_dirs, sync_from_actor  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("rollout_tp", [2, 1])
def test_tp2_and_pp2_actor_sync_into_vllm(spawn, tmp_path, rollout_tp):
    engine_dir, actor_dir = make_actor_and_engine_dirs(tmp_path)
    expected = hf_greedy(actor_dir)
    results = spawn(2, sync_from_actor, engine_dir, actor_dir, "vllm", LAYOUTS, rollout_tp, timeout_s=600)
    for rank, per_layout in enumerate(results):
        for layout, result in per_layout.items():
            assert result["before"] != expected, (rank, layout)
            assert result["after"] == expected, (rank, layout)
            assert result["buckets"] > 1 and result["reloads"] == ["reload_weights"]  # one reload per sync
