"""Continuous batching for the `vllm` engine: vLLM's own scheduler, stepped by the caller.

`VLLMStream.step` adds queued requests to the engine's `LLMEngine` (`add_request`, token-id
prompt) while fewer than `max_inflight` of its sequences are in flight, then runs one
`LLMEngine.step()`: one scheduler iteration, one new token per running sequence (a prompt longer
than vLLM's token budget takes several iterations of chunked prefill first). vLLM returns
cumulative outputs, so the stream sees how many tokens each sequence has and tags the new ones
with its `version`. A finished sequence's `Completion` is built by `VLLMEngine._completion` from
the same vLLM sampling parameters (`VLLMEngine._sampling_params`) as `generate`: per request the
stream returns what `generate` returns, up to float rounding from another batch composition.

Weight updates between two steps (`engine.update_weights`): running sequences keep the KV blocks
computed under the old weights and sample every later token from the new ones (partial rollout).
vLLM 0.32's `reset_prefix_cache()` resets only when no request holds KV blocks; otherwise it logs
a warning and returns False (`reset_running_requests=True` would instead preempt and recompute
every running sequence). So `update_weights` defers the reset while the stream has sequences in
flight, and until it is done every new prompt (stream or `generate`) carries a `cache_salt` made
of the weight-update count: no request admitted after an update reuses a prompt block cached
under older weights. The reset runs at the next idle moment (a `step` or `generate` with nothing
in flight).

`engine.generate` while the stream has sequences in flight (evaluation with the async driver
parked) goes through `generate_alongside`: vLLM batches its requests with the stream's, which
advance meanwhile (same weights, tagged with the current `version`) and are returned by the next
`step` if they finish.

Caveats. With async scheduling (vLLM's default on GPU; forced off on CPU) `LLMEngine.step()` may
return tokens of a batch launched by the previous call, so the first token of a sequence
returned after a weight update may have been sampled under the old weights though tagged with the
new version; on CPU the tags are exact. Under torchrun the `vllm` engine is SPMD (`spmd = True`):
every rank of a rollout group would have to make the same `submit` / `step` / `abort` calls in the
same order; the async trainer restricts async mode to rollout TP 1, so a stream is driven by one
rank.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from megatron_spo.rollout.streaming import EngineStream, StreamRequest, StreamResult

_request_ids = itertools.count()  # vLLM request ids, unique in this process


@dataclasses.dataclass
class _Slot:
    """One admitted sequence: its request, each new token's version so far, and its result once
    vLLM finished it (during `generate_alongside`, until the next `step` returns it)."""

    request: StreamRequest
    versions: list[int] = dataclasses.field(default_factory=list)
    result: StreamResult | None = None


class VLLMStream(EngineStream):
    """Slots of a `VLLMEngine` on vLLM's scheduler (see the module docstring). Open it with
    `engine.open_stream`: the engine then runs `generate` next to the stream's sequences and
    defers its prefix-cache reset while they are in flight."""

    def __init__(self, engine, max_inflight: int):
        super().__init__(max_inflight)
        self.engine = engine
        self._slots: dict[str, _Slot] = {}  # vLLM request id -> slot, in admission order

    @property
    def num_inflight(self) -> int:
        return len(self._slots)

    def submit(self, requests: Sequence[StreamRequest]) -> None:
        """Queue requests after the checks `generate` meets (prompt length, vLLM's token-id range
        and sampling parameters): all or none are queued, so no request fails at admission."""
        renderer = self.engine.llm.llm_engine.renderer
        for request in requests:
            prompt = list(request.prompt_token_ids)
            self.engine._check_prompt(f"stream request {request.tag!r}", prompt)
            renderer.validate_token_ids(prompt)
            self.engine._sampling_params(request.params, len(prompt))
        super().submit(requests)

    def step(self) -> list[StreamResult]:
        engine = self.engine
        if engine._asleep:
            raise RuntimeError("VLLMStream.step called while asleep; call wake_up() first")
        if engine._stream is not self:
            raise RuntimeError("VLLMStream.step: the engine opened another stream since this one")
        results = self._take_finished()  # finished during generate_alongside
        if not self._slots:
            engine._flush_stale_prefix_cache()
        self._admit()
        if self._slots:
            self._record(engine.llm.llm_engine.step())
        return results + self._take_finished()

    def abort(self) -> list[StreamRequest]:
        running = [request_id for request_id, slot in self._slots.items() if slot.result is None]
        if running:
            # external ids: the output processor drops their state, the scheduler frees their blocks
            self.engine.llm.llm_engine.abort_request(running)
        aborted = [slot.request for slot in self._slots.values()]
        self._slots = {}
        return aborted

    def generate_alongside(self, prompts: list[dict], params: list) -> list:
        """Run `VLLMEngine.generate`'s requests (token prompts, vLLM sampling parameters) to
        completion while this stream has sequences in flight: they share vLLM's batches, so the
        stream's sequences advance meanwhile (tokens tagged with the current `version`; those
        that finish are returned by the next `step`). Returns vLLM's outputs in request order."""
        from vllm.sampling_params import RequestOutputKind

        llm_engine = self.engine.llm.llm_engine
        pending: dict[str, object] = {}
        try:
            for prompt, p in zip(prompts, params):
                p.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
                request_id = f"megatron-spo-generate-{next(_request_ids)}"
                (engine_input,) = llm_engine.renderer.render_cmpl([prompt])
                llm_engine.add_request(request_id, engine_input, p)
                pending[request_id] = None
            while any(output is None for output in pending.values()):
                outputs = llm_engine.step()
                self._record(outputs)
                pending.update((o.request_id, o) for o in outputs if o.finished and o.request_id in pending)
        except BaseException:
            unfinished = [request_id for request_id, output in pending.items() if output is None]
            if unfinished:
                llm_engine.abort_request(unfinished)
            raise
        return list(pending.values())

    def _admit(self) -> None:
        """Add queued requests to vLLM while fewer than `max_inflight` are in flight."""
        from vllm.sampling_params import RequestOutputKind

        llm_engine = self.engine.llm.llm_engine
        refill = bool(self._slots)
        while self._queue and len(self._slots) < self.max_inflight:
            request = self._queue.popleft()
            prompt = list(request.prompt_token_ids)
            params = self.engine._sampling_params(request.params, len(prompt))
            params.output_kind = RequestOutputKind.CUMULATIVE  # every step: all tokens so far
            request_id = f"megatron-spo-stream-{next(_request_ids)}"
            try:
                # the renderer LLM.generate uses turns the token prompt into the engine's input
                (engine_input,) = llm_engine.renderer.render_cmpl([self.engine._token_prompt(prompt)])
                llm_engine.add_request(request_id, engine_input, params)
            except BaseException:
                self._queue.appendleft(request)
                raise
            self._slots[request_id] = _Slot(request)
            if refill:
                self.refills += 1

    def _record(self, outputs) -> None:
        """Tag the new tokens of this stream's sequences among vLLM's `outputs` with `version`;
        keep the result of each that finished."""
        for output in outputs:
            slot = self._slots.get(output.request_id)
            if slot is None or slot.result is not None:
                continue  # not this stream's: a request of generate_alongside
            (sample,) = output.outputs
            slot.versions.extend([self.version] * (len(sample.token_ids) - len(slot.versions)))
            if output.finished:
                slot.result = StreamResult(tag=slot.request.tag, completion=self.engine._completion(sample),
                                           token_versions=slot.versions)

    def _take_finished(self) -> list[StreamResult]:
        """Remove the finished sequences and return their results."""
        done = [request_id for request_id, slot in self._slots.items() if slot.result is not None]
        return [self._slots.pop(request_id).result for request_id in done]


__all__ = ["VLLMStream"]
