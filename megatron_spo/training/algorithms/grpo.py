"""GRPO, the group baseline SPO is compared against: n responses per prompt, each advantage its
reward minus the group mean, divided by the group std (Shao et al. 2024; verl's
`compute_grpo_outcome_advantage`, `training.advantages.grpo_advantages`). Prompts come in the
data order; the loss is PPO-clip (`training.objectives.PPOObjective`)."""

from __future__ import annotations

import torch

from megatron_spo.training.algorithms.base import Algorithm, AlgorithmSetup, single_update_on_fresh_samples
from megatron_spo.training.batch import pad_right
from megatron_spo.training.rollouts import Sampling


def rollout_sampling(rollout_config) -> Sampling:
    """The training sampling of `rollout.*` (spo, grpo, soft_spo)."""
    r = rollout_config
    return Sampling(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_response_tokens)


def tool_agent(rollout_config, sampling: Sampling):
    """The tool agent's loop config when `rollout.agent: tool`, else None (single turn)."""
    if rollout_config.agent != "tool":
        return None
    from megatron_spo.rollout.agent_loop import AgentLoopConfig

    return AgentLoopConfig.from_rollout(rollout_config, temperature=sampling.temperature, top_p=sampling.top_p,
                                        max_response_length=sampling.max_tokens)


def ppo_objective(loss_config, temperature: float, tp_group):
    from megatron_spo.training.objectives import PPOObjective

    return PPOObjective(config=loss_config, temperature=temperature, tp_group=tp_group)


class GRPO(Algorithm):
    name = "grpo"

    def __init__(self, config, *, rollout, batch, tp_group=None):
        self.config = config
        self.n = rollout.n
        self.sampling = rollout_sampling(rollout)
        self.agent = tool_agent(rollout, self.sampling)
        self.train_batch_size = batch.train_batch_size
        self.needs_reference = config.loss.kl_coef > 0
        self.objective = ppo_objective(config.loss, self.sampling.temperature, tp_group)

    @classmethod
    def from_config(cls, cfg, setup: AlgorithmSetup) -> GRPO:
        return cls(cfg.algorithm.grpo, rollout=cfg.rollout, batch=cfg.batch, tp_group=setup.tp_group)

    def choose_async_prompts(self, order, count: int, *, exclude):
        """rollout.mode=async: the next `count` prompts of the data order not in flight (with
        nothing in flight, `choose_prompts`'s batch); at most one pass over the data is looked at."""
        chosen: list = []
        for _ in range(len(order.prompts) + count):
            if len(chosen) == count:
                break
            p = order.take(1)[0]
            if p.key not in exclude and all(p.key != q.key for q in chosen):
                chosen.append(p)
        return chosen

    def needs_old_logprobs(self, batch_config) -> bool:
        return not single_update_on_fresh_samples(batch_config)

    def prepare(self, ctx, rollout, batch, old):
        from megatron_spo.training.advantages import grpo_advantages

        rewards = torch.tensor(rollout.rewards, dtype=torch.float32)
        adv = grpo_advantages(rewards, torch.tensor(rollout.prompt_index), batch.target_mask, eps=self.config.eps,
                              norm_by_std=self.config.norm_by_std)
        return batch.replace(advantages=pad_right(adv)), adv
