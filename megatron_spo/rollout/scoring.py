"""Batch reward scoring in a pool of workers, with a per-item time limit and failure counts.

Grading is CPU-heavy (SymPy) and can hang on adversarial LaTeX, so it runs outside the
training process: `reward.pool: process` uses worker processes on this machine; `reward.pool:
ray` uses Ray actors (for multi-node clusters: joins `reward.ray_address`, or starts a local Ray
instance). Each response gets at most `reward.timeout_s`; a worker that overruns is killed and
replaced. A grader that raises, hangs, or returns NaN/inf gives score 0, and each kind of
failure is counted in the returned metrics (`reward/failures_error`, `reward/failures_timeout`,
`reward/failures_nonfinite`), so a broken reward function shows up in the logs instead of
silently training on zeros.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from typing import Any, Sequence

from megatron_spo.errors import UserError
from megatron_spo.rollout.rewards import RewardConfig, load_reward_function

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class ScoredBatch:
    scores: list[float]
    """One finite score per response, in input order (0 for failed items)."""
    predictions: list[str | None]
    """The answer each grader extracted (None when it failed or extracted nothing)."""
    metrics: dict[str, float]
    """reward/mean, reward/failures_{error,timeout,nonfinite}, reward/format_failures,
    reward/score_time_s."""
    failure_messages: dict[int, str] = dataclasses.field(default_factory=dict)
    """Why each failed item failed (index -> message), for logs."""


class _Scorer:
    """Runs the configured reward function on one item; lives in a worker (process or actor)."""

    def __init__(self, function_path: str, config_fields: dict[str, Any]):
        self.config = RewardConfig(**config_fields)
        self.function = load_reward_function(function_path)

    def ready(self) -> bool:
        return True

    def score(self, response: str, ground_truth: str) -> tuple[float, str | None, bool]:
        out = self.function(response, ground_truth, self.config)
        if isinstance(out, (int, float)):
            return float(out), None, True
        return float(out.score), getattr(out, "prediction", None), bool(getattr(out, "format_ok", True))


def _process_worker(conn, function_path: str, config_fields: dict[str, Any]) -> None:
    try:
        scorer = _Scorer(function_path, config_fields)
    except Exception as e:  # noqa: BLE001 - reported to the pool, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))  # per-item deadlines start only after imports are done
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the pool's process is gone (killed): end quietly with it
            return
        if message is None:
            return
        index, response, ground_truth = message
        try:
            conn.send((index, "ok", scorer.score(response, ground_truth)))
        except Exception as e:  # noqa: BLE001 - any grader bug becomes a counted failure
            conn.send((index, "error", f"{type(e).__name__}: {e}"))


class _ProcessWorker:
    def __init__(self, context, config: RewardConfig):
        parent_end, child_end = context.Pipe()
        self.process = context.Process(target=_process_worker, daemon=True,
                                       args=(child_end, config.function, dataclasses.asdict(config)))
        self.process.start()
        child_end.close()
        self.conn = parent_end
        self.ready = False
        self.index: int | None = None
        self.deadline = math.inf
        self.started = time.monotonic()

    def kill(self):
        self.process.kill()
        self.process.join()
        self.conn.close()


class ScoringPool:
    """Scores batches with `config.function`; reuse one pool across training steps."""

    def __init__(self, config: RewardConfig):
        self.config = config
        load_reward_function(config.function)  # fail early, in the caller, with a UserError
        self._scorer = _Scorer(config.function, dataclasses.asdict(config)) if config.pool == "inline" else None
        self._workers: list[_ProcessWorker] = []
        self._actors: list[Any] = []
        if config.pool == "process":
            self._context = multiprocessing.get_context(config.start_method)
            self._workers = [_ProcessWorker(self._context, config) for _ in range(config.workers)]
        elif config.pool == "ray":
            self._start_ray()

    # -- public ----------------------------------------------------------------------------------

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> ScoredBatch:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        started = time.monotonic()
        outcomes: list[tuple[str, Any]] = [("error", "not scored")] * len(responses)
        if self.config.pool == "inline":
            for i, (response, truth) in enumerate(zip(responses, ground_truths)):
                try:
                    outcomes[i] = ("ok", self._scorer.score(response, truth))
                except Exception as e:  # noqa: BLE001
                    outcomes[i] = ("error", f"{type(e).__name__}: {e}")
        elif self.config.pool == "process":
            self._score_processes(responses, ground_truths, outcomes)
        else:
            self._score_ray(responses, ground_truths, outcomes)
        return self._collect(outcomes, time.monotonic() - started)

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        self._workers = []
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- process pool ----------------------------------------------------------------------------

    def _score_processes(self, responses, ground_truths, outcomes) -> None:
        todo = collections.deque(range(len(responses)))
        while todo or any(w.index is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.index is None and todo:
                    worker.index = todo.popleft()
                    worker.deadline = time.monotonic() + self.config.timeout_s
                    worker.conn.send((worker.index, responses[worker.index], ground_truths[worker.index]))
            waiting = [w for w in self._workers if w.index is not None or not w.ready]
            next_deadline = min(w.deadline if w.ready else w.started + self.config.worker_startup_timeout_s
                                for w in waiting)
            ready = set(multiprocessing.connection.wait([w.conn for w in waiting],
                                                        timeout=max(0.0, next_deadline - time.monotonic())))
            for slot, worker in enumerate(self._workers):
                if not worker.ready:
                    self._check_startup(slot, worker.conn in ready)
                elif worker.index is None:
                    continue
                elif worker.conn in ready:
                    try:
                        index, status, payload = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, os._exit, OOM kill)
                        outcomes[worker.index] = ("error", "scoring worker died")
                        self._replace_worker(slot)
                        continue
                    outcomes[index] = (status, payload)
                    worker.index = None
                elif time.monotonic() >= worker.deadline:
                    outcomes[worker.index] = ("timeout", f"no score within {self.config.timeout_s}s")
                    self._replace_worker(slot)

    def _check_startup(self, slot: int, has_message: bool) -> None:
        worker = self._workers[slot]
        if has_message:
            try:
                status, message = worker.conn.recv()
            except (EOFError, OSError):
                status, message = "fatal", f"exit code {worker.process.exitcode}"
            if status == "ready":
                worker.ready = True
                return
        elif time.monotonic() < worker.started + self.config.worker_startup_timeout_s:
            return
        else:
            message = f"not ready after {self.config.worker_startup_timeout_s}s"
        worker.kill()
        raise RuntimeError(f"reward worker for {self.config.function!r} failed to start: {message}")

    def _replace_worker(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _ProcessWorker(self._context, self.config)

    # -- Ray actors ------------------------------------------------------------------------------

    def _start_ray(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise UserError("reward.pool is 'ray' but ray is not installed: pip install 'megatron-spo[ray]'") from e
        options: dict[str, Any] = {"num_cpus": 1}
        if self.config.ray_address:
            # on a real cluster the reward function's package must be installed on the nodes
            # (or shipped with a Ray runtime_env by the user)
            ray.init(address=self.config.ray_address, log_to_driver=False, ignore_reinit_error=True)
        else:
            if not ray.is_initialized():
                ray.init(num_cpus=self.config.workers, include_dashboard=False, log_to_driver=False)
            # a local instance: actors see the same import path as this process
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        self._remote_scorer = ray.remote(**options)(_Scorer)
        self._actors = [self._new_actor() for _ in range(self.config.workers)]
        self._wait_ready(self._actors)

    def _new_actor(self):
        return self._remote_scorer.remote(self.config.function, dataclasses.asdict(self.config))

    def _wait_ready(self, actors) -> None:
        # per-item deadlines start only once actors have imported the reward function
        import ray

        try:
            ray.get([actor.ready.remote() for actor in actors], timeout=self.config.worker_startup_timeout_s)
        except Exception as e:  # noqa: BLE001 - GetTimeoutError or the constructor's exception
            raise RuntimeError(f"reward actors for {self.config.function!r} failed to start: {e}") from e

    def _score_ray(self, responses, ground_truths, outcomes) -> None:
        import ray

        todo = collections.deque(range(len(responses)))
        in_flight: dict[Any, tuple[int, int, float]] = {}  # ref -> (item, actor slot, deadline)
        idle = list(range(len(self._actors)))
        while todo or in_flight:
            while idle and todo:
                slot, index = idle.pop(), todo.popleft()
                ref = self._actors[slot].score.remote(responses[index], ground_truths[index])
                in_flight[ref] = (index, slot, time.monotonic() + self.config.timeout_s)
            wait_s = max(0.0, min(d for _, _, d in in_flight.values()) - time.monotonic())
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait_s)
            for ref in done:
                index, slot, _ = in_flight.pop(ref)
                try:
                    outcomes[index] = ("ok", ray.get(ref))
                except Exception as e:  # noqa: BLE001 - RayTaskError wraps the grader's exception
                    outcomes[index] = ("error", f"{type(e).__name__}: {e}")
                idle.append(slot)
            now = time.monotonic()
            for ref, (index, slot, deadline) in list(in_flight.items()):
                if now >= deadline:  # a hung actor cannot be interrupted: replace it
                    del in_flight[ref]
                    outcomes[index] = ("timeout", f"no score within {self.config.timeout_s}s")
                    ray.kill(self._actors[slot])
                    self._actors[slot] = self._new_actor()
                    self._wait_ready([self._actors[slot]])
                    idle.append(slot)

    # -- results ---------------------------------------------------------------------------------

    @staticmethod
    def _collect(outcomes: list[tuple[str, Any]], elapsed_s: float) -> ScoredBatch:
        failures = {"error": 0, "timeout": 0, "nonfinite": 0}
        scores, predictions, format_failures, messages = [], [], 0, {}
        for index, (status, payload) in enumerate(outcomes):
            if status == "ok" and not math.isfinite(payload[0]):
                status, payload = "nonfinite", f"reward function returned {payload[0]}"
            if status != "ok":
                failures[status] += 1
                messages[index] = payload
                scores.append(0.0)
                predictions.append(None)
                continue
            score, prediction, format_ok = payload
            scores.append(score)
            predictions.append(prediction)
            format_failures += not format_ok
        metrics = {f"reward/failures_{kind}": float(n) for kind, n in failures.items()}
        metrics["reward/format_failures"] = float(format_failures)
        metrics["reward/mean"] = sum(scores) / len(scores) if scores else 0.0
        metrics["reward/score_time_s"] = elapsed_s
        if messages:
            first = min(messages)
            logger.warning("reward: %d of %d items failed and scored 0 (first, item %d: %s)",
                           len(messages), len(outcomes), first, messages[first])
        return ScoredBatch(scores=scores, predictions=predictions, metrics=metrics, failure_messages=messages)
