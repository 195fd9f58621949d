"""The embedded end-to-end demo: a synthetic task, a tokenizer and tiny model made locally, and
the `megatron-spo demo` command that runs SFT then RL on them.

- `task`: chained +/- arithmetic prompts, answers, scoring and seeded data splits.
- `assets`: the byte-level BPE tokenizer and random-init Qwen2 model, and `build_demo_assets`.
- `cli`: `megatron-spo demo` (build assets, SFT warm start, RL, evaluation before and after).
"""
