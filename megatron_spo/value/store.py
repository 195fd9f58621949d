"""`ValueStore`: per-prompt Beta posteriors sharded over data-parallel ranks.

The math is in `megatron_spo.value.tracker`; this module holds the state and moves it between
ranks. Layout on each rank (owner of key = key mod dp_size):

    keys   (P_r,) int64, sorted    the prompts this rank owns (see `megatron_spo.value.keys`)
    alpha, beta  (P_r, 2) float64  Beta posterior, interleaved
    slot   (P_r,) int32            row in the response table, -1 before the first stored response

plus a bucket directory over the sorted keys (`_KeyIndex`): ~28.5 bytes per prompt. For KL-mode rho, each owner
also keeps the response stored at the prompt's last visit (token ids, int32) and the log-probs
computed right after that visit's update (float32) in one append-only ragged buffer, compacted
when more than half of it is stale.

Who passes what (SPMD: every rank of the group makes the same calls in the same order):
- replicated calls take the same keys on every rank and return the same answer everywhere:
  `p_hat`, `weights`, `sample`. One all-reduce of (3, B) float64 per call.
- rank-local calls take the samples *this* rank generated (the union over ranks is the batch, each
  prompt at most once per step): `update`, `store_responses`, `stored_responses`. Entries travel to
  their owner (and answers back) with `all_to_all_single`.
`group=None` means a single process and no collectives. The group must carry CPU tensors (gloo):
on GPU, hand in Megatron's gloo data-parallel group, not the NCCL one.

Checkpoints (`save` / `load`) write one shard per rank atomically plus a manifest; a checkpoint
written at any DP size loads at any other (each rank keeps the keys it owns under the new size),
bit-identical, since values are only moved, never recomputed.

This module stays whole (over the project's 600-line guide) on purpose: the key index, the
response table and the store share one sharding contract (which rank owns a key, how entries
travel, when all ranks must agree before a collective), and splitting them would spread that
contract over files that each only make sense together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megatron_spo import atomic
from megatron_spo.errors import UserError
from megatron_spo.value import tracker
from megatron_spo.value.config import ValueConfig
from megatron_spo.value.keys import prompt_keys

logger = logging.getLogger(__name__)

STATE_FORMAT = "megatron_spo.value_store/1"
_MANIFEST = "manifest.json"


@dataclasses.dataclass(kw_only=True)
class StoredResponses:
    """Responses stored at the previous visits of a batch of prompts, in request order."""

    present: np.ndarray
    """(B,) bool: the prompt has a stored response (False on a first visit)."""
    token_ids: list[np.ndarray]
    """B int32 arrays (empty where not present)."""
    logprobs: list[np.ndarray]
    """B float32 arrays: log-probs computed right after that visit's update, aligned with token_ids."""

    def padded(self, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids (B, T) int64, old log-probs (B, T) float32, mask (B, T) bool), right-padded;
        rows without a stored response are all-masked, so `kl_drift` gives them D = 0."""
        batch = len(self.token_ids)
        width = max((len(t) for t in self.token_ids), default=0)
        token_ids = torch.full((batch, width), pad_token_id, dtype=torch.int64)
        logprobs = torch.zeros((batch, width), dtype=torch.float32)
        mask = torch.zeros((batch, width), dtype=torch.bool)
        for row, (ids, lps) in enumerate(zip(self.token_ids, self.logprobs)):
            token_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
            logprobs[row, : len(lps)] = torch.from_numpy(lps)
            mask[row, : len(ids)] = True
        return token_ids, logprobs, mask


class _ResponseTable:
    """Ragged storage of one response per slot: token ids (int32) and log-probs (float32).

    A slot's entry is (offset, length) into two append-only buffers; rewriting a slot appends and
    leaves the old tokens stale; `compact` drops stale tokens once they outnumber live ones.
    """

    def __init__(self):
        self.offsets = np.zeros(0, dtype=np.int64)  # (S,)
        self.lengths = np.zeros(0, dtype=np.int64)  # (S,)
        self.num_slots = 0
        self.tokens = np.zeros(0, dtype=np.int32)  # (capacity,)
        self.logprobs = np.zeros(0, dtype=np.float32)  # (capacity,)
        self.used = 0  # tokens written into the buffers, live or stale
        self.live = 0  # tokens referenced by some slot

    def new_slots(self, count: int) -> np.ndarray:
        first = self.num_slots
        self.num_slots += count
        if self.num_slots > self.offsets.shape[0]:
            capacity = max(self.num_slots, 2 * self.offsets.shape[0], 1024)
            self.offsets = np.resize(self.offsets, capacity)
            self.lengths = np.resize(self.lengths, capacity)
        self.offsets[first : self.num_slots] = 0
        self.lengths[first : self.num_slots] = 0
        return np.arange(first, self.num_slots, dtype=np.int64)

    def put(self, slots: np.ndarray, lengths: np.ndarray, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """Write responses for distinct `slots`; tokens/logprobs are their concatenation (sum(lengths),)."""
        total = int(lengths.sum())
        if self.used + total > self.tokens.shape[0]:
            capacity = max(self.used + total, 2 * self.tokens.shape[0], 4096)
            self.tokens = np.resize(self.tokens, capacity)
            self.logprobs = np.resize(self.logprobs, capacity)
        self.tokens[self.used : self.used + total] = tokens
        self.logprobs[self.used : self.used + total] = logprobs
        starts = self.used + np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
        self.live += total - int(self.lengths[slots].sum())
        self.offsets[slots] = starts
        self.lengths[slots] = lengths
        self.used += total
        if self.used > 2 * self.live + 65536:
            self.compact()

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths (n,), tokens (sum,), logprobs (sum,)) of `slots`, concatenated in that order."""
        lengths = self.lengths[slots]
        index = _ragged_index(self.offsets[slots], lengths)
        return lengths, self.tokens[index], self.logprobs[index]

    def compact(self) -> None:
        slots = np.arange(self.num_slots)
        lengths, tokens, logprobs = self.gather(slots)
        self.tokens, self.logprobs = tokens, logprobs
        self.offsets[: self.num_slots] = np.concatenate(([0], np.cumsum(lengths)[:-1])) if self.num_slots else 0
        self.used = self.live = int(lengths.sum())

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.lengths.nbytes + self.tokens.nbytes + self.logprobs.nbytes


class _KeyIndex:
    """Lookup of int64 keys in a sorted array, ~10x faster than `np.searchsorted` at 10M keys.

    Prompt keys are uniform 64-bit hashes, so their top bits spread them evenly: a directory of
    bucket starts (one int32/int64 per ~8 keys, ~0.5 byte per prompt) narrows each search to one
    bucket, then a branchless binary search over all keys in lockstep, with a fixed number of
    rounds (log2 of the largest bucket), finishes it.
    """

    KEYS_PER_BUCKET = 8

    def __init__(self, sorted_keys: np.ndarray):
        self.keys = sorted_keys
        n = sorted_keys.size
        self.bits = int(min(max(np.ceil(np.log2(max(n, 1) / self.KEYS_PER_BUCKET)), 0), 40))
        buckets = self._bucket(sorted_keys)
        counts = np.bincount(buckets, minlength=1 << self.bits)
        dtype = np.int32 if n < 2**31 else np.int64
        self.starts = np.concatenate(([0], np.cumsum(counts))).astype(dtype)  # (2^bits + 1,)
        self.rounds = int(np.ceil(np.log2(max(counts.max(), 1)))) if n else 0

    def _bucket(self, keys: np.ndarray) -> np.ndarray:
        # flipping the sign bit maps int64 order onto uint64 order; the top bits pick the bucket
        unsigned = keys.view(np.uint64) ^ np.uint64(1 << 63)
        return (unsigned >> np.uint64(64 - self.bits)).astype(np.int64) if self.bits else np.zeros(keys.size, np.int64)

    def locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower-bound positions (B,), found (B,)) of `keys` (B,) int64."""
        n = self.keys.size
        if n == 0:
            return np.zeros(keys.size, dtype=np.int64), np.zeros(keys.size, dtype=bool)
        bucket = self._bucket(keys)
        base = self.starts[bucket].astype(np.int64)  # (B,) first position of the key's bucket
        length = self.starts[bucket + 1] - base  # (B,) keys in that bucket
        last = n - 1
        # branchless lower_bound, all keys in lockstep: halve the candidate range each round
        for _ in range(self.rounds):
            half = length >> 1
            base += (self.keys[np.minimum(base + half, last)] < keys) * half
            length -= half
        base += self.keys[np.minimum(base, last)] < keys
        pos = np.minimum(base, last)
        return pos, self.keys[pos] == keys

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes


def _ragged_index(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions of the segments [offset, offset + length), concatenated: (sum(lengths),)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts_in_output = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    # position = offset of its segment + rank within the segment
    return np.repeat(offsets - starts_in_output, lengths) + np.arange(total)


def _without_suffix(mapping: Mapping[str, Sequence[float]], suffix: str, source: str) -> Mapping[str, Sequence[float]]:
    """`mapping` with `suffix` cut from the prompts that end with it (scores of a prompt given both
    ways are pooled)."""
    if not suffix:
        return mapping
    out: dict = {}
    stripped = 0
    for prompt, scores in mapping.items():
        if isinstance(prompt, str) and prompt.endswith(suffix):
            prompt, stripped = prompt[: -len(suffix)], stripped + 1
        if prompt in out and isinstance(out[prompt], list) and isinstance(scores, list):
            scores = out[prompt] + scores
        out[prompt] = scores
    if stripped:
        logger.info("value store: %d prompts of %s end with the answer-format suffix; matched without it",
                    stripped, source)
    return out


class ValueStore:
    """Per-prompt Beta posteriors for Single-stream SPO, sharded by prompt key over a DP group.

    Build it with `from_offline_values` (the authors' offline file), `from_offline_counts`
    (success/total arrays), `from_keys` (uninformative prior) or `load` (a checkpoint). Every rank
    of `group` builds from the same inputs and keeps the prompts it owns.
    """

    def __init__(
        self,
        keys: np.ndarray,
        alpha: np.ndarray,
        beta: np.ndarray,
        config: ValueConfig,
        *,
        group: Any = None,
    ):
        """Keep the prompts of `keys` (all prompts, identical on every rank) owned by this rank."""
        self.config = config
        self.group = group
        if group is None:
            self.dp_size, self.dp_rank = 1, 0
        else:
            if torch.distributed.get_backend(group) == "nccl":
                # the store's arrays live in host memory; NCCL moves only GPU tensors
                raise ValueError(
                    "ValueStore needs a process group that carries CPU tensors (gloo); on GPU pass "
                    "Megatron's gloo data-parallel group (parallel_state.get_data_parallel_group_gloo())"
                )
            self.dp_size = torch.distributed.get_world_size(group)
            self.dp_rank = torch.distributed.get_rank(group)
        keys = np.asarray(keys, dtype=np.int64)
        alpha = np.asarray(alpha, dtype=np.float64)
        beta = np.asarray(beta, dtype=np.float64)
        if not keys.shape == alpha.shape == beta.shape or keys.ndim != 1:
            raise ValueError(f"keys, alpha, beta must be 1-D of one length, got {keys.shape}, {alpha.shape}, {beta.shape}")
        if not _is_sorted(keys):
            order = np.argsort(keys, kind="stable")
            keys, alpha, beta = keys[order], alpha[order], beta[order]
        _check_unique(keys)  # before sharding, so every rank raises alike
        if self.dp_size > 1:
            owned = np.flatnonzero(self._owner(keys) == self.dp_rank)
            keys, alpha, beta = keys[owned], alpha[owned], beta[owned]
        self._set_local(keys, alpha, beta)
        self._responses = _ResponseTable()
        self.num_missing = 0
        """Dataset prompts absent from the offline file (set by `from_offline_values`)."""

    def _set_local(self, keys: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> None:
        """Install this rank's sorted, unique keys and their posteriors; no stored responses."""
        self._keys = np.ascontiguousarray(keys)
        # (P_r, 2) [alpha, beta] interleaved, so a lookup costs one cache miss, not two; gathers
        # and scatters go through a complex128 view of it (numpy's fast 1-D path, bit-exact)
        self._posterior = np.stack([alpha, beta], axis=1)
        self._posterior_c = self._posterior.view(np.complex128).reshape(-1)
        self._slot = np.full(keys.shape, -1, dtype=np.int32)
        self._index = _KeyIndex(self._keys)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_keys(cls, keys: Sequence[int] | np.ndarray, config: ValueConfig, *, group: Any = None) -> "ValueStore":
        """Every prompt starts at the uninformative prior Beta(0.5, 0.5)."""
        keys = np.asarray(keys, dtype=np.int64)
        half = np.full(keys.shape, 0.5)
        return cls(keys, half, half.copy(), config, group=group)

    @classmethod
    def from_offline_counts(
        cls,
        keys: np.ndarray,
        successes: np.ndarray,
        totals: np.ndarray,
        config: ValueConfig,
        *,
        group: Any = None,
    ) -> "ValueStore":
        """Offline prior from k successes of n binarised scores per prompt (arrays of shape (P,)).

        Prompts with more than `config.offline_n` scores are subsampled with `config.seed`, in key
        order, so the priors do not depend on the DP size or on the order of the input.
        """
        keys, successes, totals = (np.asarray(a, dtype=np.int64) for a in (keys, successes, totals))
        if not _is_sorted(keys):
            order = np.argsort(keys, kind="stable")
            keys, successes, totals = keys[order], successes[order], totals[order]
        rng = np.random.default_rng(config.seed)
        k, n = tracker.subsample_counts(successes, totals, config.offline_n, rng)
        alpha, beta = tracker.offline_prior(k, n, config.prior_strength)
        return cls(keys, alpha, beta, config, group=group)

    @classmethod
    def from_offline_values(
        cls,
        offline: str | os.PathLike | Mapping[str, Sequence[float]],
        config: ValueConfig,
        *,
        dataset_prompts: Sequence[str] | np.ndarray | None = None,
        group: Any = None,
        strip_suffix: str = "",
    ) -> "ValueStore":
        """Build from the authors' offline file `{prompt: [scores...]}` (a path or the mapping).

        Offline prompts ending with `strip_suffix` (the answer-format suffix the training prompts
        get appended, which the authors' own `offline_values.json` keys include) are keyed without
        it, so they match the raw dataset prompts; the count is logged.

        With `dataset_prompts` (the raw prompt texts of the training set, or their keys) the store
        holds exactly the dataset: prompts missing from the offline file get Beta(0.5, 0.5)
        (`missing: prior`) or are left out, so they get sampling weight 0 (`missing: skip`); both
        counts are logged. Offline prompts outside the dataset are dropped. An offline file that
        matches none of the dataset is refused.
        """
        from megatron_spo.value.offline import load_offline_values

        source = str(offline) if isinstance(offline, (str, os.PathLike)) else "offline values mapping"
        mapping = load_offline_values(offline) if isinstance(offline, (str, os.PathLike)) else offline
        mapping = _without_suffix(mapping, strip_suffix, source)
        off_keys, successes, totals = _offline_counts(mapping, source)
        if off_keys.size == 0:
            raise UserError(f"{source}: no prompts (an empty offline values file)")
        if dataset_prompts is None:
            logger.info("value store: %d prompts from %s", off_keys.size, source)
            return cls.from_offline_counts(off_keys, successes, totals, config, group=group)

        data_keys = np.asarray(dataset_prompts)
        if data_keys.dtype.kind not in "iu":
            data_keys = prompt_keys(list(dataset_prompts))
        data_keys = np.unique(data_keys.astype(np.int64))
        pos = np.searchsorted(off_keys, data_keys)
        found = (pos < off_keys.size) & (off_keys[np.minimum(pos, off_keys.size - 1)] == data_keys)
        matched = int(found.sum())
        if matched == 0 and data_keys.size:
            example = next(iter(mapping), "<empty>")
            raise UserError(
                f"{source}: none of its {off_keys.size} prompts matches any of the {data_keys.size} "
                f"dataset prompts (e.g. offline prompt {str(example)[:80]!r}); offline prompts must be "
                "the raw dataset prompt text (no chat template, no appended answer-format suffix)"
            )
        missing = data_keys.size - matched
        dropped = off_keys.size - matched
        logger.log(
            logging.WARNING if missing or dropped else logging.INFO,
            "value store: %d of %d dataset prompts have offline values in %s; %d missing -> %s; "
            "%d offline prompts not in the dataset dropped",
            matched, data_keys.size, source, missing,
            "prior Beta(0.5, 0.5)" if config.missing == "prior" else "skipped (sampling weight 0)",
            dropped,
        )
        if config.missing == "skip":
            keys = data_keys[found]
            k, n = successes[pos[found]], totals[pos[found]]
        else:
            keys = data_keys
            k = np.zeros(keys.shape, dtype=np.int64)
            n = np.zeros(keys.shape, dtype=np.int64)
            k[found], n[found] = successes[pos[found]], totals[pos[found]]
        store = cls.from_offline_counts(keys, k, n, config, group=group)
        store.num_missing = missing
        return store

    # ------------------------------------------------------------------ collectives

    def _owner(self, keys: np.ndarray) -> np.ndarray:
        return np.mod(keys, self.dp_size)  # numpy's mod of int64 by a positive int is >= 0

    def _all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        if self.dp_size == 1:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor.numpy()

    def _exchange(self, rows: np.ndarray, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Send row i of `rows` (N, ...) to rank dest[i]; returns (received rows, send order, recv counts).

        Received rows are grouped by source rank in rank order, each group in the sender's order.
        """
        order = np.argsort(dest, kind="stable")
        send_counts = np.bincount(dest, minlength=self.dp_size).astype(np.int64)
        if self.dp_size == 1:
            return rows[order], order, send_counts
        recv_counts = torch.empty(self.dp_size, dtype=torch.int64)
        torch.distributed.all_to_all_single(recv_counts, torch.from_numpy(send_counts), group=self.group)
        recv_counts = recv_counts.numpy()
        send = torch.from_numpy(np.ascontiguousarray(rows[order]))
        recv = torch.empty((int(recv_counts.sum()),) + tuple(rows.shape[1:]), dtype=send.dtype)
        torch.distributed.all_to_all_single(
            recv, send, recv_counts.tolist(), send_counts.tolist(), group=self.group
        )
        return recv.numpy(), order, recv_counts

    def _exchange_ragged(
        self, values: np.ndarray, lengths: np.ndarray, dest: np.ndarray, order: np.ndarray
    ) -> np.ndarray:
        """Send the segments of `values` (concatenated, lengths (N,)) to dest[i], in `order`."""
        index = _ragged_index(np.concatenate(([0], np.cumsum(lengths)[:-1]))[order], lengths[order])
        send = values[index]
        if self.dp_size == 1:
            return send
        send_counts = np.bincount(dest, weights=lengths, minlength=self.dp_size).astype(np.int64)
        recv_counts = torch.empty(self.dp_size, dtype=torch.int64)
        torch.distributed.all_to_all_single(recv_counts, torch.from_numpy(send_counts), group=self.group)
        recv = torch.empty(int(recv_counts.sum()), dtype=torch.from_numpy(send[:0]).dtype)
        torch.distributed.all_to_all_single(
            recv, torch.from_numpy(np.ascontiguousarray(send)), recv_counts.tolist(), send_counts.tolist(),
            group=self.group,
        )
        return recv.numpy()

    def _agree(self, problem: str | None, what: str) -> None:
        """Raise ValueError on every rank if any rank's input is invalid, before any exchange, so
        a bad input on one rank is an error everywhere instead of a hang in a collective."""
        failing = int(self._all_reduce_sum(np.array([problem is not None], dtype=np.int64))[0])
        if failing:
            raise ValueError(f"value store {what}: {problem or f'{failing} other rank(s) passed invalid input'}")

    def _raise_everywhere(self, local_problems: int, message: str) -> None:
        """Agree across ranks whether any rank found a problem, so all raise together (no hang)."""
        total = int(self._all_reduce_sum(np.array([local_problems], dtype=np.int64))[0])
        if total:
            raise KeyError(message.format(count=total))

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the local arrays, found mask) of `keys`, both (B,)."""
        return self._index.locate(keys)

    def _gather_posteriors(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alpha, beta, found) of replicated `keys` on every rank: one all-reduce of (3, B)."""
        pos, found = self._locate(keys)
        posterior = self._posterior_c[pos]  # (B,) complex: alpha + i beta
        if not found.all():
            posterior[~found] = 0.0
        if self.dp_size == 1:
            return posterior.real.copy(), posterior.imag.copy(), found
        # each key has one owner: the sum adds exact zeros, so results are bit-identical to DP=1
        buffer = self._all_reduce_sum(np.stack([posterior.real, posterior.imag, found.astype(np.float64)]))
        return buffer[0], buffer[1], buffer[2] > 0

    # ------------------------------------------------------------------ replicated queries

    def posteriors(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) of `keys`, shapes (B,). Replicated: same keys on every rank."""
        keys = _as_keys(keys)
        alpha, beta, found = self._gather_posteriors(keys)
        if not found.all():
            raise KeyError(
                f"{int((~found).sum())} prompt keys are not in the value store (e.g. {int(keys[~found][0])})"
            )
        return alpha, beta

    def p_hat(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Estimated success probability alpha / (alpha + beta), (B,). Replicated."""
        return tracker.p_hat(*self.posteriors(keys))

    def weights(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sampling weights sqrt(p_hat (1 - p_hat)) + eps, (B,). Replicated.

        Keys not in the store get weight 0 under `missing: skip` and raise KeyError otherwise.
        """
        keys = _as_keys(keys)
        alpha, beta, found = self._gather_posteriors(keys)
        if not found.all() and self.config.missing != "skip":
            raise KeyError(
                f"{int((~found).sum())} prompt keys are not in the value store (e.g. {int(keys[~found][0])})"
            )
        weights = np.zeros(keys.size, dtype=np.float64)
        weights[found] = tracker.sampling_weights(tracker.p_hat(alpha[found], beta[found]), self.config.eps)
        return weights

    def sample(self, pool_keys: Sequence[int] | np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Positions in `pool_keys` of `batch_size` distinct prompts drawn without replacement,
        proportionally to their weights, in draw order. Replicated: with the same pool and the same
        generator state on every rank, every rank draws the same prompts."""
        pool_keys = _as_keys(pool_keys)
        weights = self.weights(pool_keys)
        try:
            chosen = tracker.weighted_sample_without_replacement(weights, batch_size, rng)
            if np.unique(pool_keys[chosen]).size < chosen.size:
                # the pool repeats a prompt (a dataset with duplicates): count each prompt once,
                # since one step can visit a prompt only once; redraw (same on every rank)
                _, first = np.unique(pool_keys, return_index=True)
                once = np.zeros_like(weights)
                once[first] = weights[first]
                chosen = tracker.weighted_sample_without_replacement(once, batch_size, rng)
            return chosen
        except ValueError as err:
            raise UserError(
                f"value store: cannot sample a batch of {batch_size} from a pool of {len(weights)} "
                f"prompts: {err} (raise the pool size or use `missing: prior`)"
            ) from err

    # ------------------------------------------------------------------ rank-local updates

    def _route(self, keys: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Send (key, payload row) to each key's owner; returns (keys, payload) received here."""
        rows = np.concatenate([keys[:, None], payload.reshape(keys.size, -1)], axis=1)
        received, _, _ = self._exchange(rows, self._owner(keys))
        return received[:, 0].copy(), received[:, 1:]

    def _owned_positions(self, keys: np.ndarray, what: str) -> np.ndarray:
        """Local positions of received keys; all ranks raise if any is unknown or repeated."""
        pos, found = self._locate(keys)
        unknown = int((~found).sum())
        repeated = keys.size - np.unique(keys).size
        self._raise_everywhere(
            unknown + repeated,
            f"value store {what}: {{count}} keys across ranks are not in the store or repeat within one step",
        )
        return pos

    def update(self, keys: Sequence[int] | np.ndarray, rewards: Sequence[float] | np.ndarray, rho: Sequence[float] | np.ndarray | float) -> None:
        """alpha <- rho alpha + r, beta <- rho beta + (1 - r) for this rank's samples.

        Rank-local: keys (B_r,), rewards in [0, 1] (B_r,), rho (B_r,) or a scalar; the union over
        ranks is the step's batch, each prompt at most once.
        """
        keys = _as_keys(keys)
        rewards = np.ascontiguousarray(np.asarray(rewards, dtype=np.float64).reshape(-1))
        rho = np.asarray(rho, dtype=np.float64)
        problem = None
        if rewards.shape != keys.shape:
            problem = f"rewards shape {rewards.shape} != keys shape {keys.shape}"
        elif rho.shape not in ((), keys.shape):
            problem = f"rho shape {rho.shape} is neither a scalar nor keys shape {keys.shape}"
        elif not (np.all(np.isfinite(rewards)) and np.all((rewards >= 0) & (rewards <= 1))):
            problem = "rewards must be finite and in [0, 1]"
        elif not np.all((rho > 0) & (rho <= 1)):
            problem = "rho must be in (0, 1]"
        self._agree(problem, "update")
        rho = np.broadcast_to(rho, keys.shape)
        # floats travel bit-exactly as int64 words next to their key
        payload = np.stack([rewards.view(np.int64), np.ascontiguousarray(rho).view(np.int64)], axis=1)
        keys, payload = self._route(keys, payload)
        pos = self._owned_positions(keys, "update")
        rewards, rho = np.ascontiguousarray(payload[:, 0]).view(np.float64), np.ascontiguousarray(payload[:, 1]).view(np.float64)
        posterior = self._posterior_c[pos]  # (B_owned,) complex: alpha + i beta
        alpha, beta = tracker.update_posterior(posterior.real, posterior.imag, rewards, rho)
        posterior.real, posterior.imag = alpha, beta
        self._posterior_c[pos] = posterior

    def store_responses(
        self,
        keys: Sequence[int] | np.ndarray,
        token_ids: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
        logprobs: Sequence[Sequence[float] | np.ndarray | torch.Tensor],
    ) -> None:
        """Keep each prompt's response of this visit and its log-probs after this step's update,
        for the next visit's drift D. Rank-local, like `update`; replaces what was stored."""
        keys = _as_keys(keys)
        problem = None
        if not len(token_ids) == len(logprobs) == keys.size:
            problem = "keys, token_ids and logprobs must have one entry per prompt"
        else:
            ids = [_as_numpy(t, np.int32) for t in token_ids]
            lps = [_as_numpy(t, np.float32) for t in logprobs]
            if any(len(a) != len(b) for a, b in zip(ids, lps)):
                problem = "token_ids and logprobs must have the same length for every prompt"
        self._agree(problem, "store_responses")
        lengths = np.array([len(t) for t in ids], dtype=np.int64)
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        flat_lps = np.concatenate(lps) if lps else np.zeros(0, np.float32)
        dest = self._owner(keys)
        received, order, _ = self._exchange(np.stack([keys, lengths], axis=1), dest)
        recv_ids = self._exchange_ragged(flat_ids, lengths, dest, order)
        recv_lps = self._exchange_ragged(flat_lps, lengths, dest, order)
        recv_keys, recv_lengths = received[:, 0].copy(), received[:, 1].copy()
        pos = self._owned_positions(recv_keys, "store_responses")
        fresh = self._slot[pos] < 0
        self._slot[pos[fresh]] = self._responses.new_slots(int(fresh.sum()))
        self._responses.put(self._slot[pos].astype(np.int64), recv_lengths, recv_ids, recv_lps)

    def stored_responses(self, keys: Sequence[int] | np.ndarray) -> StoredResponses:
        """The responses stored at the previous visits of this rank's `keys` (rank-local)."""
        keys = _as_keys(keys)
        dest = self._owner(keys)
        requests, order, recv_counts = self._exchange(keys[:, None], dest)
        requests = requests[:, 0].copy()
        pos = self._owned_positions(requests, "stored_responses")
        slots = self._slot[pos].astype(np.int64) if requests.size else np.zeros(0, np.int64)
        present = slots >= 0
        lengths = np.zeros(requests.size, dtype=np.int64)
        lengths[present], reply_ids, reply_lps = self._responses.gather(slots[present])
        # answers go back to the ranks that asked, in the order they were asked
        source = np.repeat(np.arange(self.dp_size), recv_counts)
        back_order = np.arange(requests.size)
        got, _, _ = self._exchange(np.stack([present.astype(np.int64), lengths], axis=1), source)
        got_ids = self._exchange_ragged(reply_ids, lengths, source, back_order)
        got_lps = self._exchange_ragged(reply_lps, lengths, source, back_order)
        got_present, got_lengths = got[:, 0] > 0, got[:, 1]
        # got_* follow `order` (requests grouped by owner); put them back in request order
        starts = np.concatenate(([0], np.cumsum(got_lengths)[:-1]))
        token_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * keys.size
        logprobs: list[np.ndarray] = [np.zeros(0, np.float32)] * keys.size
        present_out = np.zeros(keys.size, dtype=bool)
        for j, i in enumerate(order):
            if got_present[j]:
                span = slice(starts[j], starts[j] + got_lengths[j])
                token_ids[i], logprobs[i], present_out[i] = got_ids[span], got_lps[span], True
        return StoredResponses(present=present_out, token_ids=token_ids, logprobs=logprobs)

    # ------------------------------------------------------------------ state

    def num_prompts(self) -> int:
        """Prompts held over all ranks (a collective)."""
        return int(self._all_reduce_sum(np.array([self._keys.size], dtype=np.int64))[0])

    @property
    def local_nbytes(self) -> int:
        """Bytes of this rank's per-prompt arrays (keys, alpha, beta, slot, key index), without
        stored responses."""
        return self._keys.nbytes + self._posterior.nbytes + self._slot.nbytes + self._index.nbytes

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard as numpy arrays (copies) plus the DP layout it was written under."""
        has_response = np.flatnonzero(self._slot >= 0)
        lengths, tokens, logprobs = self._responses.gather(self._slot[has_response].astype(np.int64))
        return {
            "format": STATE_FORMAT,
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "keys": self._keys.copy(),
            "alpha": self._posterior[:, 0].copy(),
            "beta": self._posterior[:, 1].copy(),
            "response_keys": self._keys[has_response],
            "response_lengths": lengths,
            "response_token_ids": tokens,
            "response_logprobs": logprobs,
        }

    def load_state_dict(self, states: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Load this rank's shard, or re-shard: given every shard of a store saved at any DP size,
        keep the prompts this rank owns now. Values are copied bit for bit."""
        if isinstance(states, Mapping):
            states = [states]
        for state in states:
            if state.get("format") != STATE_FORMAT:
                raise UserError(f"value store state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        saved_dp = sorted({int(s["dp_size"]) for s in states})
        ranks = sorted(int(s["dp_rank"]) for s in states)
        own_shard = len(states) == 1 and saved_dp == [self.dp_size] and ranks == [self.dp_rank]
        complete = len(saved_dp) == 1 and ranks == list(range(saved_dp[0]))
        if not (own_shard or complete):
            raise UserError(
                f"value store state: got shards {ranks} of DP sizes {saved_dp}; pass this "
                "rank's own shard or all shards of one checkpoint"
            )
        keys, alpha, beta, r_keys, r_lengths, r_ids, r_lps = [], [], [], [], [], [], []
        for state in states:
            mine = self._owner(state["keys"]) == self.dp_rank
            keys.append(state["keys"][mine])
            alpha.append(state["alpha"][mine])
            beta.append(state["beta"][mine])
            lengths = state["response_lengths"]
            mine_r = self._owner(state["response_keys"]) == self.dp_rank
            offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) if lengths.size else lengths
            index = _ragged_index(offsets[mine_r], lengths[mine_r])
            r_keys.append(state["response_keys"][mine_r])
            r_lengths.append(lengths[mine_r])
            r_ids.append(state["response_token_ids"][index])
            r_lps.append(state["response_logprobs"][index])
        keys, alpha, beta = (np.concatenate(a) for a in (keys, alpha, beta))
        order = np.argsort(keys, kind="stable")
        _check_unique(keys[order])
        self._set_local(keys[order], alpha[order], beta[order])
        self._responses = _ResponseTable()
        r_keys, r_lengths = np.concatenate(r_keys), np.concatenate(r_lengths)
        pos, found = self._locate(r_keys)
        if not found.all():
            raise UserError("value store state: stored responses for prompts that are not in the store")
        self._slot[pos] = self._responses.new_slots(r_keys.size)
        self._responses.put(
            self._slot[pos].astype(np.int64), r_lengths,
            np.concatenate(r_ids).astype(np.int32), np.concatenate(r_lps).astype(np.float32),
        )

    def save(self, directory: str | os.PathLike) -> None:
        """Write this rank's shard atomically; rank 0 then writes the manifest (a collective).

        A directory without a manifest (a run killed mid-save) is not loadable. Saving over an
        earlier checkpoint first removes its manifest, so a save killed half-way can never pair
        the old manifest with a mix of old and new shards.
        """
        directory = Path(directory)
        if self.dp_rank == 0:
            (directory / _MANIFEST).unlink(missing_ok=True)
        if self.dp_size > 1:
            torch.distributed.barrier(group=self.group)
        state = self.state_dict()
        arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        shard = directory / _shard_name(self.dp_rank, self.dp_size)
        with atomic.open_for_write(shard) as fh:
            np.savez(fh, **arrays)
        if self.dp_size > 1:
            torch.distributed.barrier(group=self.group)
        if self.dp_rank == 0:
            manifest = {
                "format": STATE_FORMAT,
                "dp_size": self.dp_size,
                "shards": [_shard_name(r, self.dp_size) for r in range(self.dp_size)],
                "config": dataclasses.asdict(self.config),
            }
            atomic.write_json(directory / _MANIFEST, manifest, indent=1)
        if self.dp_size > 1:
            torch.distributed.barrier(group=self.group)

    @classmethod
    def load(cls, directory: str | os.PathLike, config: ValueConfig, *, group: Any = None) -> "ValueStore":
        """Load a store saved by `save` at any DP size, re-sharded for `group`."""
        directory = Path(directory)
        manifest_path = directory / _MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"value store checkpoint {directory}: no {_MANIFEST} (missing or incomplete save)")
        try:
            manifest = json.loads(manifest_path.read_text())
            shard_names = manifest["shards"]
            dp_size = int(manifest["dp_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{manifest_path}: not a value store manifest ({err})") from err
        states = []
        for rank, name in enumerate(shard_names):
            path = directory / name
            if not path.is_file():
                raise UserError(f"value store checkpoint {directory}: shard {name} is missing")
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
            state.update(format=manifest["format"], dp_size=dp_size, dp_rank=rank)
            states.append(state)
        store = cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), config, group=group)
        store.load_state_dict(states)
        return store


def _shard_name(rank: int, dp_size: int) -> str:
    return f"shard-{rank:05d}-of-{dp_size:05d}.npz"


def _check_unique(sorted_keys: np.ndarray) -> None:
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if dup.size:
        raise UserError(
            f"value store: {dup.size} duplicate prompt keys (e.g. {int(sorted_keys[dup[0]])}); "
            "a key was given twice, or a checkpoint's shards overlap"
        )


def _is_sorted(keys: np.ndarray) -> bool:
    return bool(np.all(keys[1:] >= keys[:-1]))


def _as_keys(keys: Sequence[int] | np.ndarray) -> np.ndarray:
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    if keys.dtype.kind not in "iu":
        raise TypeError(f"prompt keys must be integers (see megatron_spo.value.prompt_keys), got {keys.dtype}")
    return keys.astype(np.int64, copy=False).reshape(-1)


def _as_numpy(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _offline_counts(mapping: Mapping[str, Sequence[float]], source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique keys, successes, totals) of an offline mapping; prompts whose texts share a
    key (equal after stripping whitespace) pool their scores."""
    from megatron_spo.value.offline import offline_counts

    texts, successes, totals = offline_counts(mapping, source)
    keys = prompt_keys(texts)
    unique, inverse = np.unique(keys, return_inverse=True)
    if unique.size == keys.size:
        order = np.argsort(keys)
        return unique, successes[order], totals[order]
    logger.warning(
        "%s: %d prompts are equal to another after stripping whitespace; their scores are pooled",
        source, keys.size - unique.size,
    )
    k = np.bincount(inverse, weights=successes, minlength=unique.size).astype(np.int64)
    n = np.bincount(inverse, weights=totals, minlength=unique.size).astype(np.int64)
    return unique, k, n
