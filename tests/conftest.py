"""Shared pytest set-up: Triton's interpreter on CPU-only machines, deterministic torch."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton imports.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from redis_server import redis_server  # noqa: F401  (fixture: a real redis-server per test)

torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Cache dir for built checkpoints: LIVELENS_CACHE if set (CI reuse), else a temp dir."""
    from pathlib import Path

    env = os.environ.get("LIVELENS_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("livelens-cache")


@pytest.fixture(scope="session")
def tiny_model(model_cache):
    """The offline tiny VideoLLaMA3 (random weights, seed 0), loaded once per test run."""
    from livelens.model.loading import load_model

    return load_model("tiny", device="cpu", cache_dir=model_cache)
