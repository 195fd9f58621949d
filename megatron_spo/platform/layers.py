"""The Transformer layer spec of this platform (part of `megatron_spo.platform`).

Transformer Engine's spec on a GPU that has it; otherwise Megatron's local spec with torch SDPA as
core attention and a torch RMSNorm that works under sequence parallelism. `gpt_layer_spec` and
`gpt_block_spec` are what callers use, as `platform.gpt_layer_spec` / `platform.gpt_block_spec`.
"""

from __future__ import annotations

import torch

from megatron_spo import platform


class SDPAAttention(torch.nn.Module):
    """Core attention for the torch-native spec: `scaled_dot_product_attention` on CPU.

    Drop-in for Megatron's `DotProductAttention` (same constructor and forward contract):
    query [sq, b, heads, dim], key/value [sk, b, kv_heads, dim] -> [sq, b, heads * dim].
    Causal masking is always applied; a boolean `attention_mask` (True = masked out, Megatron's
    convention, broadcastable to [b, 1, sq, sk]) is honoured on top, so padded batches work.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__()
        self.config = config
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the Transformer Engine spec (GPU)")
        sq, b, heads, dim = query.shape
        kv_heads = key.shape[2]
        if query.device.type == "meta" and attention_mask is None:
            return self._flash_on_meta(query, key, value)
        if kv_heads != heads:  # GQA: repeat each KV head for the query heads of its group
            key = key.repeat_interleave(heads // kv_heads, dim=2)
            value = value.repeat_interleave(heads // kv_heads, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sk = k.shape[2]
        mask = None
        if attention_mask is not None:
            causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask = causal & ~attention_mask.to(torch.bool)
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=mask is None and sq > 1,
            scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _flash_on_meta(self, query, key, value):
        """The dry run's attention: the flash-attention op, whose meta kernel allocates what the
        GPU kernel does (output + log-sum-exp, no T x T scores, GQA without repeating K/V), so
        the memory plan counts attention as flash / TE attention uses it."""
        sq, b, heads, dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, self.dropout_p if self.training else 0.0, sq > 1, scale=self.softmax_scale
        )[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


def gpt_layer_spec(*, qk_layernorm: bool):
    """The Transformer layer spec for GPT models on this platform."""
    from megatron.core.models.gpt import gpt_layer_specs

    if platform.has_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if qk_layernorm:  # per-head norms see the whole sequence; Megatron sums their grads over TP anyway
        spec.submodules.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return spec


def gpt_block_spec(config, layer_spec, *, vp_stage: int | None):
    """What GPTModel takes as its decoder spec: TE's layer spec as it is (Megatron adds TE's final
    norm); the local one inside block submodules whose final norm is `SequenceParallelRMSNorm`
    (Megatron's default for it, torch's RMSNorm, refuses sequence parallelism)."""
    if platform.has_transformer_engine():
        return layer_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * layers, layer_norm=SequenceParallelRMSNorm)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local layer spec, usable under sequence parallelism: each TP rank
    then normalises its own slice of the sequence, so its weight gradient is partial, and the
    weight carries Megatron's `sequence_parallel` mark, by which `finalize_model_grads` sums it
    over the TP group (what TE's norms and Apex's FusedLayerNorm do). Without sequence
    parallelism it is torch's RMSNorm."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

