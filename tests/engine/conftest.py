"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import pytest

from reslab.nn import plugins
from reslab.nn import registry as technique_registry


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private copy of the technique registry for one test."""
    monkeypatch.setattr(technique_registry, "_REGISTRY", dict(technique_registry._REGISTRY))
    monkeypatch.setattr(plugins, "_LOADED", set())
    monkeypatch.delenv(plugins.IMPORT_ENV, raising=False)
