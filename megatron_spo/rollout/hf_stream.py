"""Continuous batching for the `hf` engine: a stream whose finished slots are refilled at once.

`HFStream` keeps up to `max_inflight` sequences in one batch with one shared `DynamicCache` and
advances all of them with one forward pass per `step`. Each sequence follows the rules of
`HFEngine.generate` (same validation, sampling distribution, generators, inverse-CDF draw,
finish rules and completion text), so for a given request the stream returns what `generate`
returns, up to float rounding from a different padding layout.

Batch layout: row r of the cache is the r-th in-flight sequence in admission order. Rows are
left-padded (attention mask 0) to the cache width and carry explicit position ids, so a row's
padding never changes its result. The cache holds every token of a row except the last sampled
one, which is fed at the start of the next `step`: a weight update between two steps therefore
applies to the very next token. The keys and values already cached stay as computed by the old
weights (partial rollout, as vLLM does when weights change under running requests).

A `step`:
1. feeds the last sampled token of every running row (one forward of width 1);
2. admits queued requests into free slots: one batched forward over their prompts into a fresh
   cache, which is then concatenated to the running one along the batch (the narrower of the two
   is left-padded with zero keys / values and mask 0);
3. samples one token per row and returns the rows that finished; they leave the cache, and
   padding columns no remaining row uses are cropped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from megatron_spo.rollout.hf_engine import HFEngine, _Sequence
from megatron_spo.rollout.streaming import EngineStream, StreamRequest, StreamResult


@dataclasses.dataclass
class _Slot:
    """One in-flight sequence: its request, its decoding state and each token's version."""

    request: StreamRequest
    seq: _Sequence
    versions: list[int] = dataclasses.field(default_factory=list)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` (a negative index) up to `width` entries."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


class HFStream(EngineStream):
    """Slots of an `HFEngine` decoded as one batch and refilled as they finish (see the module
    docstring). Holds the engine, never a copy of its weights: every forward uses the weights the
    engine has at that moment."""

    def __init__(self, engine: HFEngine, max_inflight: int):
        super().__init__(max_inflight)
        if not self.supports(engine.model):
            raise ValueError(f"HFStream needs a full-attention KV cache; {type(engine.model).__name__} "
                             f"has other cache layers (use streaming.BatchedStream)")
        self.engine = engine
        self._slots: list[_Slot] = []  # row r of the cache is _slots[r], in admission order
        self._cache = None  # DynamicCache of the running rows, None when there are none
        self._mask: torch.Tensor | None = None  # (rows, cache width) long: 1 on real tokens
        self._admitted = 0

    @staticmethod
    def supports(model) -> bool:
        """Whether every layer of the model's `DynamicCache` is a plain full-attention layer, whose
        (batch, heads, tokens, dim) keys and values can be padded and concatenated row-wise."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @property
    def num_inflight(self) -> int:
        return len(self._slots)

    def submit(self, requests: Sequence[StreamRequest]) -> None:
        """Queue requests after checking each as `generate` does (all or none are queued)."""
        for request in requests:
            self.engine._check_request(f"stream request {request.tag!r}", list(request.prompt_token_ids),
                                       request.params)
        super().submit(requests)

    def step(self) -> list[StreamResult]:
        self.engine._require_awake("HFStream.step")
        with torch.inference_mode():
            logits = []
            if self._slots:
                logits.append(self._feed_last_tokens())
            free = self.max_inflight - len(self._slots)
            admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            if admitted:
                logits.append(self._admit(admitted))
            if not self._slots:
                return []
            self.engine._sample_next(torch.cat(logits), [slot.seq for slot in self._slots])
            for slot in self._slots:
                slot.versions.append(self.version)
            return self._retire_finished()

    def abort(self) -> list[StreamRequest]:
        aborted = [slot.request for slot in self._slots]
        self._slots = []
        self._cache = self._mask = None
        return aborted

    # ------------------------------------------------------------------ batch maintenance

    def _feed_last_tokens(self) -> torch.Tensor:
        """Forward the last sampled token of every running row under the current weights,
        appending it to the cache; returns the next-token logits, (rows, V) float32 on the host."""
        device = self.engine.device
        seqs = [slot.seq for slot in self._slots]
        tokens = torch.tensor([[seq.token_ids[-1]] for seq in seqs], device=device)
        # the last sampled token sits at position len(prompt) + len(token_ids) - 1
        positions = torch.tensor([[len(seq.prompt) + len(seq.token_ids) - 1] for seq in seqs], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(seqs), 1)], dim=1)
        out = self.engine.model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        return out.logits[:, -1, :].float().cpu()

    def _admit(self, requests: list[StreamRequest]) -> torch.Tensor:
        """Prefill the prompts of `requests` in one forward and append them as new rows; returns
        their next-token logits, (len(requests), V) float32 on the host."""
        engine = self.engine
        seqs = []
        for request in requests:
            seqs.append(engine._new_sequences(self._admitted, list(request.prompt_token_ids), request.params)[0])
            self._admitted += 1
        input_ids, mask, positions = engine._left_padded([seq.prompt for seq in seqs])
        out, cache = engine._prefill(input_ids, mask, positions)
        if self._slots:
            self.refills += len(seqs)
            self._append_rows(cache, mask)
        else:
            self._cache, self._mask = cache, mask
        self._slots.extend(_Slot(request, seq) for request, seq in zip(requests, seqs))
        return out.logits[:, -1, :].float().cpu()

    def _append_rows(self, cache, mask: torch.Tensor) -> None:
        """Concatenate `cache` / `mask` (new rows) after the running rows, left-padding whichever
        is narrower so every row ends at the same column."""
        width = max(self._mask.shape[1], mask.shape[1])
        for layer, new in zip(self._cache.layers, cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, width, -2), _pad_left(new.keys, width, -2)])
            layer.values = torch.cat([_pad_left(layer.values, width, -2), _pad_left(new.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])

    def _retire_finished(self) -> list[StreamResult]:
        """Remove the finished rows from the batch and return their results."""
        done = [slot for slot in self._slots if slot.seq.finish_reason is not None]
        if not done:
            return []
        keep = [row for row, slot in enumerate(self._slots) if slot.seq.finish_reason is None]
        if keep:
            rows = torch.tensor(keep, device=self.engine.device)
            self._cache.batch_select_indices(rows)
            self._mask = self._mask[rows]
            self._crop_padding()
        else:
            self._cache = self._mask = None
        self._slots = [self._slots[row] for row in keep]
        return [
            StreamResult(tag=slot.request.tag, completion=self.engine._completion(slot.seq),
                         token_versions=slot.versions)
            for slot in done
        ]

    def _crop_padding(self) -> None:
        """Drop the leading cache columns that are padding in every remaining row (left by a
        longer row that has finished): they cost attention time and memory for nothing."""
        first = int(self._mask.any(dim=0).int().argmax())  # first column some row attends to
        if first == 0:
            return
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self._mask = self._mask[:, first:]


__all__ = ["HFStream"]
