"""ValueStore in one process: offline construction, lookups, sampling, updates, stored responses,
the SPO visit cycle with KL-mode rho, and checkpoints."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from megatron_spo.errors import UserError
from megatron_spo.value import (
    ValueConfig,
    ValueStore,
    kl_drift,
    prompt_key,
    prompt_keys,
    rho_from_drift,
)

OFFLINE = {
    "Solve x + 1 = 2.": [1, 1, 1, 1, 1, 1, 1, 1],  # k = n = 8
    "Prove Fermat's last theorem.": [0, 0, 0, 0, 0, 0, 0, 0],  # k = 0
    "What is 2 + 2?": [1.0, 0.0, 0.0, 1.0],  # k = 2, n = 4
    "An unscored prompt.": [],  # n = 0
}


def _expected_prior(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.5, 0.5
    return 8 * (k + 0.5) / (n + 1), 8 * (n - k + 0.5) / (n + 1)


def test_from_offline_mapping_gives_the_offline_prior():
    store = ValueStore.from_offline_values(OFFLINE, ValueConfig())
    keys = prompt_keys(list(OFFLINE))
    alpha, beta = store.posteriors(keys)
    expected = [_expected_prior(8, 8), _expected_prior(0, 8), _expected_prior(2, 4), _expected_prior(0, 0)]
    np.testing.assert_allclose(alpha, [e[0] for e in expected], rtol=1e-15)
    np.testing.assert_allclose(beta, [e[1] for e in expected], rtol=1e-15)
    np.testing.assert_allclose(store.p_hat(keys), np.array([e[0] / sum(e) for e in expected]), rtol=1e-15)
    np.testing.assert_allclose(store.weights(keys[3:]), [0.55])


def test_offline_scores_are_subsampled_reproducibly_to_offline_n():
    mapping = {f"prompt {i}": [float(j % 3 == 0) for j in range(30)] for i in range(50)}
    config = ValueConfig(offline_n=8, seed=3)
    a = ValueStore.from_offline_values(mapping, config)
    b = ValueStore.from_offline_values(dict(reversed(list(mapping.items()))), config)
    keys = prompt_keys(list(mapping))
    alpha, beta = a.posteriors(keys)
    np.testing.assert_array_equal(alpha, b.posteriors(keys)[0])  # input order does not matter
    np.testing.assert_allclose(alpha + beta, 8 * 9 / 9)  # n = 8 after subsampling: alpha + beta = N0
    assert len(set(alpha.tolist())) > 1  # different prompts drew different subsamples


def test_missing_prior_and_skip(caplog):
    dataset = ["What is 2 + 2?", "  Solve x + 1 = 2.\n", "A new prompt.", "Another new prompt."]
    with caplog.at_level(logging.INFO, logger="megatron_spo.value"):
        store = ValueStore.from_offline_values(OFFLINE, ValueConfig(missing="prior"), dataset_prompts=dataset)
    assert store.num_missing == 2
    assert "2 missing -> prior" in caplog.text
    keys = prompt_keys(dataset)
    assert store.num_prompts() == 4
    np.testing.assert_allclose(store.p_hat(keys)[2:], [0.5, 0.5])

    skip = ValueStore.from_offline_values(OFFLINE, ValueConfig(missing="skip"), dataset_prompts=dataset)
    assert skip.num_prompts() == 2
    weights = skip.weights(keys)
    assert weights[2] == weights[3] == 0.0 and weights[0] > 0
    drawn = skip.sample(keys, 2, np.random.default_rng(0))
    assert sorted(drawn.tolist()) == [0, 1]
    with pytest.raises(UserError, match="cannot sample a batch of 3"):
        skip.sample(keys, 3, np.random.default_rng(0))


def test_offline_prompts_keyed_with_the_answer_format_suffix_match_the_dataset(caplog):
    """The authors' offline_values.json keys carry the suffix appended to training prompts: it is
    cut before matching, and what still does not match is counted."""
    suffix = "\n\nThe answer format must be: \\boxed{...}"
    offline = {"What is 2 + 2?" + suffix: [1, 1, 0, 1], "What is 3 + 3?": [0, 0], "Unrelated?" + suffix: [1]}
    with caplog.at_level("INFO", logger="megatron_spo.value.store"):
        store = ValueStore.from_offline_values(offline, ValueConfig(), strip_suffix=suffix,
                                               dataset_prompts=["What is 2 + 2?", "What is 3 + 3?", "New?"])
    keys = prompt_keys(["What is 2 + 2?", "What is 3 + 3?"])
    alpha, beta = store.posteriors(keys)
    assert (alpha[0], beta[0]) == pytest.approx(_expected_prior(3, 4))
    assert (alpha[1], beta[1]) == pytest.approx(_expected_prior(0, 2))
    assert "2 prompts of offline values mapping end with the answer-format suffix" in caplog.text
    assert "2 of 3 dataset prompts have offline values" in caplog.text and "1 offline prompts not in the dataset" in caplog.text
    with pytest.raises(UserError, match="none of its 3 prompts"):  # without stripping nothing suffixed matches
        ValueStore.from_offline_values({k: v for k, v in offline.items() if k.endswith(suffix)} | {"Other?": [1]},
                                       ValueConfig(), dataset_prompts=["What is 2 + 2?"])


def test_offline_file_matching_no_dataset_prompt_is_refused():
    with pytest.raises(UserError, match="none of its 4 prompts matches any of the 2 dataset prompts"):
        ValueStore.from_offline_values(OFFLINE, ValueConfig(), dataset_prompts=["x", "y"])


def test_offline_file_errors_name_file_line_and_key(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"a": [1, 0],\n "b": [1, }')
    with pytest.raises(UserError, match=r"bad.json: line 2 column"):
        ValueStore.from_offline_values(bad_json, ValueConfig())
    nan = tmp_path / "nan.json"
    nan.write_text('{"a": [1, 0], "b prompt": [NaN]}')
    with pytest.raises(UserError, match=r"nan.json: prompt 'b prompt': score nan is not a finite number"):
        ValueStore.from_offline_values(nan, ValueConfig())
    text = tmp_path / "text.json"
    text.write_text('{"a": ["yes"]}')
    with pytest.raises(UserError, match="score 'yes'"):
        ValueStore.from_offline_values(text, ValueConfig())
    with pytest.raises(UserError, match="prompt 'b': scores must be a list of numbers, got int"):
        ValueStore.from_offline_values({"a": [1], "b": 1}, ValueConfig())
    with pytest.raises(UserError, match="prompt 'b': score True is not a finite number"):
        ValueStore.from_offline_values({"a": [1], "b": [0, True]}, ValueConfig())
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(UserError, match="empty offline values file"):
        ValueStore.from_offline_values(empty, ValueConfig())
    with pytest.raises(UserError, match="does not exist"):
        ValueStore.from_offline_values(tmp_path / "nope.json", ValueConfig())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(OFFLINE))
    assert ValueStore.from_offline_values(good, ValueConfig()).num_prompts() == 4


def test_unknown_keys_and_bad_updates_raise():
    store = ValueStore.from_keys([1, 2, 3], ValueConfig())
    with pytest.raises(KeyError, match="1 prompt keys are not in the value store"):
        store.p_hat([1, 99])
    with pytest.raises(KeyError):
        store.weights([99])  # missing: prior -> a key outside the store is a bug, not weight 0
    with pytest.raises(KeyError, match="not in the store or repeat"):
        store.update([1, 1], [1.0, 0.0], 0.9)
    with pytest.raises(KeyError):
        store.update([99], [1.0], 0.9)
    with pytest.raises(ValueError, match="rewards"):
        store.update([1], [float("nan")], 0.9)
    with pytest.raises(ValueError, match="rho"):
        store.update([1], [1.0], 0.0)
    with pytest.raises(TypeError):
        store.p_hat(["a prompt"])
    np.testing.assert_array_equal(store.posteriors([1, 2, 3])[0], [0.5, 0.5, 0.5])  # nothing changed


def test_update_applies_rho_and_reward_per_prompt():
    store = ValueStore.from_keys([10, 20, 30], ValueConfig())
    store.update([30, 10], [1.0, 0.0], [0.5, 0.96])
    alpha, beta = store.posteriors([10, 20, 30])
    np.testing.assert_allclose(alpha, [0.96 * 0.5, 0.5, 0.5 * 0.5 + 1])
    np.testing.assert_allclose(beta, [0.96 * 0.5 + 1, 0.5, 0.5 * 0.5])


def test_sample_is_deterministic_distinct_and_prefers_uncertain_prompts():
    config = ValueConfig(eps=0.0)
    keys = np.arange(100, dtype=np.int64)
    store = ValueStore.from_offline_counts(keys, np.where(keys < 50, 4, 0), np.full(100, 8), config)
    a = store.sample(keys, 30, np.random.default_rng(5))
    b = store.sample(keys, 30, np.random.default_rng(5))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 30
    # prompts 0..49 sit at p_hat 0.5 (weight 0.5), 50..99 at p_hat 1/18 (weight 0.23)
    assert np.sum(a < 50) > 15


def test_spo_visit_cycle_with_kl_rho():
    """Two visits of one prompt as the trainer runs them: D = 0 -> rho = 0.96 on the first visit;
    on the second, D from the stored response's old and new log-probs sets rho."""
    config = ValueConfig()
    key = prompt_key("What is 2 + 2?")
    store = ValueStore.from_offline_values(OFFLINE, config)
    alpha0, beta0 = (v[0] for v in store.posteriors([key]))

    stored = store.stored_responses([key])
    assert not stored.present[0]
    ids, old, mask = stored.padded()
    drift = kl_drift(old, old, mask)  # nothing stored: the actor has nothing to score
    rho = rho_from_drift(drift, config)
    assert rho.tolist() == [0.96]
    store.update([key], [1.0], rho)
    store.store_responses([key], [torch.tensor([5, 6, 7])], [torch.tensor([-0.1, -0.2, -0.3])])
    alpha1, beta1 = (v[0] for v in store.posteriors([key]))
    assert (alpha1, beta1) == (0.96 * alpha0 + 1.0, 0.96 * beta0)

    stored = store.stored_responses([key])
    assert stored.present[0]
    ids, old, mask = stored.padded()
    assert ids.tolist() == [[5, 6, 7]]
    new = old + torch.tensor([[0.03, -0.03, 0.0]])  # the actor after some steps: D = 0.02
    rho = rho_from_drift(kl_drift(old, new, mask), config)
    assert rho[0] == pytest.approx(max(2 ** (-0.02 / 0.06), 0.875), rel=1e-6)
    store.update([key], [0.0], rho)
    alpha2, beta2 = (v[0] for v in store.posteriors([key]))
    assert alpha2 == pytest.approx(rho[0] * alpha1) and beta2 == pytest.approx(rho[0] * beta1 + 1.0)


def test_stored_responses_replace_and_compact():
    store = ValueStore.from_keys(np.arange(10), ValueConfig())
    rng = np.random.default_rng(0)
    latest = {}
    for step in range(120):
        keys = rng.choice(10, size=4, replace=False)
        ids = [rng.integers(0, 1000, size=rng.integers(0, 2000)) for _ in keys]
        lps = [-rng.random(len(t)).astype(np.float32) for t in ids]
        store.store_responses(keys, ids, lps)
        latest.update({int(k): (i, l) for k, i, l in zip(keys, ids, lps)})
    got = store.stored_responses(np.arange(10))
    for key in range(10):
        assert got.present[key] == (key in latest)
        if key in latest:
            np.testing.assert_array_equal(got.token_ids[key], latest[key][0])
            np.testing.assert_array_equal(got.logprobs[key], latest[key][1])
    table = store._responses
    assert table.used <= 2 * table.live + 65536  # stale tokens were dropped


def test_memory_per_prompt_without_responses_is_under_32_bytes():
    keys = prompt_keys([f"prompt {i}" for i in range(4096)])
    store = ValueStore.from_keys(keys, ValueConfig())
    # key 8 + alpha 8 + beta 8 + response slot 4, plus the key index's bucket directory
    assert 28 * 4096 < store.local_nbytes < 29 * 4096
    store.store_responses(keys[:10], [[1, 2]] * 10, [[-0.5, -0.5]] * 10)
    assert store.local_nbytes < 29 * 4096  # stored responses live outside the per-prompt arrays


def test_save_load_round_trip_is_bit_identical(tmp_path):
    config = ValueConfig()
    keys = prompt_keys([f"p{i}" for i in range(64)])
    store = ValueStore.from_offline_counts(keys, np.arange(64) % 9, np.full(64, 8), config)
    rng = np.random.default_rng(0)
    store.update(keys[:20], rng.integers(0, 2, 20).astype(float), rng.uniform(0.875, 0.96, 20))
    store.store_responses(keys[5:9], [[1], [2, 3], [], [4, 5, 6]], [[-1.0], [-2.0, -3.0], [], [-4.0, -5.0, -6.0]])
    store.save(tmp_path / "values")
    loaded = ValueStore.load(tmp_path / "values", config)
    a, b = store.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    got = loaded.stored_responses(keys[5:9])
    assert got.present.tolist() == [True, True, True, True]  # an empty response is still stored
    assert [t.tolist() for t in got.token_ids] == [[1], [2, 3], [], [4, 5, 6]]


def test_incomplete_checkpoints_are_refused(tmp_path):
    store = ValueStore.from_keys([1, 2], ValueConfig())
    store.save(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        ValueStore.load(tmp_path / "ok", ValueConfig())
    # A save over an earlier checkpoint that dies before its manifest leaves nothing loadable (never
    # the old manifest over new shards). The filesystem makes it die: a directory holds the shard's
    # name, so renaming the written shard into place fails.
    store.save(tmp_path / "again")
    (shard,) = [p for p in (tmp_path / "again").iterdir() if p.name != "manifest.json"]
    shard.unlink()
    (shard / "in_the_way").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        store.save(tmp_path / "again")
    with pytest.raises(UserError, match="no manifest.json"):
        ValueStore.load(tmp_path / "again", ValueConfig())
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [shard.name]  # no temporary left
    state = store.state_dict()
    state["dp_size"], state["dp_rank"] = 2, 1
    with pytest.raises(UserError, match="got shards \\[1\\] of DP sizes \\[2\\]"):
        store.load_state_dict(state)


def test_key_lookup_agrees_with_searchsorted_at_the_int64_extremes():
    rng = np.random.default_rng(0)
    extremes = np.array([-(2**63), 2**63 - 1, 0, -1], dtype=np.int64)
    keys = np.unique(np.concatenate([rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64), extremes]))
    store = ValueStore.from_keys(keys, ValueConfig(missing="skip"))
    store.update(keys[::2], np.ones(keys.size // 2 + keys.size % 2), 0.5)  # even positions: alpha 1.25
    absent = rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)
    absent = absent[~np.isin(absent, keys)]
    queries = np.concatenate([extremes, rng.permutation(keys), absent])
    weights = store.weights(queries)
    assert np.all(weights[: 4 + keys.size] > 0) and np.all(weights[4 + keys.size :] == 0)
    alpha, _ = store.posteriors(queries[: 4 + keys.size])
    expected = np.where(np.searchsorted(keys, queries[: 4 + keys.size]) % 2 == 0, 1.25, 0.5)
    np.testing.assert_array_equal(alpha, expected)


def test_sample_draws_a_prompt_repeated_in_the_pool_once():
    store = ValueStore.from_keys([1, 2, 3], ValueConfig())
    pool = np.array([1, 1, 1, 1, 1, 1, 2, 3])
    for seed in range(20):
        drawn = pool[store.sample(pool, 3, np.random.default_rng(seed))]
        assert sorted(drawn.tolist()) == [1, 2, 3]
    with pytest.raises(UserError, match="only 3 have weight > 0"):
        store.sample(pool, 4, np.random.default_rng(0))


def test_duplicate_keys_are_refused():
    with pytest.raises(UserError, match="1 duplicate prompt keys \\(e.g. 7\\)"):
        ValueStore.from_keys([7, 3, 7], ValueConfig())
