"""The grouped route of a pack (reslab.engine.packed.grouped): K members as one network of
grouped layers, checked against the members run alone (plain modules, one at a time) and
against the vmap route, in float64 so that rounding cannot hide a wrong layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reslab
from reslab.engine.build import open_run_dataset
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel
from reslab.engine.packed.check import pack_route
from reslab.engine.packed.grouped import GroupedDropPath, GroupedLinear, NotGroupable, grouped_model
from reslab.nn import registry as technique_registry
from reslab.nn.folding import FOLD_DTYPE, MergeFold
from reslab.nn.models import build_model
from reslab.nn.registry import list_techniques

K, B = 3, 6
#: what has a grouped form among the built-ins: all of them (Fixup through its modules' own
#: ``grouped`` methods)
GROUPED = list_techniques()


def members(technique: str, model: str = "resnet8", k: int = K, **options) -> list[nn.Module]:
    """``k`` members with different weights, moved off their init (zeros would hide a wrong
    merge), in float64."""
    out = []
    for s in range(k):
        torch.manual_seed(s)
        m = build_model(model, technique=technique, num_classes=10, in_channels=1, width=0.5, **options).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        out.append(m)
    return out


def pack_of(ms: list[nn.Module], route: str, channels_last: bool = False, wd: float = 5e-4) -> PackedModel:
    ms = [copy.deepcopy(m) for m in ms]
    opts = [torch.optim.SGD(param_groups(m, wd), lr=0.1, momentum=0.9, nesterov=True) for m in ms]
    return PackedModel(ms, opts, wd, 0.9, True, 0.1, route=route, channels_last=channels_last)


def batch(k: int = K, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, B, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (k, B), generator=g)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("technique", GROUPED)
def test_grouped_pack_computes_what_its_members_compute_alone(technique, channels_last):
    """Training logits, losses, every gradient, the BatchNorm statistics after the step, and
    evaluation logits, against each member's own modules."""
    ms = members(technique)
    pack = pack_of(ms, "grouped", channels_last)
    x, y = batch()
    losses, logits = pack.train_losses(x, y, 0.1)
    losses.sum().backward()
    alone = [copy.deepcopy(m).train() for m in ms]
    for i, m in enumerate(alone):
        out = m(x[i])
        loss = F.cross_entropy(out, y[i], label_smoothing=0.1)
        loss.backward()
        torch.testing.assert_close(logits[i], out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(losses[i], loss, rtol=1e-9, atol=1e-9)
        for n, p in m.named_parameters():
            torch.testing.assert_close(pack.params[n].grad[i], p.grad, rtol=1e-7, atol=1e-9, msg=n)
        for n, b in m.named_buffers():
            torch.testing.assert_close(pack.buffers[n][i], b, rtol=1e-9, atol=1e-9, msg=n)
    with torch.no_grad():
        got = pack.eval_logits(x[0])
        for i, m in enumerate(alone):
            torch.testing.assert_close(got[i], m.eval()(x[0]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("technique", ["scale", "fusion", "preact"])
def test_grouped_and_vmap_routes_train_alike(technique):
    """Five SGD steps (momentum, Nesterov, weight decay) by each route end at the same weights."""
    ms = members(technique)
    packs = {r: pack_of(ms, r) for r in ("vmap", "grouped")}
    for step in range(5):
        x, y = batch(seed=step)
        for p in packs.values():
            losses, _ = p.train_losses(x, y, 0.0)
            p.optimizer.zero_grad()
            losses.sum().backward()
            p.step()
    for n, t in packs["vmap"].params.items():
        torch.testing.assert_close(packs["grouped"].params[n], t, rtol=1e-8, atol=1e-10, msg=n)


def test_bottleneck_models_have_a_grouped_form():
    ms = members("layerscale", model="resnet50", k=2)
    pack = pack_of(ms, "grouped")
    x = torch.randn(2, 2, 1, 32, 32, dtype=torch.float64)
    _, logits = pack.train_losses(x, torch.zeros(2, 2, dtype=torch.long), 0.0)
    for i, m in enumerate(ms):
        torch.testing.assert_close(logits[i], copy.deepcopy(m).train()(x[i]), rtol=1e-9, atol=1e-9)


def test_channels_last_pack_stores_conv_weights_so_their_grouped_view_is_channels_last():
    pack = pack_of(members("baseline"), "grouped", channels_last=True)
    convs = [n for n, t in pack.params.items() if t.dim() == 5]
    assert convs
    for n in convs:
        view = pack.views[n](pack.params[n])
        assert view.is_contiguous(memory_format=torch.channels_last), n
        assert view.data_ptr() == pack.params[n].data_ptr()  # a view, not a copy


def test_a_resumed_channels_last_pack_keeps_its_momentum_in_the_weights_layout():
    """Stacked from the members' optimizers (a resumed pack), the momentum buffers take their
    parameters' strides, as the ones SGD creates do: the fused foreach kernels need both alike."""
    ms = members("baseline")
    pack = pack_of(ms, "grouped", channels_last=True)
    x, y = batch()
    for _ in range(2):
        losses, _ = pack.train_losses(x, y, 0.0)
        pack.optimizer.zero_grad()
        losses.sum().backward()
        pack.step()
    pack.to_members()
    again = PackedModel(pack.members, pack.member_opts, 5e-4, 0.9, True, 0.1, route="grouped", channels_last=True)
    for (n, p), q in zip(again.params.items(), pack.params.values(), strict=True):
        buf = again.optimizer.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride(), n
        torch.testing.assert_close(buf, pack.optimizer.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_pack_route_picks_grouped_where_a_grouped_form_exists(tiny_train_config):
    for t in list_techniques():
        cfg = tiny_train_config(technique=t, drop_path_rate=0.1)
        assert pack_route(cfg, open_run_dataset(cfg)) == ("grouped" if t in GROUPED else "vmap", ""), t


def test_grouped_linear_is_one_linear_layer_per_member():
    w, b = torch.randn(K, 5, 7, dtype=torch.float64), torch.randn(K, 5, dtype=torch.float64)
    x = torch.randn(4, K * 7, dtype=torch.float64)
    lin = GroupedLinear(K, 7, 5, bias=True)
    out = torch.func.functional_call(lin, {"weight": w, "bias": b}, (x,))
    want = torch.cat([F.linear(x[:, 7 * i : 7 * (i + 1)], w[i], b[i]) for i in range(K)], 1)
    torch.testing.assert_close(out, want)


def test_grouped_drop_path_draws_per_sample_and_member():
    """Each (sample, member) is kept whole or dropped whole, on draws of its own, with the
    kept ones scaled by 1/(1-p) so the mean stays 1."""
    torch.manual_seed(0)
    p, c, n = 0.5, 4, 4000
    out = GroupedDropPath(p, K).train()(torch.ones(n, K * c, 2, 2)).view(n, K, c * 4)
    per = out[:, :, 0]
    assert torch.equal(out, per[:, :, None].expand_as(out))  # whole member-sample kept or dropped
    assert set(per.unique().tolist()) == {0.0, 1 / (1 - p)}
    assert abs(per.mean().item() - 1.0) < 4 * (1 / (1 - p)) * 0.5 / (n * K) ** 0.5
    # members draw apart: the same sample is dropped in one member and kept in another
    assert (per[:, 0] != per[:, 1]).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert torch.equal(GroupedDropPath(p, K).eval()(out), out)


class MeanGate(reslab.Technique):
    """``F + mean(gate) * s``: converts to a grouped form (a per-channel parameter), but the
    mean there would run over every member's channels, so the grouped pack would mix them."""

    name = "packtest_meangate"
    parameter_names = ("gate",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.gate = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(channels, 1, 1))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + block.gate.mean() * shortcut

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold(coef=block.gate.detach().to(FOLD_DTYPE).mean())


def test_a_grouped_form_that_mixes_members_is_caught_and_the_pack_maps_with_vmap(registry, tiny_train_config):
    technique_registry.register(MeanGate)
    ms = members("packtest_meangate", k=2)
    grouped_model(ms[0], 2)  # the conversion alone cannot see it
    x, y = batch(k=2)
    _, logits = pack_of(ms, "grouped").train_losses(x, y, 0.0)
    assert not torch.allclose(logits[0], copy.deepcopy(ms[0]).train()(x[0]))
    cfg = tiny_train_config(technique="packtest_meangate")
    assert pack_route(cfg, open_run_dataset(cfg)) == ("vmap", "")


class Shift(nn.Module):
    """A learnable scalar shift that does not say what it is in a pack."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class Shifted(reslab.Technique):
    """A branch that ends in a module of the technique's own, with no grouped form."""

    name = "packtest_shifted"

    def last_norm(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(channels), Shift())


class GroupedShift(Shift):
    """The same module, saying what it is in a pack of ``k``: one shift per member."""

    def grouped(self, k: int) -> nn.Module:
        from reslab.nn.techniques import per_member

        class Grouped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.shift = nn.Parameter(torch.empty(k, 1, device="meta"))

            def forward(self, x: Tensor) -> Tensor:
                return (x.unflatten(1, (k, -1)) + per_member(self.shift, k, x.ndim)).flatten(1, 2)

        return Grouped()


class ShiftedGrouped(reslab.Technique):
    name = "packtest_shifted_grouped"

    def last_norm(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(channels), GroupedShift())


def test_a_module_of_a_plugin_packs_grouped_once_it_says_how(registry, tiny_train_config):
    technique_registry.register(Shifted)
    technique_registry.register(ShiftedGrouped)
    with pytest.raises(NotGroupable, match=r"layer1\.0\.bn2\.1 \(.*Shift\) has no grouped form"):
        grouped_model(build_model("resnet8", technique="packtest_shifted", in_channels=1), 2)
    cfg = tiny_train_config(technique="packtest_shifted")
    assert pack_route(cfg, open_run_dataset(cfg)) == ("vmap", "")
    cfg = tiny_train_config(technique="packtest_shifted_grouped")
    assert pack_route(cfg, open_run_dataset(cfg)) == ("grouped", "")
    ms = members("packtest_shifted_grouped")
    with torch.no_grad():
        for i, m in enumerate(ms):
            for mod in m.modules():
                if isinstance(mod, GroupedShift):
                    mod.shift.fill_(float(i))  # each member its own shift
    x, y = batch()
    _, logits = pack_of(ms, "grouped").train_losses(x, y, 0.0)
    for i, m in enumerate(ms):
        torch.testing.assert_close(logits[i], copy.deepcopy(m).train()(x[i]), rtol=1e-9, atol=1e-9)


def test_conversion_names_the_part_with_no_grouped_form():
    with pytest.raises(NotGroupable, match="not a reslab ResNet"):
        grouped_model(nn.Sequential(nn.Conv2d(1, 2, 3)), 2)
