"""Training checkpoints: everything a run needs to continue exactly, written so that a killed
write never leaves a checkpoint that later loads.

A checkpoint is a directory `step_NNNNNNNN/` holding one entry per stateful part:

    model/, optimizer/     the actor (`ActorState`): Megatron distributed checkpoints
    <name>/                each other *sharded* part (an object with `save(dir)` / `load(dir)`,
                           collective), e.g. SPO's value store
    ranks/rankNNNNN.pt     every *small* part's `state_dict()` on this rank (the LR schedule, the
                           prompt order, the algorithm's state, the RNG), pickled, atomically
    trainer_state.json     written last by rank 0: its presence marks the checkpoint complete

The parts implement a small stateful protocol: `state_dict()` / `load_state_dict(state)` for
small per-rank state, `save(directory)` / `load(directory)` for sharded state. `Checkpointer`
writes and reads them, keeps the last `keep_last` complete checkpoints, and deletes incomplete
ones (a killed write) when the next one completes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_spo import atomic
from megatron_spo.errors import UserError

STATE_FILE = "trainer_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ShardedStateful(Protocol):
    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class RNGState:
    """torch's global RNG on this rank."""

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])


class ActorState:
    """The actor's model (with the HF side files that make it convertible) and optimizer (Adam
    moments and fp32 master weights, the distributed optimizer's shards of them, keyed by the
    model's sharded tensors: `optimizer.state_dict()` alone lacks them), plus its LR schedule."""

    def __init__(self, actor, hf_side_dir):
        self.actor, self.hf_side_dir = actor, hf_side_dir

    def save(self, directory: Path) -> None:
        from megatron_spo.models.checkpoint import save_mcore_checkpoint, save_optimizer_checkpoint

        a = self.actor
        save_mcore_checkpoint(a.raw_chunks, a.parallel, directory / "model", hf_side_dir=self.hf_side_dir,
                              architecture=a.spec.architecture, dtype=a.raw_chunks[0].config.params_dtype,
                              overwrite=True)
        _fault_injection_pause(directory)
        save_optimizer_checkpoint(a.optimizer, a.raw_chunks, a.parallel, directory / "optimizer")

    def load(self, directory: Path) -> None:
        from megatron_spo.models.checkpoint import load_mcore_checkpoint, load_optimizer_checkpoint

        load_mcore_checkpoint(self.actor.raw_chunks, directory / "model")
        load_optimizer_checkpoint(self.actor.optimizer, self.actor.raw_chunks, directory / "optimizer")

    def state_dict(self) -> dict:
        return {"scheduler": self.actor.scheduler.state_dict(), "steps": self.actor.steps}

    def load_state_dict(self, state: dict) -> None:
        self.actor.scheduler.load_state_dict(state["scheduler"])
        self.actor.steps = state["steps"]

    def sharded_state_dicts(self) -> dict:
        """The sharded (dist_checkpointing) state dicts `save` writes (the GPU dry run builds them
        on the simulated ranks to measure a checkpoint's memory)."""
        from megatron_spo.models.checkpoint import _sharded_state_dict, optimizer_sharded_state_dict

        chunks = self.actor.raw_chunks
        return {**_sharded_state_dict(chunks),
                **optimizer_sharded_state_dict(self.actor.optimizer, chunks, is_loading=False)}


class Checkpointer:
    """Saves and restores the named stateful parts under `root` (collective over all ranks)."""

    def __init__(self, root: str | Path, parallel, *, keep_last: int):
        self.root, self.parallel, self.keep_last = Path(root), parallel, keep_last

    def complete(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def save(self, step: int, *, sharded: dict[str, ShardedStateful], small: dict[str, Stateful],
             info: dict[str, Any]) -> Path:
        """Write step `step`'s checkpoint; `info` (JSON) goes into the state file written last."""
        par = self.parallel
        final = self.root / f"step_{step:08d}"
        for name, part in sharded.items():
            part.save(final if name == "actor" else final / name)
        rank_dir = final / "ranks"
        rank_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(rank_dir / f"rank{par.rank:05d}.pt",
                           _torch_bytes({name: part.state_dict() for name, part in small.items()}))
        _barrier(par)
        if par.rank == 0:
            atomic.write_json(final / STATE_FILE, {"step": step, "world_size": par.world_size, "tp": par.tp,
                                                   "pp": par.pp, **info})
            self._prune(final)
        _barrier(par)
        return final

    def load_latest(self, *, sharded: dict[str, ShardedStateful], small: dict[str, Stateful]) -> dict | None:
        """Restore every part from the latest complete checkpoint; returns its state-file info
        (None when there is none)."""
        complete = self.complete()
        if not complete:
            return None
        latest = complete[-1]
        info = json.loads((latest / STATE_FILE).read_text())
        par = self.parallel
        if (info["world_size"], info["tp"], info["pp"]) != (par.world_size, par.tp, par.pp):
            raise UserError(
                f"checkpoint {latest} was written at world {info['world_size']} TP {info['tp']} PP {info['pp']}; "
                f"resume it with the same layout (convert its model/ to start a new run at another layout)")
        for name, part in sharded.items():
            part.load(latest if name == "actor" else latest / name)
        states = torch.load(latest / "ranks" / f"rank{par.rank:05d}.pt", weights_only=False)
        for name, part in small.items():
            part.load_state_dict(states[name])
        info["path"] = str(latest)
        return info

    def _prune(self, newest: Path) -> None:
        complete = self.complete()
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob("step_*"):
            if partial not in complete and partial != newest:
                shutil.rmtree(partial, ignore_errors=True)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories whose state file exists (written last), oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("step_*") if (p / STATE_FILE).is_file())


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fault_injection_pause(directory: Path) -> None:
    """Crash-safety testing: with MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT=<step>, the checkpoint of that
    step stalls for a minute after its model is written, so a test can kill the run mid-write."""
    step = os.environ.get("MEGATRON_SPO_FAULT_PAUSE_CHECKPOINT")
    if step is not None and directory.name == f"step_{int(step):08d}":
        time.sleep(60)


def _barrier(par) -> None:
    if par.world_size > 1:
        torch.distributed.barrier()
