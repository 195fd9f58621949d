"""Moving a Megatron model's accelerator state to host memory and back, bit for bit.

While the rollout engine generates, the actor's weights, gradients and optimizer state are idle
(verl's `param_offload` / `grad_offload` / `optimizer_offload` for Megatron workers, which this
follows). Each distinct storage is freed in place (`platform.offload_storage`): parameters, DDP
buffers, master weights and Adam moments are views of a few storages, and every view stays the
same Python object, so Megatron's DDP hooks, the optimizer's parameter groups and the bridge need
no rewiring. Weights, master weights and optimizer moments keep a host copy; gradient buffers
are dropped and come back zeroed (each actor update starts from zero gradients; a main
parameter's `.grad` view of the buffer is cleared and rebuilt by the next optimizer step).
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_spo import platform


class ModelOffloader:
    """The accelerator state of model chunks (DDP-wrapped or plain) and, optionally, their
    Megatron optimizer, moved to host memory by `offload()` and back by `onload()`."""

    def __init__(self, chunks: Iterable[torch.nn.Module], optimizer=None, *, caches: Iterable = ()):
        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.caches = list(caches)  # objects with release_buffers(): device buffers they re-create on use
        self.offloaded = False
        self._saved: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] = []
        self._host: dict[int, torch.Tensor] = {}  # storage -> its pinned host bytes, reused every step

    def _storages(self) -> tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]]:
        """(storages whose bytes are kept, gradient storages that are dropped), each once."""
        keep: dict[int, torch.UntypedStorage] = {}
        drop: dict[int, torch.UntypedStorage] = {}

        def add(into, tensor):
            if isinstance(tensor, torch.Tensor):  # on a CPU-only machine too: host to host, tested there
                storage = tensor.untyped_storage()
                if storage.nbytes() > 0:
                    into.setdefault(storage._cdata, storage)

        for chunk in self.chunks:
            # Megatron DDP's parameter/gradient buffers (instance lists; a plain module has none)
            ddp = vars(chunk)
            for buffer in [*ddp.get("buffers", []), *ddp.get("expert_parallel_buffers", [])]:
                add(keep, buffer.param_data)
                add(drop, buffer.grad_data)
            for param in chunk.parameters():
                add(keep, param)
                add(drop, getattr(param, "main_grad", None))
                add(drop, param.grad)
        for part in self._optimizers():
            for group in part.optimizer.param_groups:
                for param in group["params"]:
                    add(keep, param)  # master weights (or the fp32 model weights themselves)
                    for value in part.optimizer.state.get(param, {}).values():
                        add(keep, value)
        for key in keep:
            drop.pop(key, None)
        return list(keep.values()), list(drop.values())

    def _optimizers(self):
        if self.optimizer is None:
            return []
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def offload(self) -> int:
        """Free the accelerator state; returns the bytes freed. A no-op when already offloaded."""
        if self.offloaded:
            return 0
        for part in self._optimizers():  # .grad views of the gradient buffer: rebuilt every step
            for group in part.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
        for cache in self.caches:
            cache.release_buffers()
        keep, drop = self._storages()
        freed = 0
        for storages, kept in ((keep, True), (drop, False)):
            for storage in storages:
                nbytes = storage.nbytes()
                host = None
                if kept:
                    host = self._host.get(storage._cdata)
                    if host is None or host.numel() != nbytes:
                        host = self._host[storage._cdata] = platform.host_buffer(nbytes)
                platform.offload_storage(storage, host)
                self._saved.append((storage, nbytes, host))
                freed += nbytes
        self.offloaded = True
        platform.release_cached_memory()
        return freed

    def onload(self) -> None:
        """Bring back everything `offload` freed (gradients as zeros). A no-op when resident."""
        if not self.offloaded:
            return
        for storage, nbytes, host in self._saved:
            platform.restore_storage(storage, nbytes, host)
        self._saved = []
        self.offloaded = False
