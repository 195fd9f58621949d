"""The SPO value tracker's formulas against hand-computed numbers (megatron_spo.value.tracker)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from megatron_spo.errors import UserError
from megatron_spo.value import (
    ValueConfig,
    binarize_scores,
    kl_drift,
    offline_prior,
    p_hat,
    prompt_key,
    prompt_keys,
    rho_from_drift,
    sampling_weights,
    subsample_counts,
    update_posterior,
    weighted_sample_without_replacement,
)


def test_prior_strength_is_eight_for_the_authors_clip_lower():
    assert ValueConfig().prior_strength == pytest.approx(8.0, abs=0)


@pytest.mark.parametrize(
    "k, n, alpha, beta",
    [
        (0, 8, 8 * 0.5 / 9, 8 * 8.5 / 9),  # never solved: alpha = 4/9, beta = 68/9
        (8, 8, 8 * 8.5 / 9, 8 * 0.5 / 9),  # always solved
        (3, 8, 8 * 3.5 / 9, 8 * 5.5 / 9),
        (1, 2, 8 * 1.5 / 3, 8 * 1.5 / 3),  # 4, 4
        (0, 0, 0.5, 0.5),  # no scores: uninformative Beta(0.5, 0.5), not N0 * 0.5
    ],
)
def test_offline_prior_hand_computed(k, n, alpha, beta):
    a, b = offline_prior(np.array([k]), np.array([n]), 8.0)
    assert a[0] == pytest.approx(alpha, rel=1e-15)
    assert b[0] == pytest.approx(beta, rel=1e-15)


def test_binarize_counts_only_positive_scores():
    assert binarize_scores([1.0, 0.0, -1.0, 0.5, 2]).tolist() == [True, False, False, True, True]


def test_subsample_keeps_small_prompts_and_caps_large_ones():
    rng = np.random.default_rng(0)
    k, n = subsample_counts(np.array([0, 3, 16, 0, 5]), np.array([0, 8, 16, 16, 20]), 8, rng)
    assert n.tolist() == [0, 8, 8, 8, 8]
    assert k[:4].tolist() == [0, 3, 8, 0]  # all-pass stays all-pass, all-fail stays all-fail
    # 5 successes of 20, keep 8: at least max(0, 5 - 12) = 0 and at most 5
    assert 0 <= k[4] <= 5


def test_subsample_is_hypergeometric_in_distribution():
    rng = np.random.default_rng(1)
    k, _ = subsample_counts(np.full(20000, 10), np.full(20000, 20), 8, rng)
    # keeping 8 of 20 scores with 10 successes: mean 8 * 10 / 20 = 4
    assert k.mean() == pytest.approx(4.0, abs=0.05)
    assert k.min() >= 0 and k.max() <= 8


def test_subsample_rejects_impossible_counts():
    with pytest.raises(ValueError):
        subsample_counts(np.array([5]), np.array([3]), 8, np.random.default_rng(0))


def test_p_hat_and_weights_hand_computed():
    p = p_hat(np.array([1.0, 2.0, 4 / 9]), np.array([3.0, 2.0, 68 / 9]))
    np.testing.assert_allclose(p, [0.25, 0.5, 1 / 18], rtol=1e-15)
    w = sampling_weights(np.array([0.25, 0.5, 0.0, 1.0]), 0.05)
    np.testing.assert_allclose(w, [np.sqrt(0.1875) + 0.05, 0.55, 0.05, 0.05], rtol=1e-15)


def test_rho_first_visit_is_clipped_to_upper():
    # the authors' first visit: no stored response, D = 0, 2^0 = 1 clamps to clip_upper
    rho = rho_from_drift(np.array([0.0]), ValueConfig())
    assert rho.tolist() == [0.96]


@pytest.mark.parametrize(
    "drift, expected",
    [
        (0.003, 0.96),  # 2^(-0.05) = 0.9659 > 0.96 -> clip_upper
        (0.005, 2 ** (-1 / 12)),  # 0.94387, inside the clamp
        (0.01, 2 ** (-1 / 6)),  # 0.89090
        (0.06, 0.875),  # one half-life: 0.5 -> clip_lower
        (10.0, 0.875),
    ],
)
def test_rho_kl_mode_hand_computed(drift, expected):
    assert rho_from_drift(np.array([drift]), ValueConfig())[0] == pytest.approx(expected, rel=1e-12)


def test_rho_uses_config_fields_not_literals():
    config = ValueConfig(d_half=0.12, clip_lower=0.5, clip_upper=1.0)
    assert rho_from_drift(torch.tensor([0.12, 0.0]), config).tolist() == pytest.approx([0.5, 1.0])
    constant = ValueConfig(rho_mode="constant", rho=0.7)
    assert rho_from_drift(np.array([0.0, 5.0]), constant).tolist() == [0.7, 0.7]


def test_kl_drift_is_masked_mean_abs_difference():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]])
    new = torch.tensor([[-1.5, -2.0, -2.0], [-0.25, -1.0, -0.5], [-9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    drift = kl_drift(old, new, mask)
    # row 0: (0.5 + 0) / 2 (third token masked); row 1: (0.25 + 0.5 + 0) / 3; row 2: nothing stored -> 0
    torch.testing.assert_close(drift, torch.tensor([0.25, 0.25, 0.0], dtype=torch.float64))


def test_update_hand_computed():
    alpha, beta = update_posterior(np.array([2.0, 2.0]), np.array([3.0, 3.0]), np.array([1.0, 0.0]), np.array([0.5, 0.96]))
    np.testing.assert_allclose(alpha, [2.0, 1.92], rtol=1e-15)  # 0.5*2 + 1, 0.96*2 + 0
    np.testing.assert_allclose(beta, [1.5, 3.88], rtol=1e-15)  # 0.5*3 + 0, 0.96*3 + 1


def test_weighted_sample_inclusion_probabilities():
    # successive sampling of 2 of weights [1, 2, 3] (W = 6):
    # P(i in sample) = w_i/W + sum_{j != i} (w_j/W) * w_i/(W - w_j)
    weights = np.array([1.0, 2.0, 3.0])
    expected = [1 / 6 + (2 / 6) / 4 + (3 / 6) / 3, 2 / 6 + (1 / 6) * 2 / 5 + (3 / 6) * 2 / 3, 3 / 6 + (1 / 6) * 3 / 5 + (2 / 6) * 3 / 4]
    rng = np.random.default_rng(0)
    trials = 8000
    counts = np.zeros(3)
    for _ in range(trials):
        counts[weighted_sample_without_replacement(weights, 2, rng)] += 1
    np.testing.assert_allclose(counts / trials, expected, atol=0.02)


def test_weighted_sample_first_draw_is_proportional():
    rng = np.random.default_rng(2)
    weights = np.array([0.05, 0.55, 0.3, 0.1])
    first = np.bincount([weighted_sample_without_replacement(weights, 3, rng)[0] for _ in range(8000)], minlength=4)
    np.testing.assert_allclose(first / 8000, weights / weights.sum(), atol=0.02)


def test_weighted_sample_distinct_deterministic_and_skips_zero_weight():
    weights = np.array([0.0, 1.0, 0.0, 2.0, 3.0, 0.5])
    a = weighted_sample_without_replacement(weights, 4, np.random.default_rng(7))
    b = weighted_sample_without_replacement(weights, 4, np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    assert sorted(a.tolist()) == [1, 3, 4, 5]  # the only positions with weight > 0
    with pytest.raises(ValueError, match="only 4 have weight > 0"):
        weighted_sample_without_replacement(weights, 5, np.random.default_rng(7))


def test_prompt_key_is_stable_and_whitespace_insensitive():
    # pinned: offline files written by one version must be read by the next
    assert prompt_key("What is 1+1?") == 6479696108400038509
    digest = hashlib.blake2b("What is 1+1?".encode(), digest_size=8).digest()
    assert prompt_key("  What is 1+1?\n") == int.from_bytes(digest, "little", signed=True)
    texts = ["a", "b", "What is 1+1?", "√2 ≈ 1.414"]
    assert prompt_keys(texts).tolist() == [prompt_key(t) for t in texts]
    assert prompt_keys(texts).dtype == np.int64
    assert len(set(prompt_keys(texts).tolist())) == 4


@pytest.mark.parametrize(
    "field, value",
    [("offline_n", 0), ("eps", -0.1), ("rho_mode", "ema"), ("rho", 0.0), ("d_half", 0.0),
     ("clip_lower", 0.97), ("clip_upper", 1.5), ("missing", "drop")],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(UserError, match=field.split("_")[0]):
        ValueConfig(**{field: value})
