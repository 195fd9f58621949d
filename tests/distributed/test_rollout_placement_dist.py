"""Each prompt is generated once per step, not once per actor TP rank: at world 2 with actor TP 2
(one model replica, an `hf` engine per rank) the two ranks split the generation and exchange the
sequences, and the step's metrics and parameters equal the single-process run's."""

from __future__ import annotations

import pytest

from helpers import algorithm_setup

pytestmark = pytest.mark.distributed

VOLATILE = ("perf/",)


def _train_counting(rank, world_size, overrides, tp):
    """One step (plus an evaluation) with the engine's work counted on this rank."""
    from megatron_spo.config import from_dict
    from megatron_spo.rollout.types import RolloutEngine
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    class Counting(RolloutEngine):
        def __init__(self, engine):
            self.engine, self.requests, self.tokens = engine, 0, 0

        def generate(self, requests):
            results = self.engine.generate(requests)
            self.requests += len(requests)
            self.tokens += sum(len(c.token_ids) for r in results for c in r.completions)
            return results

        def update_weights(self, named_tensors):
            self.engine.update_weights(named_tensors)

        def shutdown(self):
            self.engine.shutdown()

    cfg = from_dict(TrainConfig, {**overrides, "total_steps": 1, "parallel": {"tp": tp, "pp": 1}})
    trainer = Trainer(cfg)
    trainer.engine = counting = Counting(trainer.engine)
    metrics = trainer.train_step()
    train_work = (counting.requests, counting.tokens)
    metrics.update(trainer.evaluate())
    eval_work = (counting.requests - train_work[0], counting.tokens - train_work[1])
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    trainer.close()
    return {"metrics": {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}, "params": params,
            "train_work": train_work, "eval_work": eval_work}


@pytest.mark.parametrize("algorithm", ["spo", pytest.param("spo_chain", marks=pytest.mark.large)])  # CI time
def test_actor_tp2_generates_each_prompt_once_and_equals_single_process(spawn, tmp_path, algorithm):
    base = {**algorithm_setup(tmp_path, algorithm), "checkpoint": {"every_steps": 0},
            "eval": {"files": [str(tmp_path / "train.jsonl")], "n": 2, "max_response_tokens": 4}}
    single = spawn(1, _train_counting, {**base, "run_dir": str(tmp_path / "single")}, 1)[0]
    split = spawn(2, _train_counting, {**base, "run_dir": str(tmp_path / "tp2")}, 2)
    for kind in ("train_work", "eval_work"):
        requests, tokens = single[kind]
        assert requests > 0 and tokens > 0
        # together the two ranks did the single process's work once, each a part of it
        assert sum(r[kind][0] for r in split) == requests, kind
        assert sum(r[kind][1] for r in split) == tokens, kind
        assert all(0 < r[kind][0] < requests for r in split), kind
    assert single["metrics"]["rollout/generated_tokens"] == single["train_work"][1]  # counted once, on any split
    for rank, result in enumerate(split):
        assert result["metrics"].keys() == single["metrics"].keys()
        for key, value in single["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"rank {rank} {key}"
        for name, tensor in single["params"].items():
            assert (result["params"][name] - tensor).abs().max().item() <= 1e-5, f"rank {rank} {name}"
