"""The report's tests name made-up techniques by what they show (up, down, same, ...): registered
for each test and removed after it (tests/synthetic.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from synthetic import labelled_techniques


@pytest.fixture(autouse=True)
def _labels() -> Iterator[None]:
    with labelled_techniques():
        yield
