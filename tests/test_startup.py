"""Start-up: 'reslab --help' and 'reslab models' answer without loading torch; the tables
kept for that agree with the real registries; the package's names still resolve."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _imported_modules(*argv: str) -> tuple[set[str], str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reslab", *argv], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    mods = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return mods, r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["train", "--help"], ["report", "--help"]])
def test_cli_start_does_not_import_torch(argv):
    mods, out = _imported_modules(*argv)
    assert "torch" not in mods and "numpy" not in mods
    assert out  # it printed its answer


def test_models_listing_matches_the_registries():
    from reslab.nn import catalog
    from reslab.nn.models import list_models, model_family
    from reslab.nn.techniques import list_techniques, technique_class

    # what the catalog reads from the source without running it is what running it registers
    # (user registrations, which tests make, come after the built-ins)
    built_in_models, built_in = catalog.builtin_models(), catalog.builtin_techniques()
    assert [(n, model_family(n)) for n in list_models()] == built_in_models  # no test registers a model
    live = [(n, technique_class(n).summary, technique_class(n).reference) for n in list_techniques()]
    assert live[: len(built_in)] == built_in and len(built_in) >= 9
    # with the registries imported, the catalog lists them live
    assert catalog.techniques() == live and catalog.TECHNIQUES == tuple(live)
    _, out = _imported_modules("models")
    for name in list_models()[:3] + list_techniques()[: len(built_in)]:
        assert f"  {name} " in out


def test_a_technique_registered_in_the_source_is_listed_with_no_edit_to_the_catalog():
    from reslab.nn import catalog

    source = (Path(SRC) / "reslab" / "nn" / "techniques.py").read_text(encoding="utf-8")
    added = source + (
        "\n\n@register\nclass Halved(Technique):\n"
        '    name = "halved"\n    summary = "F(x) + s / 2"\n    reference = "a test"\n'
        "\n\nclass Quiet(Baseline):\n"
        '    name = "quiet"\n\n\nregister(Quiet)\n'
    )
    listed = catalog.builtin_techniques(added)
    assert listed[: len(catalog.builtin_techniques())] == catalog.builtin_techniques()
    # its own fields, and fields inherited from a built-in as Python would find them
    assert listed[-2:] == [
        ("halved", "F(x) + s / 2", "a test"),
        ("quiet", "F(x) + s", "He et al. 2016, Deep Residual Learning"),
    ]
    by_name = "\n\nregister_model('resnet18d', 'imagenet')(lambda **kw: None)\n"
    models_source = (Path(SRC) / "reslab" / "nn" / "models.py").read_text(encoding="utf-8")
    with pytest.raises(Exception, match="registered by name"):  # a model of no depth table: run it
        catalog.builtin_models(models_source + by_name)
    computed = added + '\n\n@register\nclass Computed(Technique):\n    name = "c"\n    summary = "a" + "b"\n'
    with pytest.raises(Exception, match="not a plain string"):  # then the catalog runs it (the live registry)
        catalog.builtin_techniques(computed)


def test_a_plugin_technique_is_listed_by_reslab_models(tmp_path):
    (tmp_path / "halved_plugin.py").write_text(
        "import reslab\n\n\n@reslab.register\nclass Halved(reslab.Technique):\n"
        '    name = "halved_plugin"\n    summary = "F(x) + s, listed from a plugin"\n'
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-m", "reslab", "--import", "halved_plugin", "models"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "  halved_plugin F(x) + s, listed from a plugin\n" in r.stdout
    assert "  preact " in r.stdout  # the built-ins too


def test_export_choices_match_reslab_export():
    from reslab.cli.commands import export as cmd
    from reslab.deploy.export import FORMATS, SUFFIXES

    assert tuple(cmd.FORMATS) == tuple(FORMATS) and cmd.SUFFIXES == SUFFIXES


def test_package_names_resolve_lazily():
    import reslab
    from reslab.nn.models import build_model

    assert reslab.build_model is build_model
    assert set(reslab.__all__) <= set(dir(reslab))
    for name in reslab.__all__:
        assert getattr(reslab, name) is not None
    # 'fuse' is a function of the package; importing the module that defines it leaves it so
    code = "import reslab, reslab.deploy.fuse as m; assert reslab.fuse is m.fuse; print('ok')"
    env = {**os.environ, "PYTHONPATH": SRC}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "ok\n"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reslab.nope  # noqa: B018


def test_cpu_compile_cuda_home_warning_is_silenced(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    from reslab.engine.build import silence_cuda_home_warning

    if ext.torch.cuda.is_available():
        pytest.skip("the warning only appears without a CUDA runtime")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        ext._find_cuda_home()
    assert "No CUDA runtime is found" in caplog.text  # the message torch.compile triggers on a CPU
    caplog.clear()
    silence_cuda_home_warning()
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        ext._find_cuda_home()
        logging.getLogger("torch.utils.cpp_extension").warning("another message")
    assert "No CUDA runtime is found" not in caplog.text and "another message" in caplog.text
