"""Build Megatron-Core `GPTModel` chunks from a `ModelSpec`.

One chunk per virtual pipeline stage (a single chunk without virtual PP). The layer spec comes from
the platform module: Transformer Engine on GPUs that have it, torch-native with SDPA attention
elsewhere. RoPE follows the HF config exactly: Megatron's own llama3 scaling hard-codes the
Llama-3.1 constants, so for llama3 scaling we install the inverse frequencies computed from the
config's parameters instead.
"""

from __future__ import annotations

import math

import torch

from megatron_spo import platform
from megatron_spo.models.hf_config import ModelSpec


def llama3_inv_freq(
    head_dim: int,
    theta: float,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: float,
) -> torch.Tensor:
    """Llama-3 RoPE inverse frequencies, shape (head_dim // 2,), float32.

    Wavelengths shorter than `original / high_freq_factor` are kept, longer than
    `original / low_freq_factor` are divided by `factor`, and those in between are interpolated
    smoothly (Llama 3.1 technical report; the same numbers as HF's `rope_type="llama3"`).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def transformer_config(
    spec: ModelSpec, parallel: platform.ParallelContext, *, dtype: torch.dtype = torch.float32,
    recompute: str = "none", sequence_parallel: bool = False,
):
    """Megatron `TransformerConfig` for this model and parallel layout (`recompute`: "none" or
    "full", see `ParallelConfig.recompute`; `sequence_parallel`: split the sequence over the TP
    ranks outside the attention and MLP matmuls, see `ParallelConfig.sequence_parallel`)."""
    from megatron.core.transformer import TransformerConfig

    settings = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=sequence_parallel and parallel.tp > 1,
        # micro-batches of a rollout batch differ in length
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # unused (dense model); "allgather" refuses the above
    )
    if recompute == "full":
        settings.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute != "none":
        raise ValueError(f"recompute must be 'none' or 'full', got {recompute!r}")
    settings.update(platform.model_parallel_overrides())
    return TransformerConfig(**settings)


def build_model(
    spec: ModelSpec,
    parallel: platform.ParallelContext,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    recompute: str = "none",
    sequence_parallel: bool = False,
) -> list:
    """The GPTModel chunks this rank holds (one per virtual pipeline stage).

    Weights are randomly initialised from `seed` identically to a single-process model (CPU
    initialisation builds each full weight and slices it); load real weights with the bridge.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    spec.check_parallel(parallel.tp, parallel.pp, parallel.vpp)
    platform.seed_everything(seed, tp_rank=parallel.tp_rank, pp_rank=parallel.pp_rank)
    config = transformer_config(spec, parallel, dtype=dtype, recompute=recompute, sequence_parallel=sequence_parallel)
    layer_spec = platform.gpt_layer_spec(qk_layernorm=spec.qk_norm)
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        vp = vp_stage if parallel.vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=platform.gpt_block_spec(config, layer_spec, vp_stage=vp),
            vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=spec.rope_theta,
            seq_len_interpolation_factor=(
                spec.rope_param("factor") if spec.rope_type == "linear" else None
            ),
            pg_collection=parallel.pg_collection,
            vp_stage=vp,
        )
        if spec.rope_type == "llama3":
            model.rotary_pos_emb.inv_freq = llama3_inv_freq(
                spec.head_dim,
                spec.rope_theta,
                **{k: v for k, v in spec.rope_params},
            ).to(model.rotary_pos_emb.inv_freq.device)
        # the local spec's norms are torch modules created in fp32; every weight takes the model's
        # dtype, as under Megatron's Float16Module and the TE spec. A bf16 model with fp32 norms
        # also breaks megatron-core 0.16.1's distributed-optimizer checkpoint: one param group
        # holding both dtypes maps a parameter to another one's Adam state.
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        model.to(platform.device())
        chunks.append(model)
    return chunks
