"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import pytest

from reslab.nn import plugins
from reslab.nn import registry as technique_registry


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, cold_cache) -> None:
    """A private copy of the technique registry for one test."""
    monkeypatch.setattr(technique_registry, "_REGISTRY", dict(technique_registry._REGISTRY))
    cold_cache("plugins.entry_points_loaded")
    monkeypatch.delenv(plugins.IMPORT_ENV, raising=False)
