"""The algorithms published as "SPO" besides single-stream SPO, as pure functions plus rollout
orchestration written against `megatron_spo.rollout.types.RolloutEngine`.

- `segment_loss`: what SPO-chain and SPO-tree share on the training side: the probability mask,
  whitening over masked tokens, the PPO-clip loss with the optional k3 KL to the reference.
- `segment_chain`: SPO-chain (probability-guided cut points, K continuations per boundary).
- `segment_tree`: SPO-tree (fixed-length segments, level-by-level tree expansion).
- `soft_spo`: Soft Policy Optimization (soft-Q loss on off-policy sequences, Q0 estimation,
  jsonl ingestion of external sequences).
- `digit_task`: the 3-digit number task whose prefix values are enumerable; a scripted
  `RolloutEngine` for exact tests and sanity checks.

The contract with the trainer: "build samples" returns `Sample` records whose
`extra[TOKEN_ADVANTAGES_KEY]` holds one raw advantage per response token; "loss" takes
teacher-forced logprobs, those advantages and a mask (see each module's docstring). The trainer
drives them from `training.rollouts` (sample construction) and `training.objectives` (losses in
the actor's sum / count contract) with `algorithm.name: spo_chain | spo_tree | soft_spo`.
"""

TOKEN_ADVANTAGES_KEY = "token_advantages"
"""`Sample.extra` key of the per-response-token advantages (list[float], raw, not whitened)."""
