"""reslab from Python, as a notebook uses it: only ``import reslab``. A tiny comparison runs and its
decision table reads back (also half-finished); a run and its fused file load and predict the same;
reslab 0.2's module paths still import (``reslab.export`` included) without taking the new
functions' names away."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch

import reslab

TINY = {"width": 0.25, "train_subset": 256, "val_size": 200, "test_subset": 500, "epochs": 1, "batch_size": 64}


def tiny_compare(out: Path, report: bool = True) -> reslab.Results:
    """resnet8 with scale against baseline, 3 seeds of a few seconds each, one job."""
    return reslab.compare(
        models=["resnet8"],
        techniques=["scale"],
        seeds=3,
        out=out,
        train={**TINY, "threads": 1},
        jobs=1,
        progress=False,
        report=report,
    )


def test_a_notebook_runs_a_comparison_reads_it_and_loads_its_models(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    res = tiny_compare(out)
    assert isinstance(res, reslab.Results) and res.complete and not res.failed
    (row,) = res.rows
    assert (row["model"], row["technique"], row["seeds"]) == ("resnet8", "scale", 3)
    assert row["decision"] in ("better", "worse", "equivalent", "undecided")
    # the same table as the report's decisions.json, and as read back later
    stored = json.loads((out / "decisions.json").read_text())
    assert [(d["technique"], d["decision"], d["diff_mean"]) for d in stored] == [
        (r["technique"], r["decision"], r["diff_mean"]) for r in res.rows
    ]
    again = reslab.read_results(out)
    assert again.rows == res.rows and again.row("resnet8", "scale") == row and again.report == out / "report.md"
    # a run and its fused file predict the same
    run = out / "runs" / "resnet8-scale-s0"
    model = reslab.load(run)
    fused_file = tmp_path / "scale.safetensors"
    reslab.save_fused(fused_file, reslab.fuse(model))
    fused = reslab.load(fused_file)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), fused(x)
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert torch.equal(a.argmax(1), b.argmax(1))
    # a checkpoint's weights load too
    ckpt = next((run / "checkpoint").glob("epoch-*.safetensors"))
    assert isinstance(reslab.load(ckpt), torch.nn.Module)


def test_a_half_finished_grid_reads_back_with_what_is_missing(tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "half"
    tiny_compare(out, report=False)
    shutil.rmtree(out / "runs" / "resnet8-scale-s2")
    res = reslab.read_results(out)
    assert not res.complete and any("scale / seed 2" in m for m in res.missing)
    assert res.rows[0]["trained"] == 2 and res.report is None
    assert "1 rows" in repr(res) and "runs missing" in repr(res)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(reslab.errors.UsageError, match="pip install pandas"):
            res.to_dataframe()
    else:
        assert list(res.to_dataframe()["technique"]) == ["scale"]


def test_bad_requests_are_one_usage_error_each(tmp_path: Path) -> None:
    from reslab.errors import UsageError

    with pytest.raises(UsageError, match="unknown technique"):
        reslab.compare(models=["resnet8"], techniques=["nope"], seeds=2, out=tmp_path / "x", progress=False)
    with pytest.raises(UsageError, match="preset"):
        reslab.compare(preset="nope", out=tmp_path / "x", progress=False)
    with pytest.raises(UsageError, match="not a results folder"):
        reslab.read_results(tmp_path / "none")
    assert not (tmp_path / "x").exists()


OLD_PATHS = {
    "reslab.export": "reslab.deploy.export",
    "reslab.fuse": "reslab.deploy.fuse",
    "reslab.train": "reslab.engine.train",
    "reslab.config": "reslab.engine.config",
    "reslab.runs": "reslab.engine.runs",
    "reslab.pretrained": "reslab.nn.pretrained",
    "reslab.techniques": "reslab.nn.techniques",
    "reslab.folding": "reslab.nn.folding",
    "reslab.decisions": "reslab.study.decisions",
    "reslab.results": "reslab.study.results",
    "reslab.compare": "reslab.study.compare",
}


@pytest.mark.parametrize("old", OLD_PATHS)
def test_the_0_2_module_paths_still_import(old: str) -> None:
    module = importlib.import_module(old)
    target = importlib.import_module(OLD_PATHS[old])
    name = next(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n)))
    assert getattr(module, name) is getattr(target, name)


def test_old_paths_keep_the_new_functions_callable() -> None:
    from reslab.export import load_source  # 0.2's import, as the issue quotes it

    assert load_source is importlib.import_module("reslab.deploy.sources").load_source
    from reslab.compare import run_grid  # 0.2's module ...

    assert run_grid is importlib.import_module("reslab.study.compare").run_grid
    assert callable(reslab.compare) and callable(reslab.fuse)  # ... and 0.3's functions, both
    assert reslab.compare.__doc__ and math.isfinite(1.0)


def test_the_readmes_python_example_runs_as_it_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The README's "compare, read, ship" block, verbatim, in a fresh folder."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    code = next(b.split("```")[0] for b in blocks if "reslab.compare(" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "True" and sum(line.startswith("resnet8 ") for line in out) == 2
    assert (tmp_path / "results" / "mine" / "report.md").is_file() and (tmp_path / "scale.safetensors").is_file()


class Tilt(reslab.Technique):
    """Outside the package: ``F + tilt * s + lift`` with a per-channel gain and a scalar shift,
    and its own fold (a technique reslab has never seen, with parameter names it has never seen)."""

    name = "api_outside_tilt"
    summary = "F(x) + tilt * s + lift"
    parameter_names = ("tilt", "lift")

    def add_parameters(self, block: torch.nn.Module, channels: int) -> None:
        block.tilt = torch.nn.Parameter(torch.full((channels, 1, 1), 0.5))
        block.lift = torch.nn.Parameter(torch.zeros(1))

    def merge(self, block: torch.nn.Module, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return branch + block.tilt * shortcut + block.lift

    def fold_merge(self, block: torch.nn.Module, channels: int) -> reslab.MergeFold:
        return reslab.MergeFold(coef=block.tilt.detach().double().reshape(-1), shift=block.lift.detach().double())


def test_a_technique_from_outside_the_package_goes_through_reslab_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered from a script, it trains in a comparison, is probed at initialisation, is
    decided in the table, and its trained run fuses to the same outputs (relative error < 1e-4).
    The CLI's route for the same kind of plugin: tests/nn/test_technique_contract.py."""
    from reslab.nn import registry
    from reslab.probe.records import read_probe_data
    from reslab.study.results import PROBE_FILE

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # gone after this test
    reslab.register(Tilt)
    out = tmp_path / "outside"
    res = reslab.compare(
        models=["resnet8"], techniques=[Tilt.name], seeds=2, out=out, train={**TINY, "threads": 1}, jobs=1,
        progress=False, report=False,
    )  # fmt: skip
    assert not res.failed and [r["technique"] for r in res.rows] == [Tilt.name]
    assert res.rows[0]["trained"] == 2
    probed = {e["technique"] for e in read_probe_data(out / PROBE_FILE)["results"]}
    assert probed == {"baseline", Tilt.name}
    model = reslab.load(out / "runs" / f"resnet8-{Tilt.name}-s1")
    tilts = [b.tilt for _, b in reslab.residual_blocks(model)]
    assert any(not torch.allclose(t, torch.full_like(t, 0.5)) for t in tilts)  # trained, not as built
    fused = reslab.fuse(model)
    assert not any(hasattr(m, "tilt") for m in fused.modules())
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), fused(x)
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())
