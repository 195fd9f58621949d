"""The frozen reference policy: a second Megatron model, sharded exactly like the actor.

Used for the KL penalty of PPO-style losses (`algorithm.spo.loss.kl_coef` /
`algorithm.grpo.loss.kl_coef`, the segment algorithms' k3 term) and
by Soft Policy Optimization, whose per-token advantage is `beta (log pi_theta - log pi_ref)` and
whose Q0 is estimated from reference samples. The weights are the run's starting point
(`model.hf_dir`), loaded at the actor's TP / PP layout, so reference log-probabilities are computed
by the same vocab-parallel kernels on the same ranks and need no communication beyond the actor's.
Nothing here trains: no DDP wrapper, no optimizer state, no gradients. A resumed run reloads it
from `model.hf_dir`, which is what it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_spo.platform import ParallelContext
from megatron_spo.training.logprobs import compute_logprobs


class ReferenceModel:
    def __init__(self, hf_dir: str | Path, parallel: ParallelContext, *, dtype: torch.dtype, seed: int,
                 load=None, sequence_parallel: bool = False):
        from megatron_spo.models.checkpoint import load_pretrained

        self.parallel = parallel
        self.spec, self.chunks, self.bridge = (load or load_pretrained)(
            hf_dir, parallel, dtype=dtype, seed=seed, sequence_parallel=sequence_parallel)
        for chunk in self.chunks:
            chunk.eval()
            chunk.requires_grad_(False)

    def logprobs(self, input_ids: torch.Tensor, *, micro_batch_size: int = 8, temperature: float = 1.0,
                 lengths: torch.Tensor | None = None, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """{"logprobs": (B, T-1)}: log pi_ref of each next token (as `Actor.logprobs`)."""
        return compute_logprobs(self.chunks, self.parallel, input_ids, micro_batch_size=micro_batch_size,
                                temperature=temperature, lengths=lengths, max_tokens=max_tokens)

    def export_hf(self):
        """HF-named tensors of the reference, for loading it into a rollout engine (soft-SPO's Q0)."""
        return self.bridge.export_hf(self.chunks)
