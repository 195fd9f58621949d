# syntax=docker/dockerfile:1
# megatron-spo on an NGC PyTorch image, with vLLM and Transformer Engine for GPU runs.
#
#   docker build -t megatron-spo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /path/to/models:/workspace/megatron-spo/models -v /path/to/data:/workspace/megatron-spo/data \
#       -v /path/to/runs:/workspace/megatron-spo/runs megatron-spo \
#       bash examples/gpu_node/run.sh
#
# Build arguments pin each piece; change them together (vLLM fixes the torch version):
#   --build-arg NGC_TAG=25.12 --build-arg VLLM_VERSION=0.32.0 --build-arg TE_VERSION=2.11.0
# TE_VERSION stays inside megatron-core 0.16.1's declared range (>=2.9.0a0,<2.12.0). flash-attn is
# not built by default (vLLM ships its own kernels and TE has cuDNN attention); add it with
#   --build-arg FLASH_ATTN_VERSION=2.8.3.post2
# Compiling Transformer Engine (and flash-attn) takes a while; MAX_JOBS bounds the compiler's memory.
ARG NGC_TAG=25.12
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

# vllm 0.32.0 was built against torch==2.13.0 and accepts transformers <5.20 (what megatron-spo
# requires); 0.33 moved to torch 2.14.
ARG VLLM_VERSION=0.32.0
ARG TE_VERSION=2.11.0
ARG FLASH_ATTN_VERSION=
ARG MAX_JOBS=8

# VLLM_WORKER_MULTIPROC_METHOD: vLLM's workers must not fork a process that already holds CUDA
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=${MAX_JOBS} \
    VLLM_WORKER_MULTIPROC_METHOD=spawn

# NGC pins every preinstalled package in /etc/pip/constraint.txt (since 25.03); vLLM needs its own
# exact torch, so the pins are lifted for this image.
RUN : > /etc/pip/constraint.txt

# 1. vLLM with the torch (and torchvision/torchaudio) it was compiled against; this replaces the
#    image's own torch build.
RUN pip install "vllm==${VLLM_VERSION}"

# 2. Extensions compiled against the image's original torch would fail to load against the new
#    one: remove them and build Transformer Engine (and flash-attn, when asked for) against the
#    installed torch (--no-build-isolation: their builds import it). Apex is left out: it is not
#    on PyPI and megatron-core runs without it.
RUN pip uninstall -y apex transformer-engine transformer-engine-torch transformer-engine-cu12 \
        transformer-engine-cu13 flash-attn flash_attn || true
RUN pip install --no-build-isolation "transformer-engine[pytorch]==${TE_VERSION}" \
    && if [ -n "${FLASH_ATTN_VERSION}" ]; then pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; fi

# 3. megatron-spo itself with the GPU extra (already satisfied above: pip keeps those versions),
#    the math grader, TensorBoard/matplotlib, and Ray for multi-node reward scoring.
WORKDIR /workspace/megatron-spo
COPY . .
RUN pip install -e ".[gpu,rewards,observe,ray]"
# megatron-core's declared Transformer Engine range, checked against what step 2 built
RUN python -c "import importlib.metadata as md; from packaging.version import Version as V; \
te = V(md.version('transformer-engine')); assert V('2.9.0a0') <= te < V('2.12.0'), f'transformer-engine {te} is outside megatron-core 0.16.1 range'"

# Fail the build, not the first job, if the stack is inconsistent: the versions vLLM pinned survived
# step 3, and the CLI starts. (Importing vLLM or Transformer Engine needs a GPU driver, which a
# build does not have.)
RUN python - <<'PY'
import importlib.metadata as md
torch_version = md.version("torch")
assert torch_version.startswith("2.13.0"), f"torch {torch_version}: vllm {md.version('vllm')} needs 2.13.0"
print("torch", torch_version, "vllm", md.version("vllm"), "transformer-engine", md.version("transformer-engine"),
      "megatron-core", md.version("megatron-core"), "transformers", md.version("transformers"))
PY
RUN megatron-spo --help

CMD ["bash"]
