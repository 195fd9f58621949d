"""A user's own algorithm, defined here and nowhere in the library, trains through the public
algorithm protocol (`training.algorithms.base`) with no change to the trainer: REINFORCE with a
constant baseline, its own objective, its own metric and its own checkpointed state."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_train_setup

pytestmark = pytest.mark.distributed


class ReinforceObjective:
    """-sum (A log pi) over response tokens; the count makes it a token mean."""

    REPORTED = {"pg_loss_sum": "actor/pg_loss"}

    def __call__(self, logits, mb):
        from megatron_spo.training.logprobs import vocab_parallel_logprobs

        lp, _ = vocab_parallel_logprobs(logits, mb.targets)
        lp = lp[:, :-1]
        mask = mb.response_mask[:, : lp.shape[1]]
        loss = -(lp * mb.advantages[:, : lp.shape[1]] * mask).sum()
        return loss, mask.sum(), {"pg_loss_sum": loss.detach(), "tokens": mb.lengths.sum().float()}


def _reinforce_class():
    from megatron_spo.training.algorithms.base import Algorithm
    from megatron_spo.training.batch import pad_right
    from megatron_spo.training.rollouts import Sampling

    class Reinforce(Algorithm):
        name = "reinforce"
        objective = ReinforceObjective()

        def __init__(self, baseline: float):
            self.baseline, self.n, self.train_batch_size = baseline, 2, 4
            self.sampling = Sampling(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8)
            self.updates = 0

        def prepare(self, ctx, rollout, batch, old):
            adv = (torch.tensor(rollout.rewards)[:, None] - self.baseline) * batch.target_mask
            return batch.replace(advantages=pad_right(adv)), adv

        def after_update(self, ctx, rollout):
            self.updates += 1
            return {"reinforce/updates": float(self.updates)}

        def state_dict(self):
            return {"updates": self.updates}

        def load_state_dict(self, state):
            self.updates = state["updates"]

    return Reinforce


def _train(rank, world_size, config, steps):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer, TrainerParts

    algorithm = _reinforce_class()(baseline=0.5)
    trainer = Trainer(from_dict(TrainConfig, {**config, "total_steps": steps}), parts=TrainerParts(algorithm=algorithm))
    before = {k: v.clone() for k, v in trainer.actor.export_hf()}
    history = []
    trainer.fit(on_step=lambda step, metrics: history.append(metrics))
    after = {k: v.clone() for k, v in trainer.actor.export_hf()}
    trainer.close()
    changed = max((after[k] - v).abs().max().item() for k, v in before.items())
    return {"history": history, "changed": changed, "updates": algorithm.updates}


def test_an_algorithm_defined_outside_the_library_trains_and_resumes(spawn, tmp_path):
    config = {**tiny_train_setup(tmp_path), "run_dir": str(tmp_path / "run"), "checkpoint": {"every_steps": 1}}
    first = spawn(1, _train, config, 2)[0]
    assert [m["reinforce/updates"] for m in first["history"]] == [1.0, 2.0]
    assert all(m["rollout/train_sequences"] == 8 for m in first["history"])  # 4 prompts x n = 2
    assert first["changed"] > 0 and "actor/pg_loss" in first["history"][0]
    resumed = spawn(1, _train, config, 3)[0]  # continues from step 2's checkpoint, with its state
    assert [m["reinforce/updates"] for m in resumed["history"]] == [3.0] and resumed["updates"] == 3
