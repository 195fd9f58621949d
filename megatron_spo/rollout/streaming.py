"""Streaming generation: a fixed number of slots, refilled the moment a sequence finishes.

A synchronous step generates its whole batch and waits for the slowest sequence; a stream keeps
up to `max_inflight` sequences decoding at once and admits a queued request into the slot a
finished sequence frees (continuous batching, what vLLM's scheduler does natively). The caller
drives it: `submit` queues requests, each `step` admits what fits and advances every in-flight
sequence, returning the ones that finished. Between two `step` calls the caller may load new
weights into the engine and raise `version`: tokens sampled from then on carry the new version
(a sequence in flight finishes under the new weights, its earlier tokens keep their version), or
it may `abort` the in-flight sequences and resubmit them.

Engines that can stream (`hf`: `HFEngine.open_stream`, slot refill in one merged KV cache;
`vllm`: `VLLMEngine.open_stream`, vLLM's own scheduler) return their own stream from
`open_stream(engine, max_inflight)`; any other engine gets `BatchedStream`, which generates up to
`max_inflight` queued requests to completion per `step` through `engine.generate` (no refill
inside a batch, every token of a batch has one version).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
from typing import Any, Sequence

from megatron_spo.rollout.types import Completion, GenerationRequest, SamplingParams


@dataclasses.dataclass(kw_only=True)
class StreamRequest:
    tag: Any
    """The caller's handle, returned with the result."""
    prompt_token_ids: list[int]
    """The prompt, possibly ending in a partial response to continue."""
    params: SamplingParams
    """n must be 1: a stream slot holds one sequence."""


@dataclasses.dataclass(kw_only=True)
class StreamResult:
    tag: Any
    completion: Completion
    token_versions: list[int]
    """The stream's `version` when each new token was sampled, aligned with `completion.token_ids`."""


class EngineStream(abc.ABC):
    """Slots of one engine; see the module docstring. Not thread-safe: one caller drives it."""

    def __init__(self, max_inflight: int):
        if max_inflight < 1:
            raise ValueError(f"a stream needs max_inflight >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.version = 0
        """Policy version tagged onto every token sampled from now on (the caller raises it after
        loading new weights into the engine)."""
        self.refills = 0
        """Sequences admitted while other sequences of the same decoding batch were mid-way."""
        self._queue: collections.deque[StreamRequest] = collections.deque()

    def submit(self, requests: Sequence[StreamRequest]) -> None:
        """Queue requests; they are admitted in submission order as slots free."""
        self._check(requests)
        self._queue.extend(requests)

    @staticmethod
    def _check(requests: Sequence[StreamRequest]) -> None:
        for request in requests:
            if request.params.n != 1:
                raise ValueError(f"stream request {request.tag!r}: n must be 1 (one sequence per slot), "
                                 f"got {request.params.n}")

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    @abc.abstractmethod
    def num_inflight(self) -> int:
        """Sequences admitted and not yet finished."""

    @property
    def idle(self) -> bool:
        return not self._queue and self.num_inflight == 0

    @abc.abstractmethod
    def step(self) -> list[StreamResult]:
        """Admit queued requests into free slots, advance every in-flight sequence, and return
        the sequences that finished (in no particular order)."""

    @abc.abstractmethod
    def abort(self) -> list[StreamRequest]:
        """Drop every in-flight sequence (queued requests stay queued); returns their requests,
        in admission order, so the caller can resubmit or return them."""

    def clear_queue(self) -> list[StreamRequest]:
        """Remove every queued request (not yet admitted); returns them in submission order."""
        out = list(self._queue)
        self._queue.clear()
        return out

    @contextlib.contextmanager
    def held(self):
        """The stream frozen between two decoding steps while the caller holds it. A local stream
        only decodes inside `step`, so nothing to do; a remote one (`rollout.remote`) parks its
        rank's decoding."""
        yield


class BatchedStream(EngineStream):
    """A stream over any `RolloutEngine`: each `step` generates up to `max_inflight` queued
    requests to completion with one `engine.generate` call. No refill within a batch; a weight
    update can only land between batches, so no sequence is ever in flight across versions."""

    def __init__(self, engine, max_inflight: int):
        super().__init__(max_inflight)
        self.engine = engine

    @property
    def num_inflight(self) -> int:
        return 0  # a batch starts and finishes inside one `step`

    def step(self) -> list[StreamResult]:
        batch = [self._queue.popleft() for _ in range(min(self.max_inflight, len(self._queue)))]
        if not batch:
            return []
        results = self.engine.generate([GenerationRequest(prompt_token_ids=r.prompt_token_ids, params=r.params)
                                        for r in batch])
        return [StreamResult(tag=r.tag, completion=res.completions[0],
                             token_versions=[self.version] * len(res.completions[0].token_ids))
                for r, res in zip(batch, results)]

    def abort(self) -> list[StreamRequest]:
        return []


def open_stream(engine, max_inflight: int) -> EngineStream:
    """The engine's own stream when it has one (continuous batching), else `BatchedStream`."""
    opener = getattr(engine, "open_stream", None)
    return opener(max_inflight) if opener is not None else BatchedStream(engine, max_inflight)


__all__ = ["StreamRequest", "StreamResult", "EngineStream", "BatchedStream", "open_stream"]

