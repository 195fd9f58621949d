"""Configuration of the per-prompt value store (Single-stream SPO's Beta tracker).

Defaults are the authors' (arXiv 2509.13232, verl recipe `recipe/spo`), except `missing`, where the
reference silently never trains on prompts absent from the offline file (`skip`); we default to a
Beta(0.5, 0.5) prior for them and log how many took it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_spo.errors import UserError

RhoMode = Literal["constant", "kl"]
MissingPolicy = Literal["prior", "skip"]


@dataclasses.dataclass(kw_only=True)
class ValueConfig:
    offline_n: int = 8
    """Offline scores used per prompt for the prior (count). Prompts with more scores are
    subsampled without replacement to this many; the authors' `offline_N`."""
    eps: float = 0.05
    """Floor added to the sampling weight sqrt(p_hat (1 - p_hat)) (probability units), so prompts
    the tracker believes are solved or hopeless are still revisited now and then."""
    rho_mode: RhoMode = "kl"
    """Forgetting factor: `constant` uses `rho`; `kl` derives it per prompt from the policy's drift
    on the response stored at the prompt's previous visit (the authors' default)."""
    rho: float = 0.875
    """Forgetting factor in `constant` mode (dimensionless, in (0, 1]): the authors' recipe value
    (`spo_trainer.yaml`), equal to the KL mode's lower clamp, i.e. its fastest forgetting (a first
    visit in KL mode gets clip_upper = 0.96 instead)."""
    d_half: float = 0.06
    """Drift (mean |old logp - new logp| per token, nats) at which KL-mode rho halves; the authors'
    `D_half`, hard-coded in their recipe."""
    clip_lower: float = 0.875
    """Lower clamp of KL-mode rho. Also sets the offline prior's strength N0 = 1 / (1 - clip_lower)
    = 8 pseudo-observations: the tracker's effective memory at the fastest forgetting."""
    clip_upper: float = 0.96
    """Upper clamp of KL-mode rho (a first visit, D = 0, gets exactly this): at most ~25 effective
    observations, so old evidence always fades."""
    missing: MissingPolicy = "prior"
    """Prompts of the dataset absent from the offline file: `prior` gives them Beta(0.5, 0.5);
    `skip` gives them sampling weight 0 (never trained on, the reference behaviour)."""
    seed: int = 0
    """Seed of the offline subsampling to `offline_n` scores, so every rank and every restart
    builds the same priors."""

    def __post_init__(self):
        def bad(field: str, value, why: str) -> UserError:
            return UserError(f"value config: {field}={value!r} {why}")

        if self.offline_n < 1:
            raise bad("offline_n", self.offline_n, "must be >= 1")
        if not self.eps >= 0:
            raise bad("eps", self.eps, "must be >= 0")
        if self.rho_mode not in ("constant", "kl"):
            raise bad("rho_mode", self.rho_mode, "must be one of: constant, kl")
        if not 0 < self.rho <= 1:
            raise bad("rho", self.rho, "must be in (0, 1]")
        if not self.d_half > 0:
            raise bad("d_half", self.d_half, "must be > 0")
        if not 0 < self.clip_lower <= self.clip_upper <= 1:
            raise bad(
                "clip_lower/clip_upper",
                (self.clip_lower, self.clip_upper),
                "must satisfy 0 < clip_lower <= clip_upper <= 1",
            )
        if self.clip_lower >= 1:
            raise bad("clip_lower", self.clip_lower, "must be < 1 (N0 = 1 / (1 - clip_lower))")
        if self.missing not in ("prior", "skip"):
            raise bad("missing", self.missing, "must be one of: prior, skip")

    @property
    def prior_strength(self) -> float:
        """N0 = 1 / (1 - clip_lower): pseudo-observations the offline prior is worth."""
        return 1.0 / (1.0 - self.clip_lower)
