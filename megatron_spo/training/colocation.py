"""Who holds the accelerator in a colocated step: the rollout engine or the actor.

The order follows verl's colocated Megatron + vLLM workers (`rollout_mode`): the actor keeps its
weights while the engine wakes its own (`wake_up(["weights"])`) and takes a weight sync; then the
actor's weights, gradients and optimizer state go to host memory, the engine wakes its KV cache
(`wake_up(["kv_cache"])`) and generates; then the engine sleeps at level 2 (weights and KV cache
dropped; the next sync refills the weights) and the actor comes back before it computes.

    phase       engine                 actor (offload_actor)    what this class is asked
    sync        weights awake          resident                 for_sync()
    generate    weights + KV awake     on host                  for_generation()
    training    asleep                 resident                 for_training()

Each call moves only what is not already where it should be, so callers ask for the phase they
are about to run (evaluation and soft SPO's reference rollouts included). With neither setting
on, nothing moves and the engine keeps its memory throughout.
"""

from __future__ import annotations

import contextlib
import time

from megatron_spo.rollout.types import RolloutEngine
from megatron_spo.training.offload import ModelOffloader


class Colocation:
    def __init__(self, engine: RolloutEngine, models: list[ModelOffloader], *, sleep_engine: bool,
                 offload_models: bool):
        self.engine = engine
        self.models = models
        self.sleep_engine = sleep_engine
        self.offload_models = offload_models
        self.engine_awake: set[str] = {"weights", "kv_cache"}  # engines start awake
        self.events: list[str] = []  # what moved, in order (tests and the dry run read it)
        self.seconds = 0.0  # spent moving things since the last take_seconds()

    def take_seconds(self) -> float:
        """Seconds spent offloading, onloading, sleeping and waking since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    @contextlib.contextmanager
    def _timed(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t

    def _wake(self, tags: list[str]) -> None:
        missing = [t for t in tags if t not in self.engine_awake]
        if missing:
            with self._timed():
                self.engine.wake_up(missing)
            self.engine_awake.update(missing)
            self.events.append("engine.wake_up(" + ",".join(missing) + ")")

    def _onload(self) -> None:
        if any(m.offloaded for m in self.models):
            with self._timed():
                for model in self.models:
                    model.onload()
            self.events.append("models.onload")

    def for_sync(self) -> None:
        """The actor exports its weights into the engine: the actor resident, the engine's
        weights awake (an engine awake with its KV cache first sleeps, so the cache's memory is
        not held beside the resident actor)."""
        if self.sleep_engine and "kv_cache" in self.engine_awake:
            self._sleep()
        self._onload()
        if self.sleep_engine:
            self._wake(["weights"])

    def for_generation(self) -> None:
        """The engine generates: the models on host (offload_models), the engine fully awake."""
        if self.offload_models and not all(m.offloaded for m in self.models):
            with self._timed():
                freed = sum(model.offload() for model in self.models)
            self.events.append(f"models.offload({freed} bytes)")
        if self.sleep_engine:
            self._wake(["weights", "kv_cache"])

    def for_training(self, *, keep_engine: bool = False) -> None:
        """The actor computes: the engine asleep (unless `keep_engine`: it generates again
        before the step ends), the models resident."""
        if self.sleep_engine and not keep_engine and self.engine_awake:
            self._sleep()
        self._onload()

    def _sleep(self) -> None:
        with self._timed():
            self.engine.sleep(level=2)
        self.engine_awake.clear()
        self.events.append("engine.sleep(2)")
