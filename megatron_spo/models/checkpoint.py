"""Model checkpoints: Megatron distributed checkpoints and Hugging Face directories.

A megatron-spo model checkpoint is a directory:

    CKPT/
      model/                         Megatron `dist_checkpointing` (torch_dist), loadable at any TP/PP
      hf/                            the HF config, generation config and tokenizer files
      megatron_spo_checkpoint.json   written last: what, when, at which TP/PP

It is built under a hidden temporary name and renamed at the end, so a directory with the final
name is always complete; a checkpoint without its metadata file, or whose shards are damaged,
is refused with an error naming it.

The HF writer takes the bridge's `(hf_name, tensor)` stream and writes safetensors shards of a
bounded size with an index, plus the config and tokenizer files, so that
`transformers.AutoModelForCausalLM.from_pretrained` loads the result.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_spo import atomic
from megatron_spo.errors import UserError
from megatron_spo.platform import ParallelContext

META_FILE = "megatron_spo_checkpoint.json"
FORMAT = "megatron-spo/mcore-v1"
MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"

# Files of an HF model directory that are not weights: carried over on conversion.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
RUN_RECORD_FILES = ("sft_metrics.jsonl", "sft_config.yaml")
"""Files `megatron-spo sft` writes beside the model in its output: records of that run, not part
of the model, so a model started from it does not inherit them."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; supported: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def copy_hf_side_files(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy config, generation config and tokenizer files (everything but weights)."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(src_dir).iterdir():
        if (not path.is_file() or path.name in WEIGHT_INDEXES or path.name in RUN_RECORD_FILES
                or path.name.endswith(WEIGHT_SUFFIXES)):
            continue
        shutil.copy2(path, dst_dir / path.name)


def _sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _broadcast_path(path: Path | None, parallel: ParallelContext) -> Path:
    if parallel.world_size == 1:
        return path
    holder = [str(path) if path is not None else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    return Path(holder[0])


_WRITER_MANAGER = None  # the Manager serving megatron-core's writer results queue, kept for our lifetime


def _writer_helpers_die_with_us() -> None:
    """megatron-core's checkpoint writer keeps a module-global results queue served by a
    `multiprocessing` Manager process (spawned at the first save, living as long as this one).
    Killed, this process would leave that server (and multiprocessing's resource tracker, which
    waits for it) running for good. Start the server ourselves, before the first save, with
    Linux's parent-death signal set in it, so it dies with this process; then the tracker sees
    its last writer go and exits too. Elsewhere nothing changes."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _WRITER_MANAGER
    if filesystem_async._results_queue is not None:
        return
    _WRITER_MANAGER = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _WRITER_MANAGER.start(initializer=_die_with_parent)
    filesystem_async._results_queue = _WRITER_MANAGER.Queue()


def _die_with_parent() -> None:
    """In a child process: SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG; Linux)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def save_mcore_checkpoint(
    chunks: Sequence[torch.nn.Module],
    parallel: ParallelContext,
    out_dir: str | Path,
    *,
    hf_side_dir: str | Path,
    architecture: str,
    dtype: torch.dtype,
    overwrite: bool = False,
) -> Path:
    """Write the model as a Megatron distributed checkpoint (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    tmp = None
    if parallel.rank == 0:
        if out_dir.exists() and not overwrite:
            raise UserError(f"output {out_dir} already exists (pass --overwrite to replace it)")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_dir_for(out_dir)
        (tmp / MODEL_SUBDIR).mkdir(parents=True)
    tmp = _broadcast_path(tmp, parallel)
    try:
        _writer_helpers_die_with_us()
        dist_checkpointing.save(_sharded_state_dict(chunks), str(tmp / MODEL_SUBDIR))
        if parallel.world_size > 1:
            torch.distributed.barrier()
        if parallel.rank == 0:
            copy_hf_side_files(hf_side_dir, tmp / HF_SUBDIR)
            atomic.write_json(
                tmp / META_FILE,
                {
                    "format": FORMAT,
                    "architecture": architecture,
                    "dtype": dtype_name(dtype),
                    "written_at_tp": parallel.tp,
                    "written_at_pp": parallel.pp,
                    "written_unix_time": time.time(),
                },
            )
            atomic.publish_dir(tmp, out_dir, overwrite=overwrite)
    finally:
        if parallel.rank == 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if parallel.world_size > 1:
            torch.distributed.barrier()
    return out_dir


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The metadata of a complete megatron-spo checkpoint; a clear error for anything else."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint {ckpt_dir} does not exist")
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise UserError(
            f"checkpoint {ckpt_dir} is incomplete or not a megatron-spo checkpoint ({META_FILE} is missing)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path} is not valid JSON: {err}") from err
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT}")
    if not (ckpt_dir / MODEL_SUBDIR).is_dir() or not (ckpt_dir / HF_SUBDIR / "config.json").is_file():
        raise UserError(f"checkpoint {ckpt_dir} is incomplete: {MODEL_SUBDIR}/ or {HF_SUBDIR}/config.json is missing")
    return meta


def load_mcore_checkpoint(chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Load a checkpoint written at any TP/PP into these chunks (collective over all ranks)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    read_checkpoint_meta(ckpt_dir)
    sharded = _sharded_state_dict(chunks)
    try:
        with warnings.catch_warnings():  # torch.distributed.checkpoint's ShardedTensor deprecations
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            loaded = dist_checkpointing.load(sharded, str(ckpt_dir / MODEL_SUBDIR))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP's error is a BaseException
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {ckpt_dir} is corrupt or truncated: {first_line}") from err
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise UserError(
                f"checkpoint {ckpt_dir} does not match the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )


# The distributed optimizer's shard layout: Megatron-LM's default, each rank writes and reads its
# own buckets with no gather (resharding is over DP only; a training checkpoint resumes at the
# layout it was written at). The model-space layout needs `flattened_range`, which
# dist_checkpointing 0.16 refuses.
DISTRIB_OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def optimizer_sharded_state_dict(optimizer, chunks: Sequence[torch.nn.Module], *, is_loading: bool) -> dict:
    """The Megatron optimizer's state as dist_checkpointing sees it, keyed by the model's sharded
    tensors: step, param groups, grad scaler, Adam moments and fp32 master weights (with the
    distributed optimizer, this rank's shards of them)."""
    if is_loading:
        for part in _distributed_parts_on_torch_adam(optimizer):
            if not part.optimizer.state:
                # torch's Adam has no state (so no `step`) before its first step, and the
                # distributed optimizer's state_dict() asserts a step: Megatron's own placeholder
                # step (zero gradients) makes one; the load overwrites every value it writes
                part._init_optimizer_states_with_dummy_values()
    return {"optimizer": optimizer.sharded_state_dict(_sharded_state_dict(chunks), is_loading=is_loading,
                                                       metadata=DISTRIB_OPTIM_SHARDING)}


def save_optimizer_checkpoint(optimizer, chunks: Sequence[torch.nn.Module], parallel: ParallelContext,
                              out_dir: str | Path) -> None:
    """Write the optimizer state as a distributed checkpoint in `out_dir`, replacing anything a
    killed save left there (collective over all ranks). `optimizer.state_dict()` is not enough:
    the distributed optimizer's holds no parameter state."""
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    if parallel.rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    if parallel.world_size > 1:
        torch.distributed.barrier()
    _writer_helpers_die_with_us()
    dist_checkpointing.save(optimizer_sharded_state_dict(optimizer, chunks, is_loading=False), str(out_dir))


def load_optimizer_checkpoint(optimizer, chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Load what `save_optimizer_checkpoint` wrote, at the same TP/PP/DP, after the model's weights
    (collective over all ranks)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"optimizer checkpoint {ckpt_dir} does not exist")
    sharded = optimizer_sharded_state_dict(optimizer, chunks, is_loading=True)
    try:
        with warnings.catch_warnings():  # torch.distributed.checkpoint's ShardedTensor deprecations
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            loaded = dist_checkpointing.load(sharded, str(ckpt_dir))["optimizer"]
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP's error is a BaseException
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"optimizer checkpoint {ckpt_dir} is corrupt or does not match: {first_line}") from err
    with torch.no_grad():  # the distributed optimizer's fp32 master weights of fp32 parameters are views of them
        optimizer.load_state_dict(loaded)
    # torch's Adam under the distributed optimizer: megatron-core 0.16.1's load gives every
    # parameter one shared `step` tensor (Adam then increments it once per parameter), and the
    # dp_reshardable shards copy this rank's placeholder step into it; the step saved with the
    # param groups is the right one, one tensor per parameter as torch's Adam keeps it
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in _distributed_parts_on_torch_adam(optimizer):
        part_state = loaded if len(parts) == 1 else loaded[parts.index(part)]
        (step,) = {group["step"] for group in part_state["optimizer"]["param_groups"]}
        for adam_state in part.optimizer.state.values():
            adam_state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _distributed_parts_on_torch_adam(optimizer) -> list:
    """The DistributedOptimizers in `optimizer` whose inner optimizer is torch's Adam (no
    Transformer Engine or Apex FusedAdam installed: megatron-core then keeps Adam's step per
    parameter, in torch's way)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part for part in parts if isinstance(part, distrib_optimizer.DistributedOptimizer)]


class HFShardWriter:
    """Writes a stream of HF tensors as size-bounded safetensors shards plus an index."""

    def __init__(self, out_dir: Path, *, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # own the bytes: exported tensors may be views of parameters or of a reused bucket
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-{len(self._files) + 1:05d}.safetensors"
        save_file(self._pending, str(self.out_dir / name), metadata={"format": "pt"})
        self._files.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        if len(self._files) == 1:
            (self.out_dir / self._files[0][0]).rename(self.out_dir / "model.safetensors")
            return
        count = len(self._files)
        weight_map = {}
        for i, (name, tensors) in enumerate(self._files, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            (self.out_dir / name).rename(self.out_dir / final)
            weight_map.update({t: final for t in tensors})
        atomic.write_json(
            self.out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
        )


def save_hf_checkpoint(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    hf_side_dir: str | Path,
    dtype: torch.dtype,
    write: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write an HF model directory from a tensor stream (atomically).

    Every rank must drain the stream (it is collective); only the rank with `write=True` writes.
    """
    out_dir = Path(out_dir)
    if not write:
        for _ in named_tensors:
            pass
        return out_dir
    if out_dir.exists() and not overwrite:
        raise UserError(f"output {out_dir} already exists (pass --overwrite to replace it)")
    with atomic.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_files(named_tensors, tmp, hf_side_dir=hf_side_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out_dir


def write_hf_files(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    *,
    hf_side_dir: str | Path,
    dtype: torch.dtype,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write the weights, config and tokenizer of an HF model into existing `directory` (not
    atomic by itself: for a caller that builds a larger output in a staging directory)."""
    directory = Path(directory)
    writer = HFShardWriter(directory, max_shard_bytes=max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    writer.close()
    copy_hf_side_files(hf_side_dir, directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = dtype_name(dtype)
    config.pop("torch_dtype", None)
    atomic.write_json(config_path, config)


def is_mcore_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def hf_side_dir_of(path: str | Path) -> Path:
    """Where config and tokenizer live: the HF dir itself, or a checkpoint's `hf/`."""
    return Path(path) / HF_SUBDIR if is_mcore_checkpoint(path) else Path(path)


def load_pretrained(path: str | Path, parallel: ParallelContext, *, dtype: torch.dtype = torch.float32, seed: int = 1234,
                    recompute: str = "none", sequence_parallel: bool = False):
    """(spec, chunks, bridge) for an HF model directory or a megatron-spo checkpoint, at any TP/PP
    (`recompute`, `sequence_parallel`: the actor's activation memory settings, `build_model`)."""
    from megatron_spo.models.bridge import WeightBridge
    from megatron_spo.models.builder import build_model
    from megatron_spo.models.hf_config import load_model_spec

    if is_mcore_checkpoint(path):
        read_checkpoint_meta(path)
    spec = load_model_spec(hf_side_dir_of(path))
    spec.check_parallel(parallel.tp, parallel.pp, parallel.vpp)
    bridge = WeightBridge(spec, parallel)
    if not is_mcore_checkpoint(path):
        from megatron_spo.models.bridge import SafetensorsReader

        SafetensorsReader(path).close()  # fail on missing weights before building anything
    chunks = build_model(spec, parallel, dtype=dtype, seed=seed, recompute=recompute,
                         sequence_parallel=sequence_parallel)
    if is_mcore_checkpoint(path):
        load_mcore_checkpoint(chunks, path)
    else:
        bridge.load_hf(chunks, path)
    return spec, chunks, bridge
