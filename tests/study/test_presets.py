"""The grid rules live in reslab.study.presets: the command line and Python get the same grid."""

from __future__ import annotations

import pytest

from reslab.cli import build_parser
from reslab.cli.commands.compare import build_grid
from reslab.errors import UsageError
from reslab.study.presets import PRESETS, grid_from_options, parse_duration, parse_seeds

parse = build_parser().parse_args


@pytest.mark.parametrize(
    ("argv", "kwargs"),
    [
        (["compare"], {}),
        (["compare", "--preset", "paper"], {"preset": "paper"}),
        (["compare", "--preset", "quick", "--epochs", "3"], {"preset": "quick", "train": {"epochs": 3}}),
        (["compare", "--models", "resnet8", "--seeds", "2"], {"models": "resnet8", "seeds": "2"}),
        (
            ["compare", "--models", "resnet8", "--until-decided", "--margin", "2", "--set", "lr=0.05"],
            {"models": ["resnet8"], "until_decided": True, "margin_pp": 2.0, "assignments": ["lr=0.05"]},
        ),
    ],
)
def test_python_and_command_line_build_the_same_grid(argv: list[str], kwargs: dict) -> None:
    grid, jobs, out = build_grid(parse(argv))
    setup = grid_from_options(**kwargs)
    assert setup.grid.to_json() == grid.to_json()
    assert (setup.grid.preset, setup.grid.budget_s, setup.jobs, setup.out) == (grid.preset, grid.budget_s, jobs, out)


def test_no_option_is_the_quick_preset() -> None:
    grid = grid_from_options().grid
    quick = PRESETS["quick"]
    assert grid.preset == "quick" and grid.models == quick["models"] and grid.techniques == quick["techniques"]
    assert grid.sequential == quick["sequential"] and grid.budget_s == quick["budget_s"]


def test_custom_until_decided_starts_at_three_seeds() -> None:
    grid = grid_from_options(models="resnet8", until_decided=True).grid
    assert grid.plan() is not None and grid.plan().looks[0] == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"preset": "fast"}, "unknown preset 'fast'"),
        ({"models": ""}, "--models is empty"),
        ({"seeds": "a"}, "--seeds takes N"),
        ({"seeds": [0, 0]}, "lists a seed twice"),
        ({"budget": "soon"}, "--budget takes a duration"),
        ({"models": "resnet8", "margin_pp": 1.0}, "belong to --until-decided"),
        ({"jobs": 0}, "--jobs must be at least 1"),
        ({"error_rate": "family"}, "--error-rate is table or row"),
        ({"target_acc": 2}, "--target-acc is a fraction"),
        ({"train": {"model": "resnet8"}}, "set per run by the grid"),
    ],
)
def test_bad_requests_name_the_option(kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        grid_from_options(**kwargs)


def test_parsers_take_python_values() -> None:
    assert parse_seeds(3) == [0, 1, 2] == parse_seeds("3") == parse_seeds([0, 1, 2])
    assert parse_seeds("4,7") == [4, 7]
    assert parse_duration(90) == 90.0 == parse_duration("1m30s")
