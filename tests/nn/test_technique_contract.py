"""The technique contract: a technique written outside reslab works everywhere.

A technique defined here (with a learnable parameter of a name reslab has never seen) is
built, trained by the real engine, probed, fused, exported and used for prediction; the
fused and exported models must give the unfused model's outputs. Then a technique in a
module outside the package goes through every command, found once through an entry point
of a (simulated) installed distribution and once through ``--import``. Each test registers
into a copy of the registry, so nothing leaks into the other test modules.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import reslab
from reslab.cli import main
from reslab.deploy.export import export
from reslab.deploy.fuse import technique_leftovers
from reslab.deploy.predict import load_predictor, predict
from reslab.deploy.sources import export_metadata, fused_source
from reslab.errors import UsageError
from reslab.nn import plugins, techniques
from reslab.nn import registry as technique_registry
from reslab.nn.folding import FOLD_DTYPE, MergeFold
from reslab.nn.weights import load_model, read_metadata
from reslab.probe.measure import probe_model

REL_TOL = 1e-4


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch, cold_cache) -> dict[str, type[reslab.Technique]]:
    """A private copy of the technique registry (and of the plugin bookkeeping) for one test."""
    reg = dict(technique_registry._REGISTRY)
    monkeypatch.setattr(technique_registry, "_REGISTRY", reg)
    cold_cache("plugins.entry_points_loaded")
    monkeypatch.delenv(plugins.IMPORT_ENV, raising=False)
    return reg


class TiltLift(reslab.Technique):
    """``F + tilt * s + lift``: a per-channel shortcut gain and a scalar shift, both learnable."""

    name = "contract_tiltlift"
    summary = "F(x) + tilt * s + lift"
    parameter_names = ("tilt", "lift")

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.tilt = nn.Parameter(torch.full((channels, 1, 1), 0.5))
        block.lift = nn.Parameter(torch.zeros(1))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + block.tilt * shortcut + block.lift

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold(coef=block.tilt.detach().to(FOLD_DTYPE).reshape(-1), shift=block.lift.detach().to(FOLD_DTYPE))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def normalized(fashion, n: int) -> Tensor:
    x = fashion.test_x[:n].float() / 255.0
    return (x - fashion.mean[0]) / fashion.std[0]


def test_a_new_technique_builds_trains_probes_fuses_exports_and_predicts(
    registry, tiny_train_config, fashion, tmp_path: Path
) -> None:
    from reslab.engine.train import train

    reslab.register(TiltLift)
    model = reslab.build_model("resnet8", technique=TiltLift.name, in_channels=1, width=0.25)
    blocks = [b for _, b in reslab.residual_blocks(model)]
    assert blocks and all(b.tilt.shape == (b.conv2.out_channels, 1, 1) for b in blocks)

    # Train a few steps with the real engine: the new parameters are trained too.
    run = tmp_path / "run"
    summary = train(tiny_train_config(technique=TiltLift.name, epochs=1), run, progress=False)
    assert summary["status"] == "completed"
    trained = load_model(run / "model.safetensors").eval()
    tilts = [b.tilt for _, b in reslab.residual_blocks(trained)]
    assert any(not torch.allclose(t, torch.full_like(t, 0.5)) for t in tilts)
    assert any(float(b.lift.detach().abs()) > 0 for _, b in reslab.residual_blocks(trained))

    # Probe: one figure per block, all finite.
    x = normalized(fashion, 64)
    y = fashion.test_y[:64].long()
    probe = probe_model(trained, [(x, y)])
    assert probe.num_blocks == len(tilts) and probe.finite
    assert all(np.isfinite(b.grad_rms) and b.grad_rms > 0 for b in probe.blocks)

    # Fuse: the unfused model's outputs, for positive and for negative shortcut gains.
    images = normalized(fashion, 128)
    for flip in (False, True):
        if flip:
            with torch.no_grad():
                for t in tilts:
                    t[::2].mul_(-1.0)
        fused = reslab.fuse(trained)
        with torch.no_grad():
            want, got = trained(images), fused(images)
        assert want.abs().max() > 0.1
        assert rel_err(want, got) < REL_TOL
        assert technique_leftovers(fused) == []

    # Export the run and predict: the unfused model's top-1 on real test images.
    fused, meta = fused_source(run)
    path = export(fused, export_metadata(fused, meta), "torchscript", tmp_path / "m.pt")
    predictor = load_predictor(path, trust=True)
    assert predictor.metadata["technique"] == TiltLift.name
    reference = load_model(run / "model.safetensors").eval()
    with torch.no_grad():
        want_top = reference(images).argmax(1)
    top = predict(predictor, fashion.test_x[:128].float() / 255.0, top=1)
    got_top = torch.tensor([predictor.metadata["classes"].index(t[0][0]) for t in top])
    assert torch.equal(got_top, want_top)


def test_fuse_names_the_method_a_technique_must_implement(registry) -> None:
    class HalfShortcut(reslab.Technique):  # the README's example, without its fold_merge
        name = "contract_half"

        def merge(self, block, branch, shortcut):  # type: ignore[no-untyped-def]
            return branch + 0.5 * shortcut

    block = reslab.BasicBlock(4, 4, technique=HalfShortcut()).eval()
    with pytest.raises(UsageError, match=r"HalfShortcut\.fold_merge\(block, channels\)"):
        reslab.fuse(block)

    class ClampedGain(techniques.SkipInit):  # changes the branch gain a block folds, not fold_merge
        name = "contract_clamped"

        def branch_gain(self, block):  # type: ignore[no-untyped-def]
            return block.alpha.clamp(max=0.25)

    block = reslab.BasicBlock(4, 4, technique=ClampedGain()).eval()
    with pytest.raises(UsageError, match=r"overrides branch_gain\(\) but not fold_merge"):
        reslab.fuse(block)

    class MyBaseline(techniques.Baseline):  # a subclass that computes the same merge folds
        name = "contract_mybaseline"

    block = reslab.BasicBlock(4, 8, stride=2, technique=MyBaseline()).eval()
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(block(x), reslab.fuse(block)(x)) < REL_TOL


# ---------------------------------------------------------------------------------------
# A technique in a module outside the package, through every command.

PLUGIN = '''
"""A technique outside reslab: F(x) + tilt * s, tilt learnable per channel."""
import torch
from torch import nn

import reslab
from reslab.nn.folding import MergeFold


class Tilt(reslab.Technique):
    name = "{name}"
    summary = "F(x) + tilt * s (a plugin)"
    parameter_names = ("tilt",)

    def add_parameters(self, block, channels):
        block.tilt = nn.Parameter(torch.full((channels, 1, 1), 0.5))

    def merge(self, block, branch, shortcut):
        return branch + block.tilt * shortcut

    def fold_merge(self, block, channels):
        return MergeFold(coef=block.tilt.detach().double().reshape(-1))
'''


def write_plugin(folder: Path, module: str, name: str, register: bool) -> None:
    text = PLUGIN.format(name=name)
    if register:
        text += "\n\nreslab.register(Tilt)\n"
    (folder / f"{module}.py").write_text(textwrap.dedent(text))


def write_distribution(folder: Path, dist: str, module: str, name: str) -> None:
    """What pip leaves for an installed package with a reslab.techniques entry point."""
    info = folder / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{name} = {module}:Tilt\n")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"reslab {' '.join(args)} exited {code}: {err}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("route", ["entry_point", "import"])
def test_a_plugin_technique_works_in_every_command(
    route: str,
    registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    fashion,
) -> None:
    module, name = f"reslab_plugin_{route}", f"plugin_tilt_{route}"
    site = tmp_path / "site"
    site.mkdir()
    write_plugin(site, module, name, register=route == "import")
    if route == "entry_point":
        write_distribution(site, f"reslab_plugin_dist_{route}", module, name)
    monkeypatch.syspath_prepend(str(site))  # spawned workers inherit sys.path
    request.addfinalizer(lambda: sys.modules.pop(module, None))
    imp = ["--import", module] if route == "import" else []

    assert name not in registry  # nothing found until a command needs it
    out = run_cli(["models", *imp], capsys)
    assert f"{name}" in out and "(a plugin)" in out
    d = json.loads(run_cli(["describe", "resnet8", "-t", name, "--width", "0.25", "--json", *imp], capsys))
    assert d["technique"] == name and d["params"] > d["baseline_params"]

    tiny = ["--model", "resnet8", "--width", "0.25", "--epochs", "1", "--train-subset", "256", "--val-size", "200"]
    run = tmp_path / "run"
    run_cli(["train", *imp, "--out", str(run), "--technique", name, "--threads", "1", "--quiet", *tiny], capsys)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"

    # compare and probe run their cells in spawned worker processes: fresh interpreters.
    results = tmp_path / "cmp"
    run_cli(["compare", *imp, "--techniques", name, "--seeds", "1", "--jobs", "2", "--out", str(results), "-q",
             "--no-report", *tiny], capsys)  # fmt: skip
    runs = [json.loads(f.read_text()) for f in sorted(results.glob("runs/*/summary.json"))]
    assert sorted(r["technique"] for r in runs) == sorted(["baseline", name])
    assert all(r["status"] == "completed" for r in runs)
    probe_out = tmp_path / "probe"
    run_cli(["probe", *imp, "-t", f"baseline,{name}", "-d", "8", "--batches", "1", "--batch-size", "16",
             "--width", "0.25", "--workers", "2", "--out", str(probe_out), "--no-progress"], capsys)  # fmt: skip
    assert name in (probe_out / "probe.json").read_text()

    fused = tmp_path / "fused.safetensors"
    run_cli(["fuse", *imp, str(run), "--out", str(fused)], capsys)
    exported = tmp_path / "m.pt2"
    run_cli(["export", *imp, str(run), "--format", "exported", "--out", str(exported)], capsys)
    batch = tmp_path / "x.npy"
    np.save(batch, fashion.test_x[:8].numpy())
    for model_file in (run, fused):
        out = run_cli(["predict", *imp, str(model_file), str(batch), "--top", "1", "--json"], capsys)
        assert len(out.strip().splitlines()) == 8
    # The exported (fused) model computes the trained model's logits.
    reference = load_model(run / "model.safetensors").eval()
    meta = read_metadata(run / "model.safetensors")
    x = (fashion.test_x[:8].float() / 255.0 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        want = reference(x)
    assert rel_err(want, load_predictor(exported, trust=True).logits(x)) < REL_TOL


def test_import_option_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--import", "reslab_no_such_module_here", "models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reslab_no_such_module_here" in err and "--import" in err
    assert main(["models", "--import", "reslab_no_such_module_here"]) == 2
    assert "reslab_no_such_module_here" in capsys.readouterr().err


def test_a_fresh_process_finds_plugins_in_the_current_directory_and_installed_packages(tmp_path: Path) -> None:
    """What a user types: ``reslab --import mymodule`` next to mymodule.py, and an installed plugin."""
    import os
    import subprocess

    write_plugin(tmp_path, "mymodule", "half_cwd", register=True)
    site = tmp_path / "site"
    site.mkdir()
    write_plugin(site, "reslab_plugin_installed", "tilt_installed", register=False)
    write_distribution(site, "reslab_plugin_installed", "reslab_plugin_installed", "tilt_installed")
    src = str(Path(reslab.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(site)])}
    env.pop(plugins.IMPORT_ENV, None)
    cmd = [sys.executable, "-m", "reslab", "describe", "resnet8", "--json", "-t"]
    for technique, extra in (("half_cwd", ["--import", "mymodule"]), ("tilt_installed", [])):
        proc = subprocess.run([*cmd, technique, *extra], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["technique"] == technique
    # Without the option the module in the current directory is not imported.
    proc = subprocess.run([*cmd, "half_cwd"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown technique 'half_cwd'" in proc.stderr and "--import" in proc.stderr


def test_the_readme_technique_example_runs_as_written(
    registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    fashion,
) -> None:
    """README's HalfShortcut, saved as mymodule.py, trains and fuses with ``--import mymodule``."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("A new technique is one small class") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert "mymodule.py" in section and "reslab train --import mymodule --technique half" in section
    (tmp_path / "mymodule.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # --import searches the current directory
    monkeypatch.setattr(sys, "path", list(sys.path))
    request.addfinalizer(lambda: sys.modules.pop("mymodule", None))
    tiny = ["--model", "resnet8", "--width", "0.25", "--epochs", "1", "--train-subset", "256", "--val-size", "200"]
    run_cli(["train", "--import", "mymodule", "--technique", "half", "--out", "runs/half", "-q", *tiny], capsys)
    run_cli(["fuse", "--import", "mymodule", "runs/half", "--out", "half.safetensors"], capsys)
    # The fused model computes the trained one's logits.
    meta = read_metadata(tmp_path / "runs/half/model.safetensors")
    model = load_model(tmp_path / "runs/half/model.safetensors").eval()
    x = (fashion.test_x[:16].float() / 255.0 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        assert rel_err(model(x), load_predictor(tmp_path / "half.safetensors").logits(x)) < REL_TOL


def test_a_broken_plugin_is_one_line_naming_it(
    registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_distribution(tmp_path, "reslab_broken_plugin", "reslab_module_that_is_not_there", "broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'broken'" in err and plugins.ENTRY_POINT_GROUP in err and "uninstall" in err
