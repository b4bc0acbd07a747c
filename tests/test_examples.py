"""The documented examples run as written, and the Python API keeps torchvision's and timm's conventions."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import reslab

README = Path(__file__).parents[1] / "README.md"


def test_docstring_examples_run() -> None:
    attempted = 0
    for info in pkgutil.walk_packages(reslab.__path__, prefix="reslab."):
        if info.name == "reslab.__main__":  # importing it runs the command line
            continue
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"doctest failed in {info.name}"
        attempted += result.attempted
    result = doctest.testmod(reslab)
    assert result.failed == 0
    assert attempted + result.attempted > 0


def test_readme_python_section_runs_as_written() -> None:
    text = README.read_text()
    section = text[text.index("## In Python") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    scope: dict[str, object] = {}
    exec(compile(code, "README.md (In Python)", "exec"), scope)
    assert scope["logits"].shape == (8, 10)  # type: ignore[attr-defined]
    assert scope["tv"].fc.out_features == 1000  # type: ignore[attr-defined]


def test_imagenet_models_default_to_1000_classes_and_load_torchvision_weights() -> None:
    tv_models = pytest.importorskip("torchvision.models")
    assert reslab.build_model("resnet18").fc.out_features == 1000
    assert reslab.build_model("resnet18").spec.num_classes == 1000
    assert reslab.build_model("resnet20").fc.out_features == 10  # CIFAR family: 10
    assert reslab.build_model("resnet18", num_classes=7).fc.out_features == 7
    # The models module's own example: torchvision's state dict loads as it is...
    reslab.build_model("resnet50").load_state_dict(tv_models.resnet50().state_dict())
    # ...and computes torchvision's function.
    torch.manual_seed(0)
    tv = tv_models.resnet18().eval()
    ours = reslab.build_model("resnet18").eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)


@pytest.mark.parametrize("technique", ["baseline", "preact"])
def test_timm_style_feature_and_classifier_access(technique: str) -> None:
    model = reslab.build_model("resnet8", technique=technique, in_channels=1, width=0.5).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (3, model.num_features, 7, 7)  # the map, before pooling
        pooled = model.forward_head(features, pre_logits=True)
        assert torch.allclose(pooled, features.mean(dim=(2, 3)))
        assert torch.equal(model.forward_head(features), model(x))
    assert model.get_classifier() is model.fc
    model.reset_classifier(5)
    assert isinstance(model.fc, nn.Linear) and model(x).shape == (3, 5) and model.spec.num_classes == 5
