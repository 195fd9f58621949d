"""The `vllm.LLM` arguments of each rank's engine (`vllm_engine.llm_arguments`), checked without
vLLM or a GPU: under torchrun every engine sits on its own rank's GPU (`external_launcher`, which
takes cuda:LOCAL_RANK; the `uni` executor would put every rank's engine on GPU 0), spanning its
rollout group of consecutive ranks."""

from __future__ import annotations

import json

import pytest

from megatron_spo.errors import UserError
from megatron_spo.rollout.engine import EngineConfig
from megatron_spo.rollout.vllm_engine import llm_arguments


@pytest.fixture
def config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return lambda tp: EngineConfig(model=str(tmp_path), name="vllm", tensor_parallel_size=tp)


def test_local_rank_3_of_8_at_rollout_tp1_runs_on_gpu_3(config):
    launch = llm_arguments(config(1), world_size=8, rank=3, local_rank=3, gpu=True)
    assert launch.device == "cuda:3"
    assert launch.kwargs["distributed_executor_backend"] == "external_launcher"
    assert launch.kwargs["tensor_parallel_size"] == 1
    assert launch.group_ranks == (3,)


def test_rollout_tp4_on_two_nodes_spans_its_block_of_ranks(config):
    # rank 13 is the 6th GPU of the second node; its engine is ranks 12..15, vLLM's TP group
    launch = llm_arguments(config(4), world_size=16, rank=13, local_rank=5, gpu=True)
    assert launch.device == "cuda:5" and launch.group_ranks == (12, 13, 14, 15)
    assert launch.kwargs["distributed_executor_backend"] == "external_launcher"
    assert launch.kwargs["tensor_parallel_size"] == 4


def test_single_process_uses_uni_and_cpu_under_torchrun_the_gpu_path(config):
    alone = llm_arguments(config(1), world_size=1, rank=0, local_rank=0, gpu=True)
    assert alone.kwargs["distributed_executor_backend"] == "uni" and alone.device == "cuda:0"
    cpu = llm_arguments(config(1), world_size=2, rank=1, local_rank=1, gpu=False)
    assert cpu.kwargs["distributed_executor_backend"] == "external_launcher" and cpu.device == "cpu"
    assert cpu.group_ranks == (1,)
    assert cpu.kwargs["enforce_eager"] and "gpu_memory_utilization" not in cpu.kwargs
    sharded = llm_arguments(config(2), world_size=2, rank=1, local_rank=1, gpu=False)
    assert sharded.kwargs["distributed_executor_backend"] == "external_launcher"


def test_rollout_tp_not_dividing_the_world_is_refused(config):
    with pytest.raises(UserError, match=r"engine.tensor_parallel_size \(3\) must divide the world size 8"):
        llm_arguments(config(3), world_size=8, rank=0, local_rank=0, gpu=True)
