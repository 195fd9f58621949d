# `make test` and `make demo` work on a fresh machine: they create .venv if missing and install.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
EXTRAS ?= dev,rewards,observe

.PHONY: install test test-fast demo bench clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel of torch first, so nothing below pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not distributed"

demo: install
	$(PYTHON) -m megatron_spo demo

clean:
	rm -rf $(VENV) runs build *.egg-info
