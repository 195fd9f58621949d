"""The one mapping between Megatron-Core's sharded parameters and Hugging Face tensor names.

It serves three users: HF -> Megatron loading (conversion, training start), Megatron -> HF export
(conversion, saving), and live weight sync into the rollout engine, which consumes the same
`(hf_name, full_tensor)` stream that the HF writer does.

The mapping is a table per architecture family: each Megatron parameter has a rule naming its HF
tensors and its tensor-parallel layout:

- `replicated`: identical on every TP rank (norms).
- `column`: split along dim 0 (vocab-parallel embedding / output layer).
- `row`: split along dim 1 (attention output and MLP down projections).
- `qkv`: Megatron's fused QKV is laid out per KV group as [q heads of the group, k, v]; TP ranks
  hold whole groups. (A plain [q; k; v] concatenation is wrong and a logits test catches it.)
- `gate_up`: fused fc1 is, on each TP rank, [gate shard; up shard].

Loading reads, on each rank, only the rows / columns of each HF tensor that rank holds
(`safetensors` slices, memory-mapped). Export gathers in buckets: the shards of many parameters are
packed into one flat buffer per bucket, gathered with one broadcast per TP rank (while the previous
bucket is handed out) and broadcast with one collective over PP, so peak extra memory is a few
buckets, not the model, and the number of collectives grows with the buckets, not the tensors.
Each shard is then copied once, straight into its place in the HF tensor (`bench/bridge.py`
measures the export against a plain copy of the same bytes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch

from megatron_spo.errors import UserError
from megatron_spo.models.hf_config import ModelSpec
from megatron_spo.platform import ParallelContext

Layout = Literal["replicated", "column", "row", "qkv", "gate_up"]

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Rule:
    mcore: str
    """Megatron parameter name; for decoder layers relative to `decoder.layers.<i>.`."""
    hf: tuple[str, ...]
    """HF tensor names; `{i}` is the global layer index."""
    layout: Layout


_LAYER = "model.layers.{i}."

# Llama, Qwen2 and Qwen3 share one layout; a rule whose Megatron parameter a model does not have
# (QKV bias, QK-norm) is simply never matched. TE-spec aliases fuse the pre-attention and pre-MLP
# norms into the following linear layer.
LLAMA_LIKE_LAYER_RULES = (
    Rule("input_layernorm.weight", (_LAYER + "input_layernorm.weight",), "replicated"),
    Rule("self_attention.linear_qkv.layer_norm_weight", (_LAYER + "input_layernorm.weight",), "replicated"),
    Rule(
        "self_attention.linear_qkv.weight",
        tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        "self_attention.linear_qkv.bias",
        tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "qkv",
    ),
    Rule("self_attention.q_layernorm.weight", (_LAYER + "self_attn.q_norm.weight",), "replicated"),
    Rule("self_attention.k_layernorm.weight", (_LAYER + "self_attn.k_norm.weight",), "replicated"),
    Rule("self_attention.linear_proj.weight", (_LAYER + "self_attn.o_proj.weight",), "row"),
    Rule("pre_mlp_layernorm.weight", (_LAYER + "post_attention_layernorm.weight",), "replicated"),
    Rule("mlp.linear_fc1.layer_norm_weight", (_LAYER + "post_attention_layernorm.weight",), "replicated"),
    Rule(
        "mlp.linear_fc1.weight",
        (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"),
        "gate_up",
    ),
    Rule("mlp.linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",), "row"),
)
LLAMA_LIKE_GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "column"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("output_layer.weight", ("lm_head.weight",), "column"),
)

MAPPINGS: dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {
    "LlamaForCausalLM": (LLAMA_LIKE_LAYER_RULES, LLAMA_LIKE_GLOBAL_RULES),
    "Qwen2ForCausalLM": (LLAMA_LIKE_LAYER_RULES, LLAMA_LIKE_GLOBAL_RULES),
    "Qwen3ForCausalLM": (LLAMA_LIKE_LAYER_RULES, LLAMA_LIKE_GLOBAL_RULES),
}

_LAYER_PARAM = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclasses.dataclass
class BoundParam:
    """One local Megatron parameter with its rule and the HF tensors it maps to."""

    name: str
    param: torch.Tensor
    rule: Rule
    hf_names: tuple[str, ...]
    exported: bool
    """False for the last stage's copy of tied embeddings (HF has no lm_head then)."""


class WeightBridge:
    """Maps one model's Megatron shards to HF tensors and back, for one parallel layout."""

    def __init__(self, spec: ModelSpec, parallel: ParallelContext):
        if spec.architecture not in MAPPINGS:
            raise UserError(
                f"no weight mapping for {spec.architecture}; supported: {', '.join(MAPPINGS)}"
            )
        self.spec = spec
        self.parallel = parallel
        layer_rules, global_rules = MAPPINGS[spec.architecture]
        self._layer_rules = {rule.mcore: rule for rule in layer_rules}
        self._global_rules = {rule.mcore: rule for rule in global_rules}
        self._export_plan_cache: dict[tuple, list[list[tuple]]] = {}
        # two TP gather buffers per dtype, kept between exports (a weight sync runs every step):
        # fresh ones would be page-faulted in on every export, which on CPUs cost as much as the
        # gather itself (bench/bridge.py); on GPUs the caching allocator would keep them anyway
        self._gather_buffers: dict[torch.dtype, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ binding

    def bind(self, chunks: Sequence[torch.nn.Module]) -> list[BoundParam]:
        """Every local parameter of every chunk with its rule; unknown parameters are an error."""
        bound = []
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                bound.append(self._bind_one(chunk, name, param))
        return bound

    def _bind_one(self, chunk, name: str, param: torch.Tensor) -> BoundParam:
        match = _LAYER_PARAM.match(name)
        if match:
            local_index, rest = int(match.group(1)), match.group(2)
            rule = self._layer_rules.get(rest)
            layer = chunk.decoder.layers[local_index].layer_number - 1
            hf_names = tuple(h.format(i=layer) for h in rule.hf) if rule else ()
            exported = True
        else:
            rule = self._global_rules.get(name)
            hf_names = rule.hf if rule else ()
            exported = True
            if rule and name == "output_layer.weight" and self.spec.tie_word_embeddings:
                # the last stage's copy of the tied embedding: loaded from the embedding,
                # never exported (HF ties lm_head to embed_tokens itself)
                hf_names = ("model.embed_tokens.weight",)
                exported = False
        if rule is None:
            raise UserError(
                f"{self.spec.architecture}: Megatron parameter {name!r} has no HF mapping "
                "(is the layer spec one this bridge knows?)"
            )
        return BoundParam(name=name, param=param, rule=rule, hf_names=hf_names, exported=exported)

    # ------------------------------------------------------------------ layouts

    def _qkv_dims(self) -> tuple[int, int, int]:
        """(KV groups on this TP rank, query heads per group, head dim)."""
        spec = self.spec
        return (
            spec.num_kv_heads // self.parallel.tp,
            spec.num_attention_heads // spec.num_kv_heads,
            spec.head_dim,
        )

    def read_shard(self, rule: Rule, hf_names: tuple[str, ...], read: Callable) -> torch.Tensor:
        """This TP rank's shard of one Megatron parameter.

        `read(hf_name, dim, start, stop)` returns rows (dim 0) or columns (dim 1) [start, stop) of
        an HF tensor, or the whole tensor when `dim` is None.
        """
        tp, r = self.parallel.tp, self.parallel.tp_rank
        if rule.layout == "replicated":
            return read(hf_names[0], None, 0, 0)
        if rule.layout in ("column", "row"):
            dim = 0 if rule.layout == "column" else 1
            size = read.shape(hf_names[0])[dim]
            step = size // tp
            return read(hf_names[0], dim, r * step, (r + 1) * step)
        if rule.layout == "gate_up":
            size = read.shape(hf_names[0])[0] // tp
            gate = read(hf_names[0], 0, r * size, (r + 1) * size)
            up = read(hf_names[1], 0, r * size, (r + 1) * size)
            return torch.cat([gate, up], dim=0)
        if rule.layout == "qkv":
            groups, q_per_group, head_dim = self._qkv_dims()
            g0 = r * groups
            q = read(hf_names[0], 0, g0 * q_per_group * head_dim, (g0 + groups) * q_per_group * head_dim)
            k = read(hf_names[1], 0, g0 * head_dim, (g0 + groups) * head_dim)
            v = read(hf_names[2], 0, g0 * head_dim, (g0 + groups) * head_dim)
            rest = q.shape[1:]
            per_group = [
                q.reshape(groups, q_per_group * head_dim, *rest),
                k.reshape(groups, head_dim, *rest),
                v.reshape(groups, head_dim, *rest),
            ]
            return torch.cat(per_group, dim=1).reshape(-1, *rest)
        raise AssertionError(rule.layout)

    def merge_shards(self, rule: Rule, hf_names: tuple[str, ...], shards: list[torch.Tensor]):
        """HF tensors from the TP shards of one Megatron parameter: [(hf_name, tensor), ...]."""
        if rule.layout == "replicated":
            return [(hf_names[0], shards[0])]
        if rule.layout in ("column", "row"):
            dim = 0 if rule.layout == "column" else 1
            full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)
            return [(hf_names[0], full)]
        if rule.layout == "gate_up":
            half = shards[0].shape[0] // 2
            if len(shards) == 1:
                return [(hf_names[0], shards[0][:half]), (hf_names[1], shards[0][half:])]
            gate = torch.cat([s[:half] for s in shards], dim=0)
            up = torch.cat([s[half:] for s in shards], dim=0)
            return [(hf_names[0], gate), (hf_names[1], up)]
        if rule.layout == "qkv":
            groups, q_per_group, head_dim = self._qkv_dims()
            rest = shards[0].shape[1:]
            grouped = [s.view(groups, (q_per_group + 2) * head_dim, *rest) for s in shards]
            full = grouped[0] if len(grouped) == 1 else torch.cat(grouped, dim=0)
            q_rows = q_per_group * head_dim
            return [
                (hf_names[0], full[:, :q_rows].reshape(-1, *rest)),
                (hf_names[1], full[:, q_rows : q_rows + head_dim].reshape(-1, *rest)),
                (hf_names[2], full[:, q_rows + head_dim :].reshape(-1, *rest)),
            ]
        raise AssertionError(rule.layout)

    # ------------------------------------------------------------------ load

    @torch.no_grad()
    def load_hf(self, chunks: Sequence[torch.nn.Module], hf_dir: str | Path, *, reader=None) -> None:
        """Load an HF safetensors checkpoint (single file or sharded index) into the chunks.

        `reader` replaces the safetensors reader (its `check`, `shape`, `__call__`, `close`): the
        GPU dry run reads tensors of the right shapes with no data."""
        reader = reader or SafetensorsReader(hf_dir)
        try:
            for bound in self.bind(chunks):
                for hf_name in bound.hf_names:
                    reader.check(hf_name)
                shard = self.read_shard(bound.rule, bound.hf_names, reader)
                if tuple(shard.shape) != tuple(bound.param.shape):
                    raise UserError(
                        f"{hf_dir}: {', '.join(bound.hf_names)} gives shape {tuple(shard.shape)} for "
                        f"{bound.name}, expected {tuple(bound.param.shape)} (config and weights disagree?)"
                    )
                bound.param.copy_(shard)
        finally:
            reader.close()

    # ------------------------------------------------------------------ export

    def _export_plan(self, chunks: Sequence[torch.nn.Module], bound: list[BoundParam]) -> list[list[tuple]]:
        """Per pipeline stage: [(mcore_name, rule_key, hf_names, shard_shape)] of exported params.

        Stages learn each other's parameters with one object collective, once per model.
        """
        key = tuple(id(c) for c in chunks)
        if key in self._export_plan_cache:
            return self._export_plan_cache[key]
        mine = [
            (b.name, b.rule.mcore, b.rule.layout, b.hf_names, tuple(b.param.shape))
            for b in bound
            if b.exported
        ]
        if self.parallel.pp > 1:
            plans: list = [None] * self.parallel.pp
            torch.distributed.all_gather_object(plans, mine, group=self.parallel.pp_group)
        else:
            plans = [mine]
        self._export_plan_cache[key] = plans
        return plans

    @torch.no_grad()
    def export_hf(
        self,
        chunks: Sequence[torch.nn.Module],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, full_tensor)` for the whole model on every rank, bucket by bucket.

        Every rank of the model-parallel group must iterate to the end (the buckets are
        collectives). At TP=1 and PP=1 tensors may alias the model's parameters (copy what you
        keep past the next optimizer step); otherwise each is a fresh tensor (at PP > 1 a view of
        its bucket's fresh buffer) that stays valid after later buckets. At TP > 1 the bridge
        keeps two gather buffers of up to `bucket_bytes` each for the next export.
        `dtype` converts before communication, so a bf16 export moves half the bytes of fp32.
        """
        for bucket in self.export_buckets(chunks, bucket_bytes=bucket_bytes, dtype=dtype):
            yield from bucket

    def release_buffers(self) -> None:
        """Drop the TP gather buffers kept between exports (each as large as the largest
        bucket x TP, e.g. 2.3 GiB for Qwen3-8B at TP 2); the next export allocates them again.
        Colocation calls this while the engine generates."""
        self._gather_buffers.clear()

    @torch.no_grad()
    def export_buckets(
        self,
        chunks: Sequence[torch.nn.Module],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        dtype: torch.dtype | None = None,
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Like `export_hf`, one list of `(hf_name, full_tensor)` per bucket."""
        par = self.parallel
        bound = self.bind(chunks)
        by_name = {b.name: b for b in bound}
        plans = self._export_plan(chunks, bound)
        param_dtype = bound[0].param.dtype if bound else torch.float32
        out_dtype = dtype or param_dtype
        elem = torch.empty((), dtype=out_dtype).element_size()

        if par.tp == 1 and par.pp == 1:
            yield from self._export_local_buckets(bound, bucket_bytes, out_dtype, elem)
            return

        # Each HF tensor is a fresh tensor (at PP > 1 a view of its bucket's fresh buffer `out`),
        # already in HF layout, so tensors stay valid after later buckets (the weight sync holds a
        # bucket of the bridge's buckets). At TP > 1 the split shards travel packed in `gathered`
        # (tp, shard elements of the bucket) and are copied from there into their HF places once;
        # the gather of the next bucket runs while this one is placed and consumed (two gather
        # buffers, reused for every bucket and kept for the next export). Replicated tensors
        # (norms) are copied from the local parameter: TP ranks hold identical copies, so they
        # need no gather.
        pp_ranks = par.pp_ranks
        buckets = []  # (stage, entries, split numel per entry, HF numel per entry)
        for stage, plan in enumerate(plans):
            for entries in _split_by_bytes(plan, bucket_bytes, elem, par.tp):
                shard_numels = [math.prod(shape) for *_, shape in entries]
                split = [0 if e[2] == "replicated" else n for e, n in zip(entries, shard_numels)]
                hf = [n if e[2] == "replicated" else n * par.tp for e, n in zip(entries, shard_numels)]
                buckets.append((stage, entries, split, hf))
        # the buckets this rank gathers over TP, in order; the j-th uses gather buffer j % 2
        to_gather = [k for k, b in enumerate(buckets) if b[0] == par.pp_rank and par.tp > 1 and sum(b[2])]
        gather_index = {k: j for j, k in enumerate(to_gather)}
        buffers = self._gather_buffers.setdefault(
            out_dtype, [torch.empty(0, dtype=out_dtype, device=_device_of(bound)) for _ in range(2)]
        )
        pending: dict[int, tuple[torch.Tensor, list]] = {}  # bucket -> (gathered, work handles)

        def start_gather(j: int) -> None:
            _stage, entries, split, _hf = buckets[to_gather[j]]
            slot = j % 2
            total = sum(split)
            if buffers[slot].numel() < par.tp * total:
                buffers[slot] = torch.empty(par.tp * total, dtype=out_dtype, device=buffers[slot].device)
            gathered = buffers[slot][: par.tp * total].view(par.tp, total)
            pending[to_gather[j]] = (gathered, self._gather_shards(entries, split, by_name, gathered))

        for k, (stage, entries, split, hf_numels) in enumerate(buckets):
            # PP > 1: the stage's bucket is broadcast as one buffer, which the tensors then view
            out = None
            if par.pp > 1:
                out = torch.empty(sum(hf_numels), dtype=out_dtype, device=_device_of(bound))
            places = self._hf_places(entries, out, out_dtype, _device_of(bound))
            if par.pp_rank == stage:
                gathered = None
                if k in gather_index:
                    j = gather_index[k]
                    if k not in pending:  # the first; later ones were started a bucket ahead
                        start_gather(j)
                    if j + 1 < len(to_gather):
                        start_gather(j + 1)  # overlaps this bucket's placing and consumption
                    gathered, works = pending.pop(k)
                    for work in works:
                        work.wait()
                self._place_bucket(entries, split, places, gathered, by_name)
            if par.pp > 1:
                torch.distributed.broadcast(out, src=pp_ranks[stage], group=par.pp_group)
            yield [item for targets in places for item in targets]

    def _export_local_buckets(self, bound, bucket_bytes: int, out_dtype: torch.dtype, elem: int):
        """`export_buckets` at TP = PP = 1: nothing to communicate, so the HF tensors are views of
        the parameters (converted to `out_dtype` if asked)."""
        batch, batch_bytes = [], 0
        for b in bound:
            if not b.exported:
                continue
            shard = b.param.detach().to(out_dtype)
            batch.extend(self.merge_shards(b.rule, b.hf_names, [shard]))
            batch_bytes += shard.numel() * elem
            if batch_bytes >= bucket_bytes:
                yield batch
                batch, batch_bytes = [], 0
        if batch:
            yield batch

    def _place_bucket(self, entries, split_numels: list[int], places, gathered: torch.Tensor | None, by_name):
        """Copy one bucket's shards into their HF tensors `places`: split shards from `gathered`
        (tp, split elements of the bucket, packed in entry order), replicated ones (and all of them
        without a gather) from the local parameter."""
        tp = self.parallel.tp
        offset = 0
        for (name, _rule, layout, _hf, shape), n, targets in zip(entries, split_numels, places):
            if gathered is not None and n:
                shards = gathered[:, offset : offset + n].view(tp, *shape)
                offset += n
            else:  # replicated, or TP=1: the local parameter is the only shard
                shards = by_name[name].param.detach().unsqueeze(0)
            self._place_shards(layout, shards, [t for _, t in targets])

    def _gather_shards(self, entries, split_numels: list[int], by_name, gathered: torch.Tensor) -> list:
        """Start filling `gathered` (tp, total) with every TP rank's split shards of these entries,
        packed; returns the collectives' work handles to wait on.

        An all-gather written as TP broadcasts, each straight into its row: gloo's all-gather
        stages the whole result in a fresh temporary, copies it out and measured 4-7x slower on
        this machine (bench/bridge.py); a ring broadcast moves about the same bytes on NCCL.
        """
        par = self.parallel
        send = gathered[par.tp_rank]  # (total,) this rank's row
        offset = 0
        for (name, *_), n in zip(entries, split_numels):
            if n:
                send[offset : offset + n].copy_(by_name[name].param.detach().reshape(-1))
                offset += n
        return [
            torch.distributed.broadcast(gathered[t], group=par.tp_group, group_src=t, async_op=True)
            for t in range(par.tp)
        ]

    def _hf_shapes(self, layout: Layout, shard_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of the HF tensors one parameter's TP shards (each `shard_shape`) make up."""
        tp = self.parallel.tp
        rows, rest = shard_shape[0], tuple(shard_shape[1:])
        if layout == "replicated":
            return [tuple(shard_shape)]
        if layout == "column":
            return [(rows * tp, *rest)]
        if layout == "row":
            return [(rows, rest[0] * tp)]
        if layout == "gate_up":
            return [(rows // 2 * tp, *rest)] * 2
        if layout == "qkv":
            groups, q_per_group, head_dim = self._qkv_dims()
            kv_rows = tp * groups * head_dim
            return [(kv_rows * q_per_group, *rest), (kv_rows, *rest), (kv_rows, *rest)]
        raise AssertionError(layout)

    def _hf_places(self, entries, out: torch.Tensor | None, dtype, device) -> list[list[tuple]]:
        """Per plan entry, `[(hf_name, empty HF tensor)]`: consecutive views of `out` when given
        (it must hold them all), else one fresh tensor each."""
        places, offset = [], 0
        for (_name, _rule, layout, hf_names, shape) in entries:
            targets = []
            for hf_name, hf_shape in zip(hf_names, self._hf_shapes(layout, tuple(shape))):
                if out is None:
                    # one allocation per tensor, as a plain copy of the tensor would make: the
                    # allocator recycles the memory of tensors the consumer let go (a fresh bucket
                    # -sized buffer would be fresh pages each time, costly to fault in on CPUs)
                    targets.append((hf_name, torch.empty(hf_shape, dtype=dtype, device=device)))
                else:
                    numel = math.prod(hf_shape)
                    targets.append((hf_name, out[offset : offset + numel].view(hf_shape)))
                    offset += numel
            places.append(targets)
        return places

    def _place_shards(self, layout: Layout, shards: torch.Tensor, targets: list[torch.Tensor]) -> None:
        """Copy the TP shards of one parameter, `shards` (tp, *shard_shape), into its HF tensors.

        The inverse of `read_shard`, written as one strided copy per HF tensor (no intermediate
        `torch.cat`): HF tensors are viewed as (tp, *shard part) so each shard lands in place.
        """
        tp = shards.shape[0]
        if layout == "replicated":
            targets[0].copy_(shards[0])
        elif layout == "column":
            # (tp * rows, *rest) = tp blocks of rows
            targets[0].view(tp, *shards.shape[1:]).copy_(shards)
        elif layout == "row":
            # (rows, tp * cols): shard t holds columns [t * cols, (t + 1) * cols)
            rows, cols = shards.shape[1:]
            targets[0].view(rows, tp, cols).copy_(shards.transpose(0, 1))
        elif layout == "gate_up":
            # each shard is [gate rows of rank t; up rows of rank t]
            half = shards.shape[1] // 2
            for target, part in zip(targets, (shards[:, :half], shards[:, half:])):
                target.view(tp, half, *shards.shape[2:]).copy_(part)
        elif layout == "qkv":
            # each shard is, per KV group of rank t, [q heads of the group; k; v]
            groups, q_per_group, head_dim = self._qkv_dims()
            rest = shards.shape[2:]
            grouped = shards.view(tp, groups, (q_per_group + 2) * head_dim, *rest)
            q_rows = q_per_group * head_dim
            parts = (
                grouped[:, :, :q_rows],
                grouped[:, :, q_rows : q_rows + head_dim],
                grouped[:, :, q_rows + head_dim :],
            )
            for target, part in zip(targets, parts):
                target.view(tp, groups, part.shape[2], *rest).copy_(part)
        else:
            raise AssertionError(layout)


def _device_of(bound: list[BoundParam]) -> torch.device:
    return bound[0].param.device if bound else torch.device("cpu")


def _split_by_bytes(plan: list[tuple], limit: int, elem: int, tp: int) -> Iterator[list[tuple]]:
    """Consecutive plan entries whose full (HF) tensors add up to at most `limit` bytes."""
    bucket, size = [], 0
    for entry in plan:
        nbytes = math.prod(entry[-1]) * elem * (1 if entry[2] == "replicated" else tp)
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += nbytes
    if bucket:
        yield bucket


class SafetensorsReader:
    """Reads HF tensors, or slices of them, from a safetensors checkpoint (single or sharded)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        if not self.hf_dir.is_dir():
            raise UserError(f"model directory {hf_dir} " + ("is a file, not a directory" if Path(hf_dir).exists()
                                                             else "does not exist"))
        index = self.hf_dir / "model.safetensors.index.json"
        single = self.hf_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index} is not a valid safetensors index: {err}") from err
            self.weight_map = {name: self.hf_dir / file for name, file in weight_map.items()}
        elif single.is_file():
            self.weight_map = None
            self._single = single
        else:
            raise UserError(
                f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are supported)"
            )
        self._handles: dict[Path, object] = {}

    def _file_of(self, name: str) -> Path:
        if self.weight_map is None:
            return self._single
        if name not in self.weight_map:
            raise UserError(f"{self.hf_dir}: tensor {name!r} is not in model.safetensors.index.json")
        return self.weight_map[name]

    def _handle(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            if not path.is_file():
                raise UserError(f"{self.hf_dir}: safetensors shard {path.name} is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise UserError(f"{path}: cannot be read as safetensors: {err}") from err
        return self._handles[path]

    def check(self, name: str) -> None:
        handle = self._handle(self._file_of(name))
        if name not in handle.keys():
            raise UserError(f"{self._file_of(name)}: tensor {name!r} is missing")

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self._file_of(name)).get_slice(name).get_shape())

    def __call__(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        piece = self._handle(self._file_of(name)).get_slice(name)
        try:
            if dim is None:
                return piece[:]
            if dim == 0:
                return piece[start:stop]
            return piece[:, start:stop]
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{self._file_of(name)}: tensor {name!r} cannot be read: {err}") from err

    def close(self) -> None:
        self._handles.clear()
