"""Megatron-Core 0.16's CUDA calls answered by the CPU or the `meta` device (part of
`megatron_spo.platform`).

`_install_compat(target)` installs them: "cpu" for CPU processes over gloo (`platform.install_cpu_compat`),
"meta" for the dry run's simulated GPU (`platform.enter_simulation`). The failure each shim prevents
is listed in the package docstring (`megatron_spo/platform/__init__.py`).
"""

from __future__ import annotations

import contextlib
import types

import torch


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
    """Megatron-Core 0.16's CUDA calls answered by `target` ("cpu" or "meta"; see the package
    docstring for the failure each line prevents). Installed once per process."""
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

