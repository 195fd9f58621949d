"""Strict devices and measured memory for the dry run: one `TorchDispatchMode` sees every op.

Devices: an op whose tensor arguments mix accelerator (`meta`) and CPU tensors raises
`DeviceMixError` with the call site, as CUDA would (meta kernels skip some of these checks: an
embedding takes CPU ids into a meta weight without complaint). Allowed, as on CUDA: a 0-dim CPU
tensor beside accelerator tensors (a scalar), explicit copies between devices (`copy_`,
`_to_copy`: host-to-device and device-to-host transfers) and CPU index tensors into an
accelerator tensor.

Memory: every accelerator storage an op creates is counted from its creation until Python drops
its last reference (a `weakref.finalize` on the storage): `live` bytes now, `peak` since the last
`reset_peak()`. Nothing is estimated by formula.

Data the accelerator would hold cannot be read back: `.item()` on a meta tensor returns 0 (False
for booleans) and a copy from meta to CPU yields -1 for floats (see `_host_copy`), 0 otherwise. Each such site is recorded in
`substitutions` and printed, so the output says where the step ran on a substitute value.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

_TORCH_DIR = os.path.dirname(torch.__file__)
_DRY_RUN_DIR = os.path.dirname(__file__)
_PACKAGE_DIR = os.path.dirname(_DRY_RUN_DIR)
_PLATFORM_DIR = os.path.join(_PACKAGE_DIR, "platform") + os.sep  # its shims stand in for torch's own calls


class DeviceMixError(RuntimeError):
    """An op or collective got tensors on devices the GPU run would refuse."""


def call_site() -> tuple[str, str | None]:
    """(innermost frame outside torch and this package, innermost frame in megatron_spo itself)
    as "file:line"; the second is None when the stack never passes through megatron_spo."""
    site = user = None
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename
        if (path.startswith(_TORCH_DIR) or path.startswith(_DRY_RUN_DIR) or path.startswith(_PLATFORM_DIR)
                or "/contextlib.py" in path):
            continue
        where = f"{os.path.relpath(path) if path.startswith(os.getcwd()) else path}:{frame.lineno}"
        if site is None:
            site = where
        if path.startswith(_PACKAGE_DIR):
            user = where
            break
    return site or "<unknown>", user


# ops that legitimately take tensors on two devices (transfers; CPU indices)
_TRANSFERS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
              aten._copy_from_and_resize.default, aten.lift_fresh.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
             aten._index_put_impl_.default}


class Audit(TorchDispatchMode):
    """Strict devices + live/peak accelerator bytes + substitutions (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, int] = {}
        self.substitutions: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ memory

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.peak

    @contextlib.contextmanager
    def measure(self):
        """Peak bytes above the live bytes at entry, inside the block (`.base`, `.peak_above`).
        Nests: the enclosing peak still sees everything inside."""
        outer_peak = self.peak
        m = types.SimpleNamespace(base=self.live, peak_above=0)
        self.peak = self.live
        try:
            yield m
        finally:
            m.peak_above = self.peak - m.base
            self.peak = max(outer_peak, self.peak)

    def _track(self, out) -> None:
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._storages:
                continue
            nbytes = storage.nbytes()
            self._storages[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key)

    def resized(self, storage: torch.UntypedStorage, delta: int) -> None:
        """A tracked storage shrank or grew in place (offload to host and back)."""
        key = storage._cdata
        if key in self._storages:
            self._storages[key] += delta
            self.live += delta
            self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    @staticmethod
    def storage_bytes(tensors) -> int:
        """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
        seen: dict[int, int] = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
        return sum(seen.values())

    # ------------------------------------------------------------------ devices

    def _substitute(self, what: str) -> None:
        site, user = call_site()
        self.substitutions[f"{what} at {site}" + (f" (from {user})" if user and user != site else "")] += 1

    def _host_copy(self, out: torch.Tensor) -> torch.Tensor:
        """A GPU -> CPU copy: floats become -1 (read as log-probabilities, p = 0.37 < 0.9: every
        token is "low-probability", the worst case for segment cut points and masks), other
        dtypes 0."""
        floating = out.dtype.is_floating_point
        self._substitute(f"GPU -> CPU copy -> {'-1' if floating else '0'}")
        return out.fill_(-1 if floating else 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_meta = [t for t in tensors if t.device.type == "meta"]
        if func is aten._local_scalar_dense.default and on_meta:
            self._substitute(".item() of a GPU tensor -> 0")
            dtype = on_meta[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        if on_meta:
            if func is aten._to_copy.default and str(kwargs.get("device", "meta")) == "cpu":
                src = args[0]
                return self._host_copy(torch.empty(src.shape, dtype=kwargs.get("dtype") or src.dtype))
            if func is aten.copy_.default and args[0].device.type == "cpu":
                return self._host_copy(args[0])
            if func not in _TRANSFERS:
                cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
                if func in _INDEXING:
                    cpu = [t for t in cpu if t is args[0] or (len(args) > 2 and t is args[2])]
                if cpu:
                    site, user = call_site()
                    where = site if user in (None, site) else f"{site} (called from {user})"
                    raise DeviceMixError(
                        f"{func} mixes GPU and CPU tensors (a CPU tensor of shape {tuple(cpu[0].shape)}) at "
                        f"{where}: on a GPU this raises 'Expected all tensors to be on the same device'"
                    )
        out = func(*args, **kwargs)
        self._track(out)
        return out
