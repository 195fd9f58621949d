"""megatron-spo: reinforcement-learning post-training on Megatron-Core.

Single-stream Policy Optimization (arXiv 2509.13232) at scale, plus Segment Policy Optimization,
Soft Policy Optimization and GRPO, on Megatron-Core actors, vLLM / HF rollout engines and
Hugging Face checkpoints.
"""

__version__ = "0.1.0"
