"""The `hf` rollout engine: batched sampling with a plain transformers model and a KV cache.

The lightweight embedded engine for CPU runs and machines without vLLM. It implements the same
contract as the vLLM engine, token for token where the math allows:

- requests are token ids (a prompt, possibly ending in a partial response); each is expanded
  into `n` sequences, which are sorted by length and decoded `max_num_seqs` at a time with left
  padding, explicit position ids and a `DynamicCache`; finished rows leave the cache at once;
- the sampling distribution of a row is `softmax(filter(logits / temperature))`, where the
  filter keeps the `top_k` largest logits, then the smallest set of tokens with probability
  mass >= `top_p` (vLLM's order and rule). Temperature 0 is greedy (argmax of the raw logits);
- the returned logprob of a token is its log-probability under that sampling distribution
  (under the raw `log_softmax(logits)` for greedy rows, there being no other distribution);
- a request with a seed samples its `j`-th sequence with its own generator seeded `seed + j`
  (vLLM's rule for n > 1), so its output does not depend on what else is in the batch; a draw
  is one uniform per step located in the row's cumulative distribution (inverse CDF);
- a sample ends with finish reason "stop" at an EOS / stop token id (included in the output) or
  when a stop string appears in its decoded text (the completing token is kept and the text is
  cut right after the stop string, vLLM's `include_stop_str_in_output=True`), and "length" at
  `max_tokens` or at the model's context length.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_spo import platform
from megatron_spo.rollout.engine import EngineConfig, find_stop_string
from megatron_spo.rollout.prompts import load_tokenizer
from megatron_spo.rollout.types import (
    Completion,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    check_sleep_level,
    wake_tags,
)

logger = logging.getLogger(__name__)

# Tokens decoded past a stop string's length when checking the tail of a sample: covers tokens
# that decode to nothing on their own (special tokens, partial UTF-8 byte sequences).
_STOP_WINDOW_SLACK = 8


@dataclasses.dataclass
class _Sequence:
    """One sample being decoded: the `sample_index`-th of request `request_index`."""

    request_index: int
    sample_index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stopped_by_string: bool = False


def sampling_logprobs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the per-row sampling distributions.

    logits (B, V) float32; temperature, top_p (B,) float; top_k (B,) long, <= 0 disables it.
    Rows with temperature 0 (greedy) get the raw `log_softmax(logits)`. Filtered-out tokens get
    -inf. Returns (B, V).
    """
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    k_on = (top_k > 0) & (top_k < vocab) & ~greedy
    if bool(k_on.any()):
        # value of the k-th largest logit per row; everything strictly below it is dropped
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
        scaled = scaled.masked_fill(k_on[:, None] & (scaled < kth), float("-inf"))
    p_on = (top_p < 1.0) & ~greedy
    if bool(p_on.any()):
        probs = scaled.softmax(dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # a token is dropped when the more likely tokens before it already reach top_p
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = (mass_before >= top_p[:, None]) & p_on[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.log_softmax(dim=-1)


def _eos_token_ids(model_dir: Path, model_config, tokenizer) -> set[int]:
    """EOS ids from generation_config.json, the model config and the tokenizer (vLLM's union)."""
    ids: set[int] = set()
    candidates = [getattr(model_config, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        candidates.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for value in candidates:
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


class HFEngine(RolloutEngine):
    """Rollout engine on a transformers causal LM (see the module docstring for the contract)."""

    def __init__(self, config: EngineConfig):
        import transformers

        self.config = config
        model_dir = Path(config.model)
        dtype = getattr(torch, config.dtype)
        self.device = platform.device()
        hf_config = transformers.AutoConfig.from_pretrained(model_dir)
        if config.load_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        self.model = model.to(self.device).eval()
        try:
            self.tokenizer = load_tokenizer(model_dir)
        except (OSError, ValueError):
            self.tokenizer = None  # token ids in, token ids out; stop strings unavailable
        self.eos_token_ids = _eos_token_ids(model_dir, hf_config, self.tokenizer)
        self.max_model_len = config.max_model_len or hf_config.max_position_embeddings
        self.vocab_size = hf_config.vocab_size
        self._generator = torch.Generator().manual_seed(config.seed)
        self._asleep = False
        # name -> tensor for every weight the model has, tied aliases included
        self._weights = self.model.state_dict(keep_vars=True)

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self._require_awake("HFEngine.generate")
        sequences = [seq for index, request in enumerate(requests) for seq in self._expand(index, request)]
        # similar lengths together: less padding per batch
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].prompt))
        batch = self.config.max_num_seqs
        with torch.inference_mode():
            for start in range(0, len(order), batch):
                self._decode([sequences[i] for i in order[start : start + batch]])
        completions: list[list[Completion]] = [[] for _ in requests]
        for seq in sequences:
            completions[seq.request_index].append(self._completion(seq))
        return [GenerationResult(request=r, completions=c) for r, c in zip(requests, completions)]

    def open_stream(self, max_inflight: int):
        """Continuous batching over this engine (`hf_stream.HFStream`), the per-sequence results
        of `generate`. Models whose KV cache is not plain full attention (sliding-window, linear
        attention layers) get `streaming.BatchedStream`: their cache rows cannot be realigned."""
        from megatron_spo.rollout.hf_stream import HFStream
        from megatron_spo.rollout.streaming import BatchedStream

        if HFStream.supports(self.model):
            return HFStream(self, max_inflight)
        logger.warning("%s: no continuous batching for this cache layout, streaming whole batches",
                       type(self.model).__name__)
        return BatchedStream(self, max_inflight)

    def _require_awake(self, caller: str) -> None:
        """Refuse to run the model while its weights are offloaded by `sleep`."""
        if self._asleep:
            raise RuntimeError(f"{caller} called while asleep; call wake_up() first")

    def _expand(self, index: int, request: GenerationRequest) -> list[_Sequence]:
        prompt = list(request.prompt_token_ids)
        self._check_request(f"request {index}", prompt, request.params)
        return self._new_sequences(index, prompt, request.params)

    def _check_request(self, label: str, prompt: list[int], params: SamplingParams) -> None:
        """Refuse a prompt the model cannot continue (empty, ids out of the vocabulary, no room
        left in the context) and stop strings without a tokenizer; `label` names the request."""
        if not prompt:
            raise ValueError(f"{label}: empty prompt_token_ids")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"{label}: token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"{label}: prompt of {len(prompt)} tokens leaves no room in the context "
                f"length {self.max_model_len}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{label}: stop strings need a tokenizer in {self.config.model}")

    def _new_sequences(self, index: int, prompt: list[int], params: SamplingParams) -> list[_Sequence]:
        """The `params.n` sequences of one checked request: the `j`-th of a seeded request draws
        from its own generator seeded `seed + j`, unseeded ones share the engine's generator."""
        stop_ids = frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids)
        sequences = []
        for j in range(params.n):
            if params.seed is None:
                generator = self._generator
            else:
                generator = torch.Generator().manual_seed(params.seed + j)
            sequences.append(_Sequence(index, j, prompt, params, generator, stop_ids))
        return sequences

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids), each (B, max length) on the engine's device:
        the prompts left-padded with id 0 and mask 0, positions counting real tokens only."""
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return tuple(t.to(self.device) for t in (input_ids, attention_mask, position_ids))

    def _prefill(self, input_ids, attention_mask, position_ids):
        """One forward over left-padded prompts into a fresh KV cache; returns (output, cache)
        with the logits of each row's last position only (`generate` and `HFStream` admission)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out, cache

    def _decode(self, seqs: list[_Sequence]) -> None:
        """Decode one batch to completion, filling each sequence's tokens and finish reason."""
        input_ids, attention_mask, position_ids = self._left_padded([s.prompt for s in seqs])
        next_position = torch.tensor([len(s.prompt) for s in seqs], device=self.device)  # (B,)

        active = seqs  # row r of the cache is active[r]
        out, cache = self._prefill(input_ids, attention_mask, position_ids)
        while True:
            self._sample_next(out.logits[:, -1, :].float().cpu(), active)
            keep = [row for row, seq in enumerate(active) if seq.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(active):
                keep_rows = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_rows)
                attention_mask = attention_mask[keep_rows]
                next_position = next_position[keep_rows]
                active = [active[row] for row in keep]
            tokens = torch.tensor([seq.token_ids[-1] for seq in active], device=self.device)[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(keep), 1)], dim=1)
            out = self.model(
                input_ids=tokens,
                attention_mask=attention_mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            next_position = next_position + 1

    def _sample_next(self, logits: torch.Tensor, seqs: list[_Sequence]) -> None:
        """Sample one token per row of `logits` (B, V) float32 on the host, row r for `seqs[r]`:
        append it and its logprob to the sequence and apply the finish rules."""
        temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long)
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32)
        logprobs = sampling_logprobs(logits, temperature, top_k, top_p)
        next_tokens = self._pick_tokens(logits, logprobs, seqs)
        token_logprobs = logprobs.gather(1, torch.tensor(next_tokens)[:, None])[:, 0].tolist()
        for seq, token, logprob in zip(seqs, next_tokens, token_logprobs):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            self._check_finished(seq)

    def _pick_tokens(self, logits: torch.Tensor, logprobs: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """Next token per row: argmax of the raw logits for greedy rows, a draw from the
        sampling distribution otherwise, by inverse CDF: one uniform per row from the row's
        generator (seeded rows have their own; unseeded rows share the engine's), located in the
        row's cumulative probabilities. (One `rand` per generator instead of one `multinomial`
        per row: ~7x less time per step at batch 64.)"""
        tokens = logits.argmax(dim=-1)  # (B,)
        by_generator: dict[int, list[int]] = {}
        for row, seq in enumerate(seqs):
            if seq.params.temperature > 0:
                by_generator.setdefault(id(seq.generator), []).append(row)
        if not by_generator:
            return tokens.tolist()
        rows = [row for group in by_generator.values() for row in group]
        uniforms = torch.cat(
            [torch.rand(len(group), generator=seqs[group[0]].generator) for group in by_generator.values()]
        )  # (R,) in [0, 1)
        index = torch.tensor(rows)
        cdf = logprobs[index].exp().cumsum(dim=-1)  # (R, V); filtered tokens add 0
        # first token whose cumulative mass exceeds u * total: never a zero-probability token
        drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
        tokens[index] = drawn.clamp(max=logits.shape[-1] - 1)
        return tokens.tolist()

    def _check_finished(self, seq: _Sequence) -> None:
        token = seq.token_ids[-1]
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
            return
        if seq.params.stop:
            window = max(len(s) for s in seq.params.stop) + _STOP_WINDOW_SLACK
            tail = seq.token_ids[-window:]
            tail_text = self.tokenizer.decode(tail, skip_special_tokens=True)
            new_chars = len(tail_text) - len(self.tokenizer.decode(tail[:-1], skip_special_tokens=True))
            if new_chars > 0 and find_stop_string(tail_text, seq.params.stop, new_chars) is not None:
                seq.finish_reason = "stop"
                seq.stopped_by_string = True  # the text is cut in _completion
                return
        if len(seq.token_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        elif len(seq.prompt) + len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"

    def _completion(self, seq: _Sequence) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
            if seq.stopped_by_string:  # cut right after the (first) stop string
                end = find_stop_string(text, seq.params.stop, len(text))
                text = text if end is None else text[:end]
        return Completion(
            token_ids=seq.token_ids, logprobs=seq.logprobs, finish_reason=seq.finish_reason, text=text
        )

    # ------------------------------------------------------------------ weights and memory

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the model in place (any subset of its weights)."""
        with torch.no_grad():
            for name, tensor in named_tensors:
                target = self._weights.get(name)
                if target is None:
                    raise ValueError(
                        f"update_weights: {name!r} is not a weight of the {type(self.model).__name__} "
                        f"in {self.config.model}"
                    )
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(tensor)

    def sleep(self, level: int = 1) -> None:
        """Offload the weights to host memory when they live on an accelerator (on a CPU-only
        machine they are already there). Both levels keep the host copy: this engine is for small
        models, and a level-2 caller re-syncs the weights anyway. The KV cache lives only inside
        `generate`, so there is none to free. `generate` is refused until the weights are awake."""
        check_sleep_level(level)
        if not self._asleep:
            self.model.to(platform.host_device())
            platform.release_cached_memory()
        self._asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        wanted = wake_tags(tags)  # checked also when awake
        if self._asleep and "weights" in wanted:
            self.model.to(self.device)
            self._asleep = False

    def shutdown(self) -> None:
        self._weights = {}
        self.model = None
        self._asleep = True

