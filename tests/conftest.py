"""Shared fixtures (small and additive: other test modules add their own here)."""

from __future__ import annotations

from pathlib import Path

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion():
    """The real Fashion-MNIST arrays (Debian's files), read and checked once by reslab.data."""
    from reslab.engine.data import load_arrays

    return load_arrays("fashion-mnist")


@pytest.fixture(scope="session")
def tiny_train_config():
    """A factory of TrainConfigs for runs of a second or two on fashion-mnist: resnet8 at
    width 0.25 on a few hundred real images, one thread."""
    from reslab.engine.train import TrainConfig

    def make(**overrides):
        base = dict(
            model="resnet8",
            width=0.25,
            epochs=2,
            batch_size=64,
            train_subset=256,
            val_size=200,
            eval_batch_size=500,
            threads=1,
        )
        base.update(overrides)
        return TrainConfig(**base)

    return make


@pytest.fixture
def cold_cache():
    """``cold_cache(name, ...)`` empties those process-wide caches (:mod:`reslab.caches`) for the
    test, and again after it, so that what the test cached reaches no other test."""
    from reslab import caches

    names: list[str] = []

    def cold(*cache_names: str) -> None:
        caches.clear(*cache_names)
        names.extend(cache_names)

    yield cold
    if names:
        caches.clear(*names)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, with the reason, where no CUDA device is visible (CI)."""
    cuda_items = [i for i in items if i.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible (benchmarks/gpu.sh runs these on a GPU machine)")
    for item in cuda_items:
        item.add_marker(skip)
