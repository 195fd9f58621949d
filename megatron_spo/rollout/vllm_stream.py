"""Continuous batching for the `vllm` engine: vLLM's own scheduler, stepped by the caller.

`VLLMStream` adds queued requests to the engine's `LLMEngine` (`add_request`, token-id prompt)
while fewer than `max_inflight` of its sequences are running, then runs one `LLMEngine.step()`:
one scheduler iteration, one new token per running sequence (a long prompt may take several
iterations of chunked prefill first). It asks vLLM for cumulative outputs, so after each step it
knows how many tokens each sequence has and tags the new ones with the stream's `version`. A
finished sequence's `Completion` is built by `VLLMEngine._completion`, exactly as `generate`
builds it, with the same vLLM sampling parameters (`VLLMEngine._sampling_params`): for a given
request the stream returns what `generate` returns, up to float rounding from another batch.

Weight updates between two steps (`engine.update_weights`): the running sequences keep the KV
blocks computed under the old weights and sample every later token from the new ones (partial
rollout). vLLM 0.32's `reset_prefix_cache()` only resets when no request holds KV blocks (it logs
a warning and returns False otherwise; resetting with `reset_running_requests=True` would preempt
and recompute every running sequence), so `update_weights` defers the reset while this stream has
sequences in flight, and the stream salts each prompt's prefix-cache hashes with the engine's
weight-update count (`cache_salt`): a request admitted after an update never reuses a block
cached under older weights, and requests of one weights version still share their prompts'
blocks. The deferred reset runs at the next idle moment (a `step` with nothing in flight, or
`generate`).

Caveats. With async scheduling (vLLM's default on GPU; off on CPU) `LLMEngine.step()` returns the
tokens of the batch launched by the previous step while the next batch is already launched, so the
first token of each sequence returned after a weight update may have been sampled under the old
weights though tagged with the new version; on CPU the tags are exact. Under torchrun the `vllm`
engine is SPMD (`spmd = True`): every rank of a rollout group would have to make the same
`submit` / `step` / `abort` calls in the same order; the async trainer restricts async mode to
rollout TP 1, so a stream is driven by one rank.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from megatron_spo.rollout.streaming import EngineStream, StreamRequest, StreamResult

_request_ids = itertools.count()  # vLLM request ids, unique in this process


@dataclasses.dataclass
class _Slot:
    """One sequence running in vLLM: its request and each new token's version so far."""

    request: StreamRequest
    versions: list[int] = dataclasses.field(default_factory=list)


class VLLMStream(EngineStream):
    """Slots of a `VLLMEngine` on vLLM's scheduler (see the module docstring). Open it with
    `engine.open_stream`: the engine refuses `generate` while it has sequences in flight, and
    `update_weights` defers its prefix-cache reset."""

    def __init__(self, engine, max_inflight: int):
        super().__init__(max_inflight)
        self.engine = engine
        self._running: dict[str, _Slot] = {}  # vLLM request id -> slot, in admission order

    @property
    def num_inflight(self) -> int:
        return len(self._running)

    def submit(self, requests: Sequence[StreamRequest]) -> None:
        """Queue requests after checking each prompt as `generate` does (all or none are queued)."""
        for request in requests:
            self.engine._check_prompt(f"stream request {request.tag!r}", list(request.prompt_token_ids))
        super().submit(requests)

    def step(self) -> list[StreamResult]:
        engine = self.engine
        if engine._asleep:
            raise RuntimeError("VLLMStream.step called while asleep; call wake_up() first")
        if engine._stream is not self:
            raise RuntimeError("VLLMStream.step: the engine opened another stream since this one")
        if not self._running:
            engine._flush_stale_prefix_cache()
        self._admit()
        if not self._running:
            return []
        return self._collect(engine.llm.llm_engine.step())

    def abort(self) -> list[StreamRequest]:
        if self._running:
            # external ids: the output processor drops their state, the scheduler frees their blocks
            self.engine.llm.llm_engine.abort_request(list(self._running))
        aborted = [slot.request for slot in self._running.values()]
        self._running = {}
        return aborted

    def _admit(self) -> None:
        """Add queued requests to vLLM while fewer than `max_inflight` are running."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm_engine = self.engine.llm.llm_engine
        refill = bool(self._running)
        salt = f"megatron-spo-weights-{self.engine._weights_epoch}"
        while self._queue and len(self._running) < self.max_inflight:
            request = self._queue.popleft()
            prompt = list(request.prompt_token_ids)
            params = self.engine._sampling_params(request.params, len(prompt))
            params.output_kind = RequestOutputKind.CUMULATIVE  # every step: all tokens so far
            request_id = f"megatron-spo-stream-{next(_request_ids)}"
            try:
                # the renderer LLM.generate uses turns the token prompt into the engine's input
                (engine_input,) = llm_engine.renderer.render_cmpl(
                    [TokensPrompt(prompt_token_ids=prompt, cache_salt=salt)])
                llm_engine.add_request(request_id, engine_input, params)
            except BaseException:
                self._queue.appendleft(request)
                raise
            self._running[request_id] = _Slot(request)
            if refill:
                self.refills += 1

    def _collect(self, outputs) -> list[StreamResult]:
        """Tag each running sequence's new tokens with `version`; return the finished ones."""
        results = []
        for output in outputs:
            slot = self._running.get(output.request_id)
            if slot is None:
                continue  # not this stream's (an aborted request's late output)
            (sample,) = output.outputs
            slot.versions.extend([self.version] * (len(sample.token_ids) - len(slot.versions)))
            if output.finished:
                del self._running[output.request_id]
                results.append(StreamResult(tag=slot.request.tag, completion=self.engine._completion(sample),
                                            token_versions=slot.versions))
        return results


__all__ = ["VLLMStream"]
