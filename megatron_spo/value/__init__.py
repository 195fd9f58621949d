"""Single-stream SPO's per-prompt value store: Beta posteriors, prioritised sampling, KL-adaptive
rho, sharded over data-parallel ranks; and the offline-value pipeline that initialises it."""

from megatron_spo.value.config import ValueConfig
from megatron_spo.value.keys import prompt_key, prompt_keys
from megatron_spo.value.store import StoredResponses, ValueStore
from megatron_spo.value.tracker import (
    binarize_scores,
    kl_drift,
    offline_prior,
    p_hat,
    rho_from_drift,
    sampling_weights,
    subsample_counts,
    update_posterior,
    weighted_sample_without_replacement,
)

__all__ = [
    "ValueConfig",
    "ValueStore",
    "StoredResponses",
    "prompt_key",
    "prompt_keys",
    "binarize_scores",
    "kl_drift",
    "offline_prior",
    "p_hat",
    "rho_from_drift",
    "sampling_weights",
    "subsample_counts",
    "update_posterior",
    "weighted_sample_without_replacement",
]
