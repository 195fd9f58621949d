"""The simulated world's process groups, and the device rule for their collectives.

Every group is torch's fake process group (`torch.testing._internal.distributed.fake_pg`): no
communication, any world size, one process. Each group remembers the backend it would have on a
GPU cluster ("nccl" unless created with backend="gloo", as Megatron's gloo side groups are), and
every collective checks its tensors against it: NCCL carries only accelerator tensors (`meta`
here), gloo only CPU tensors. A violation raises `DeviceMixError` naming the call site.

Data from other ranks does not exist here. A collective on accelerator tensors has no data to
begin with; on CPU tensors (host-side bookkeeping: the value store, metric sums, rollout records)
and Python objects, every other rank is assumed to hold the same data as this one: all_gather
repeats the local tensor, all_to_all returns what this rank sends (the dry run routes its value-
store prompts to this rank's own shard, so that is exact), all_reduce and broadcast keep the local
value. This is reported once in the dry run's output.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_spo.dry_run.audit import DeviceMixError, call_site

_BACKEND: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_DEFAULT_BACKEND = "nccl"
_INSTALLED = False


def intended_backend(group: Any) -> str:
    """"nccl" or "gloo": what `group` would be on the GPU cluster (None = the default group)."""
    if group is None or group is dist.group.WORLD:
        return _DEFAULT_BACKEND
    return _BACKEND.get(group, _DEFAULT_BACKEND)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """The default group of the simulated world (NCCL on the cluster), with checked collectives."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    _install()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def _new_group(original: Callable, ranks=None, timeout=None, backend=None, pg_options=None, **kwargs):
    group = original(ranks=ranks, timeout=timeout, backend="fake", **kwargs)
    if group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER:
        name = str(backend).lower() if backend is not None else _DEFAULT_BACKEND
        _BACKEND[group] = "gloo" if "gloo" in name and "nccl" not in name else "nccl"
    return group


def _check(op: str, group: Any, tensors: list) -> None:
    backend = intended_backend(group)
    want = "meta" if backend == "nccl" else "cpu"
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != want:
            site, user_site = call_site()
            where = site if user_site in (None, site) else f"{site} (called from {user_site})"
            raise DeviceMixError(
                f"{op} on a {backend} group got a {t.device.type} tensor {tuple(t.shape)} at {where}: "
                f"{backend} carries {'GPU' if want == 'meta' else 'CPU'} tensors only"
            )


def _tensors_of(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_of(v)]
    return []


def _checked(name: str, tensor_args: tuple[str, ...], mirror: Callable | None = None):
    """Wrap torch.distributed.<name>: check devices of `tensor_args`; on CPU tensors apply
    `mirror` (the every-rank-alike emulation) instead of the fake collective."""
    original = getattr(dist, name)
    import inspect

    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        group = bound.arguments.get("group")
        tensors = [t for a in tensor_args for t in _tensors_of(bound.arguments.get(a))]
        _check(name, group, tensors)
        if mirror is not None and tensors and all(t.device.type == "cpu" for t in tensors):
            mirror(bound.arguments)
            return _DoneWork() if bound.arguments.get("async_op") else None
        return original(*args, **kwargs)

    return wrapped


class _DoneWork:
    """What an async collective returns once it has completed."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _mirror_all_gather(a):
    for out in a["tensor_list"]:
        out.copy_(a["tensor"])


def _mirror_all_gather_into_tensor(a):
    out, inp = a["output_tensor"], a["input_tensor"]
    out.view(-1, *inp.shape).copy_(inp.unsqueeze(0).expand(out.numel() // max(inp.numel(), 1), *inp.shape))


def _mirror_all_to_all_single(a):
    out, inp = a["output"], a["input"]
    if out.shape == inp.shape:
        out.copy_(inp)
    else:
        out.zero_()


def _mirror_all_to_all(a):
    for out, inp in zip(a["output_tensor_list"], a["input_tensor_list"]):
        out.copy_(inp) if out.shape == inp.shape else out.zero_()


def _keep(a):
    return None


def _all_gather_object(object_list, obj, group=None):
    object_list[:] = [obj] * len(object_list)


def _broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    return None


def _gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
    if object_gather_list is not None:
        object_gather_list[:] = [obj] * len(object_gather_list)


def _p2p(name: str):
    original = getattr(dist, name)

    @functools.wraps(original)
    def wrapped(tensor, *args, **kwargs):
        _check(name, kwargs.get("group"), [tensor])
        return original(tensor, *args, **kwargs)

    return wrapped


def _batch_isend_irecv(original):
    @functools.wraps(original)
    def wrapped(p2p_op_list):
        # torch batches through a coalescing manager keyed by device type, which has no meta
        # backend: each op is issued on its own (same peers, groups and tensors, checked)
        for op in p2p_op_list:
            _check("batch_isend_irecv", op.group, [op.tensor])
        return [op.op(op.tensor, op.peer, op.group, op.tag) if op.peer is not None
                else op.op(op.tensor, None, op.group, op.tag, op.group_peer) for op in p2p_op_list]

    return wrapped


class _Coalesced:
    def __init__(self):
        self.works: list = []

    def wait(self) -> None:
        for work in self.works:
            if work is not None:
                work.wait()


@contextlib.contextmanager
def _coalescing_manager(group=None, device=None, async_ops=False):
    """torch's coalescing manager issues `*_coalesced_` c10d ops, which have no meta kernel: in
    the dry run each collective inside runs on its own (same devices, same groups, checked)."""
    yield _Coalesced()


def _install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    dist.new_group = functools.partial(_new_group, dist.new_group)
    dist._coalescing_manager = _coalescing_manager
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer._coalescing_manager = _coalescing_manager
    table = {
        "all_reduce": (("tensor",), _keep),
        "broadcast": (("tensor",), _keep),
        "reduce": (("tensor",), _keep),
        "all_gather": (("tensor_list", "tensor"), _mirror_all_gather),
        "all_gather_into_tensor": (("output_tensor", "input_tensor"), _mirror_all_gather_into_tensor),
        "_all_gather_base": (("output_tensor", "input_tensor"), _mirror_all_gather_into_tensor),
        "reduce_scatter": (("output", "input_list"), None),
        "reduce_scatter_tensor": (("output", "input"), None),
        "_reduce_scatter_base": (("output", "input"), None),
        "all_to_all_single": (("output", "input"), _mirror_all_to_all_single),
        "all_to_all": (("output_tensor_list", "input_tensor_list"), _mirror_all_to_all),
    }
    for name, (tensor_args, mirror) in table.items():
        if hasattr(dist, name):
            setattr(dist, name, _checked(name, tensor_args, mirror))
    from torch.distributed import distributed_c10d

    for name in ("send", "recv", "isend", "irecv"):
        wrapped = _p2p(name)
        setattr(dist, name, wrapped)
        setattr(distributed_c10d, name, wrapped)  # P2POp accepts only these two by identity
    dist.batch_isend_irecv = _batch_isend_irecv(dist.batch_isend_irecv)
    dist.all_gather_object = _all_gather_object
    dist.broadcast_object_list = _broadcast_object_list
    dist.gather_object = _gather_object
    _INSTALLED = True
