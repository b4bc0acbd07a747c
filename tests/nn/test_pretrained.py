"""Pretrained backbones in technique models: torchvision's weights (generated here, no
download) load into every technique that can keep their function, and the model then
computes what torchvision's model computes; the techniques that cannot say so."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import reslab
from reslab import build_model
from reslab.errors import UsageError
from reslab.nn.blocks import residual_blocks

PRESERVING = {"baseline": None, "zero_init": None, "scale": "scale", "skipinit": "alpha", "layerscale": "gamma"}
PRESERVING["fusion"] = "feature_fusion"


def _trained_like(arch: str = "resnet18") -> nn.Module:
    """A torchvision ResNet with non-trivial BatchNorm statistics and affine parameters,
    as after training (a fresh one has mean 0, var 1, gamma 1, beta 0 everywhere)."""
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def tv18():
    return _trained_like("resnet18")


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())))


@pytest.mark.parametrize("technique", list(PRESERVING))
def test_pretrained_function_is_kept(tv18, x, technique):
    model = build_model("resnet18", technique=technique, num_classes=1000, weights=tv18.state_dict()).eval()
    with torch.no_grad():
        assert _close(model(x), tv18(x))
    report = model.pretrained_report
    assert report.function_preserved
    attr = PRESERVING[technique]
    expected = {f"{name}.{attr}" for name, _ in residual_blocks(model)} if attr else set()
    assert set(report.initialised) == expected  # exactly the technique's own parameters
    assert set(report.loaded) == set(tv18.state_dict())


def test_norm_cannot_keep_the_function_and_says_so(tv18, x):
    model = build_model("resnet18", technique="norm", num_classes=1000, weights=tv18.state_dict()).eval()
    with torch.no_grad():
        assert not _close(model(x), tv18(x))
    report = model.pretrained_report
    assert not report.function_preserved and "does NOT keep" in report.summary()
    assert all(k.endswith("residual_norm") for k in report.initialised)


@pytest.mark.parametrize("technique", ["fixup", "preact"])
def test_techniques_without_a_post_activation_backbone_refuse(tv18, technique):
    with pytest.raises(UsageError, match=f"cannot load a pretrained ResNet into technique '{technique}'"):
        build_model("resnet18", technique=technique, num_classes=1000, weights=tv18.state_dict())


def test_fine_tuning_to_other_classes_keeps_the_features(tv18, x):
    model = build_model("resnet18", technique="scale", num_classes=10, weights=tv18.state_dict()).eval()
    assert set(k for k in model.pretrained_report.initialised if k.startswith("fc.")) == {"fc.weight", "fc.bias"}
    feats_tv, feats = nn.Sequential(*list(tv18.children())[:-1]), nn.Sequential(*list(model.children())[:-1])
    with torch.no_grad():
        assert _close(feats(x), feats_tv(x))
    assert model(x).shape == (2, 10)


def test_bottleneck_resnet50(x):
    tv = _trained_like("resnet50")
    model = build_model("resnet50", technique="skipinit", num_classes=1000, weights=tv.state_dict()).eval()
    with torch.no_grad():
        assert _close(model(x), tv(x))


def test_timm_and_checkpoint_layouts_from_files(tmp_path, tv18, x):
    sd = tv18.state_dict()
    # timm's train.py checkpoint: {"state_dict": ..., "epoch": ...}; names as torchvision's,
    # here with the "module." prefix a DDP-wrapped model leaves
    timm_ckpt = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90, "arch": "resnet18"}
    torch.save(timm_ckpt, tmp_path / "timm.pth.tar")
    torch.save(sd, tmp_path / "tv.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tv.safetensors"))
    for name in ("timm.pth.tar", "tv.pth", "tv.safetensors"):
        model = build_model("resnet18", technique="layerscale", num_classes=1000, weights=tmp_path / name).eval()
        with torch.no_grad():
            assert _close(model(x), tv18(x)), name


def test_weights_of_another_architecture_are_refused(tmp_path):
    sd34 = torchvision.models.resnet34(weights=None).state_dict()
    with pytest.raises(UsageError, match=r"lacks \(layer1\.2\."):
        build_model("resnet18", technique="scale", num_classes=1000, weights=sd34)
    with pytest.raises(UsageError, match="do not exist"):
        build_model("resnet18", weights=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="truncated or not a torch file"):
        build_model("resnet18", weights=tmp_path / "junk.pth")


def test_cli_train_init_weights(tmp_path, capsys, tiny_train_config):
    import yaml

    from reslab.cli import main
    from reslab.engine.train import train

    base = tmp_path / "base"
    train(tiny_train_config(epochs=1), base, progress=False)
    out = tmp_path / "tuned"
    argv = ["train", "--out", str(out), "--model", "resnet8", "--width", "0.25", "--technique", "fusion"]
    argv += ["--epochs", "1", "--train-subset", "128", "--val-size", "64", "--batch-size", "64", "--threads", "1"]
    assert main([*argv, "--init-weights", str(base / "model.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "keeps the backbone's function" in err and "newly initialised (weight [0 | I], bias 0" in err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["init_weights"] == str(base / "model.safetensors")
    # weights of another width: refused before anything is written
    wrong = tmp_path / "wrong"
    argv = [*argv, "--init-weights", str(base / "model.safetensors"), "--quiet"]
    argv[argv.index("--out") + 1], argv[argv.index("--width") + 1] = str(wrong), "0.5"
    assert main(argv) == 2
    assert "has shape" in capsys.readouterr().err and not wrong.exists()


class ChannelGain(reslab.Technique):
    """A plugin technique: ``F(x) + g * s`` with a per-channel gain ``g`` that starts random."""

    name = "test_channel_gain"
    parameter_names = ("g",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.g = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def merge(self, block: nn.Module, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return branch + block.g * shortcut

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        block.g.fill_(1.0)
        return {"g": "1 per channel: F(x) + s"}


class ChannelGainUnsaid(ChannelGain):
    """The same merge without a ``from_plain`` of its own (its parent's is removed)."""

    name = "test_channel_gain_unsaid"
    from_plain = reslab.Technique.from_plain


def test_pretrained_module_names_no_technique():
    import reslab.nn.pretrained as pretrained

    text = pretrained.__loader__.get_source(pretrained.__name__) if pretrained.__loader__ else ""
    names = set(reslab.list_techniques())
    said = {n for n in names if f'"{n}"' in text or f"'{n}'" in text}
    assert not said, f"pretrained.py names techniques {said}: a technique decides its own pretrained init"


def test_a_plugin_technique_with_from_plain_loads_a_torchvision_backbone(tv18, x):
    model = build_model("resnet18", technique=ChannelGain(), num_classes=1000, weights=tv18.state_dict()).eval()
    with torch.no_grad():
        assert _close(model(x), tv18(x))  # torchvision's own model is the reference
    report = model.pretrained_report
    assert report.function_preserved
    assert set(report.initialised) == {f"{name}.g" for name, _ in residual_blocks(model)}
    assert set(report.initialised.values()) == {"1 per channel: F(x) + s"}


def test_a_plugin_technique_without_from_plain_loads_and_says_the_function_changed(tv18, x):
    model = build_model("resnet18", technique=ChannelGainUnsaid(), num_classes=1000, weights=tv18.state_dict()).eval()
    report = model.pretrained_report
    assert not report.function_preserved
    assert any("test_channel_gain_unsaid" in n and "from_plain" in n for n in report.notes)
    with torch.no_grad():
        assert not _close(model(x), tv18(x))  # its random gains were left as they were


@pytest.mark.parametrize("technique", ["baseline", "scale"])
def test_an_rgb_backbone_loads_into_a_grey_model(tv18, technique):
    """A 1-channel model from an RGB backbone: the stem's filters are summed over the colours, so a
    grey image gives what torchvision's own model gives for its grey RGB copy (x, x, x)."""
    grey = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    model = build_model("resnet18", technique=technique, num_classes=1000, in_channels=1, weights=tv18.state_dict())
    with torch.no_grad():
        assert _close(model.eval()(grey), tv18(grey.expand(-1, 3, -1, -1)))
        assert torch.equal(model.conv1.weight, tv18.conv1.weight.sum(dim=1, keepdim=True))
    assert any("3 input channels adapted to the model's 1" in n for n in model.pretrained_report.notes)
    # other counts (4: not a multiple of 3; 6: two RGB copies): equal channels keep the response
    for channels in (4, 6):
        other = build_model(
            "resnet18", technique=technique, num_classes=1000, in_channels=channels, weights=tv18.state_dict()
        )
        with torch.no_grad():
            assert _close(other.eval()(grey.expand(-1, channels, -1, -1)), tv18(grey.expand(-1, 3, -1, -1)))


def test_hub_names_resolve_through_the_cache_or_say_what_to_pass(tmp_path, monkeypatch, tv18, capsys):
    """A torchvision weights name is not a missing file: it is found in torch's hub cache, or
    downloaded there; offline, one line says what to pass instead. timm names likewise."""
    from urllib.error import URLError

    from reslab.cli import main
    from reslab.nn.pretrained import hub_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, progress=True):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        UsageError, match=r"could not download torchvision's ResNet18_Weights.IMAGENET1K_V1 .*no network"
    ):
        build_model("resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert hub_weights("my-weights.pth", "resnet18") is None  # an ordinary (missing) file stays one
    with pytest.raises(UsageError, match="not one of torchvision's weights for resnet18"):
        build_model("resnet18", num_classes=1000, weights="IMAGENET9K_V7")
    # the file torchvision would download, already in the cache: used as it is
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv18.state_dict(), cached)
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        model = build_model("resnet18", num_classes=1000, weights=name).eval()
        assert torch.equal(model.conv1.weight, tv18.conv1.weight)
    # through the CLI, offline and uncached: one line, exit 2
    cached.unlink()
    argv = ["train", "--model", "resnet18", "--init-weights", "IMAGENET1K_V1", "--out", str(tmp_path / "r"), "-q"]
    assert main([*argv, "--epochs", "1", "--train-subset", "64", "--val-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download torchvision's" in err[0] and not (tmp_path / "r").exists()
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="timm is not installed; pip install timm, or pass the weights file"):
            build_model("resnet18", num_classes=1000, weights="timm/resnet18.a1_in1k")
