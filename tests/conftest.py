"""Shared pytest fixtures: spawning gloo process groups and tiny HF models."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import distributed_run  # noqa: E402,F401  (re-exported for tests)


@pytest.fixture
def spawn(tmp_path):
    """`spawn(world_size, fn, *args)` runs `fn(rank, world_size, *args)` in `world_size` gloo
    processes (torchrun-style environment, a free port) and returns the per-rank return values."""

    def run(world_size, fn, *args, timeout_s: float = 300.0):
        return distributed_run(world_size, fn, *args, workdir=tmp_path, timeout_s=timeout_s)

    return run
