"""The RL algorithms, one object each behind the protocol of `base` (what the trainer asks of an
algorithm): `spo.SPO` (single-stream), `grpo.GRPO`, `spo_chain.SPOChain`, `spo_tree.SPOTree`,
`soft_spo.SoftSPO`; `build(config, setup)` makes the one `algorithm.name` names.

The math of the algorithms published as "SPO" besides single-stream SPO lives in pure functions
plus rollout orchestration written against `megatron_spo.rollout.types.RolloutEngine`:

- `segment_loss`: what SPO-chain and SPO-tree share on the training side: the probability mask,
  whitening over masked tokens, the PPO-clip loss with the optional k3 KL to the reference.
- `segment_chain`: SPO-chain (probability-guided cut points, K continuations per boundary).
- `segment_tree`: SPO-tree (fixed-length segments, level-by-level tree expansion).
- `soft_spo`: Soft Policy Optimization (soft-Q loss on off-policy sequences, Q0 estimation,
  jsonl ingestion of external sequences).

The 3-digit task with exactly enumerable prefix values, used to check these algorithms, is a test
fixture: `megatron_spo.testing.digit_task`.

"Build samples" returns `Sample` records whose `extra[TOKEN_ADVANTAGES_KEY]` holds one raw
advantage per response token; "loss" takes teacher-forced logprobs, those advantages and a mask
(see each module's docstring). The algorithm objects drive them through `training.rollouts`
(sample construction) and `training.objectives` (losses in the actor's sum / count contract).
"""

TOKEN_ADVANTAGES_KEY = "token_advantages"
"""`Sample.extra` key of the per-response-token advantages (list[float], raw, not whitened)."""


def build(config, setup):
    """The algorithm `config.algorithm.name` names, made from a `TrainConfig` and an
    `base.AlgorithmSetup`."""
    from megatron_spo.training.algorithms.grpo import GRPO
    from megatron_spo.training.algorithms.soft_spo import SoftSPO
    from megatron_spo.training.algorithms.spo import SPO
    from megatron_spo.training.algorithms.spo_chain import SPOChain
    from megatron_spo.training.algorithms.spo_tree import SPOTree

    classes = {cls.name: cls for cls in (SPO, GRPO, SPOChain, SPOTree, SoftSPO)}
    return classes[config.algorithm.name].from_config(config, setup)
