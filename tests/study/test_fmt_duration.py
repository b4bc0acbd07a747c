"""fmt_duration: durations printed in units a person reads."""

import math

import pytest

from reslab.study.estimate import fmt_duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (59.4, "59s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (2 * 3600 + 7 * 60 + 10, "2h07m"),
        (24 * 3600 - 31, "23h59m"),
        (24 * 3600 - 29, "1d00h"),
        (24 * 3600, "1d00h"),
        (10038 * 60 + 6, "6d23h"),
        (33460 * 60 + 20, "23d06h"),
    ],
)
def test_boundaries(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize("seconds", [None, math.inf, math.nan])
def test_unknown(seconds):
    assert fmt_duration(seconds) == "n/a"
