"""Pretrained backbones in technique models: load a plain ResNet's weights (torchvision's,
timm's, or a reslab run's) into a model built with a technique.

The backbone's tensors are copied by name. The technique's own parameters, which the
plain ResNet does not have, are then set by the technique itself
(:meth:`~reslab.nn.technique.Technique.from_plain`, block by block) so that each block still
computes the plain block's function where the technique allows it, and fine-tuning starts
from the pretrained network and not from a perturbed one. A technique that cannot keep the
function raises :class:`~reslab.nn.technique.FunctionChanged` (its parameters keep their own
init and the report says the function changed); one that cannot take a post-activation
backbone at all refuses with a :class:`~reslab.errors.UsageError` before anything is copied.
This module names no technique: a plugin technique takes part through its own
``from_plain``.

A classifier of another size (fine-tuning to ``num_classes`` other than the backbone's)
is left at its fresh init and reported, as are conv biases the backbone lacks (set to 0).

timm's ResNets (``resnet18`` ... ``resnet152``, the plain-stem variants) use the same
parameter names as torchvision's; checkpoints wrapped as ``{"state_dict": ...}``,
``{"model": ...}`` or ``{"state_dict_ema": ...}`` and names prefixed with ``module.`` or
``model.`` (DDP, wrappers) are unwrapped. Files are read without unpickling code:
``.safetensors``, or ``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import re
import urllib.error
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.nn.blocks import residual_blocks
from reslab.nn.technique import FunctionChanged

__all__ = ["PretrainedReport", "load_pretrained", "read_state_dict"]

_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "model.")


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` did."""

    #: parameters and buffers copied from the backbone
    loaded: list[str] = field(default_factory=list)
    #: names of the model's tensors set here rather than loaded, with how
    initialised: dict[str, str] = field(default_factory=dict)
    #: whether the model computes the backbone's function (classifier aside)
    function_preserved: bool = True
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = "keeps the backbone's function" if self.function_preserved else "does NOT keep the backbone's function"
        if self.function_preserved and any(k.startswith("fc.") for k in self.initialised):
            kept += " up to its new classifier"
        lines = [f"loaded {len(self.loaded)} tensors from the backbone; the model {kept}"]
        groups: dict[str, list[str]] = {}
        for name, how in self.initialised.items():
            groups.setdefault(how, []).append(name)
        for how, names in groups.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"newly initialised ({how}): {shown}")
        lines += self.notes
        return "\n".join(lines)


def read_state_dict(source: str | Path | Mapping[str, Tensor], arch: str | None = None) -> dict[str, Tensor]:
    """A plain ``name -> tensor`` dict from a file, a (possibly wrapped) mapping, or a hub name
    (:func:`hub_weights`; ``arch``: the model's name, for torchvision's bare weight names)."""
    if isinstance(source, Mapping):
        obj: object = source
        where = "the given state dict"
    else:
        path = Path(source)
        where = str(path)
        if not path.exists() and (hub := hub_weights(str(source), arch)) is not None:
            return read_state_dict(hub)
        if not path.is_file():
            raise UsageError(f"pretrained weights {path} do not exist" + (" (it is a folder)" if path.is_dir() else ""))
        if path.suffix == ".safetensors":
            from reslab.files import load_state

            obj = load_state(path)
        else:
            from reslab.files import torch_load_safe

            obj = torch_load_safe(path)
    for _ in range(2):  # a training checkpoint wraps the weights beside its epoch, optimizer, ...
        if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UsageError(f"{where} is not a state dict of tensors (a ResNet's weights); nothing was loaded")
    state = {str(k): v for k, v in obj.items()}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


_TORCHVISION_NAME = re.compile(r"^(?:(?P<enum>[A-Za-z0-9]+_Weights)\.)?(?P<name>[A-Z][A-Z0-9_]*_V\d+|DEFAULT)$")


def hub_weights(name: str, arch: str | None) -> Path | None:
    """The local file of weights named the way torchvision (``IMAGENET1K_V1``,
    ``ResNet50_Weights.IMAGENET1K_V2``) or timm (``timm/resnet18.a1_in1k``) name them, downloading
    it into torch's hub cache when it is not there yet; None when ``name`` is neither. Anything
    that prevents it (no torchvision or timm, no network) is a :class:`UsageError` saying what to
    pass instead."""
    tv = _TORCHVISION_NAME.match(name)
    if tv:
        return _torchvision_weights(name, tv.group("enum"), tv.group("name"), arch)
    if name.startswith(("timm/", "hf-hub:timm/")):
        return _timm_weights(name.split("timm/", 1)[1])
    return None


def _torchvision_weights(full: str, enum: str | None, entry: str, arch: str | None) -> Path:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise UsageError(
            f"{full} names torchvision weights, and torchvision is not installed; install it, or pass the "
            "weights file (.pth or .safetensors)"
        ) from None
    try:
        weights = tvm.get_weight(full) if enum else tvm.get_model_weights(str(arch))[entry]
    except (KeyError, ValueError, AttributeError):
        raise UsageError(
            f"{full} is not one of torchvision's weights for {arch or 'this model'}; list them with "
            f"python -c \"import torchvision; print(list(torchvision.models.get_model_weights('{arch}')))\""
        ) from None
    return _cached_download(weights.url, f"torchvision's {weights}")


def _timm_weights(name: str) -> Path:
    try:
        import timm
    except ImportError:
        raise UsageError(
            f"timm/{name} names timm weights, and timm is not installed; pip install timm, or pass the "
            "weights file (.safetensors or .pth)"
        ) from None
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - timm's download errors are many (network, hub, name)
        raise UsageError(
            f"could not load timm/{name} ({type(e).__name__}: {str(e)[:120]}); on a machine with internet "
            f"save timm.create_model('{name}', pretrained=True).state_dict() and pass that file"
        ) from None
    from safetensors.torch import save_file

    hub = Path(torch.hub.get_dir()) / "checkpoints" / f"timm-{name.replace('/', '_')}.safetensors"
    hub.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hub))
    return hub


def _cached_download(url: str, what: str) -> Path:
    """``url``'s file in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded once."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except (OSError, urllib.error.URLError) as e:
        raise UsageError(
            f"could not download {what} from {url} ({e}); on a machine with internet download that file and pass "
            f"it (or put it in {target.parent})"
        ) from None
    return target


def _only_inputs_differ(src: Tensor, target: Tensor) -> bool:
    return src.dim() == 4 and src.shape[0] == target.shape[0] and src.shape[2:] == target.shape[2:]


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A first convolution's filters for ``channels`` input channels instead of their own, such
    that an image with all channels equal gets the response the original filters give to it: for
    a multiple of the old count, the filters tiled and scaled by old / new channels (colour kept
    per channel group); otherwise their sum over the inputs, spread evenly (one channel: the sum,
    so a grey image x gives what the backbone gives for (x, x, x))."""
    old = weight.shape[1]
    if channels % old == 0:
        return weight.repeat(1, channels // old, 1, 1) * (old / channels)
    return weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels


def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, Tensor]) -> PretrainedReport:
    """Copy a plain ResNet's weights into ``model`` (built with a technique) and set the
    technique's own parameters to keep the backbone's function where possible.

    Raises :class:`~reslab.errors.UsageError` when the weights do not fit the model (other
    names or shapes, other than a classifier of another size) or the technique cannot
    take a post-activation backbone.
    """
    spec = getattr(model, "spec", None)
    blocks = residual_blocks(model)
    techniques = list({id(b.technique): b.technique for _, b in blocks}.values())
    for tech in techniques:
        # A refusal depends on the technique's structure, not on values: try it on a copy of
        # one of its blocks before anything of the model is changed.
        first = next(b for _, b in blocks if b.technique is tech)
        with torch.no_grad():
            try:
                tech.from_plain(copy.deepcopy(first))
            except FunctionChanged:
                pass
    state = read_state_dict(source, getattr(spec, "name", None))
    own = model.state_dict()
    report = PretrainedReport()

    extra = sorted(k for k in state if k not in own and not k.endswith("num_batches_tracked"))
    if extra:
        shown = ", ".join(extra[:5]) + (f", ... ({len(extra)} in all)" if len(extra) > 5 else "")
        raise UsageError(
            f"the pretrained weights hold tensors this {getattr(spec, 'name', 'model')} lacks ({shown}); "
            "they are for another architecture or technique"
        )
    to_load: dict[str, Tensor] = {}
    stem = next((n for n, t in own.items() if t.dim() == 4), None)  # the first convolution
    for name, target in own.items():
        src = state.get(name)
        if src is None:
            continue
        if name == stem and src.shape != target.shape and _only_inputs_differ(src, target):
            to_load[name] = adapt_input_channels(src, target.shape[1])
            report.notes.append(
                f"{name}: the backbone's {src.shape[1]} input channels adapted to the model's {target.shape[1]} "
                + (
                    "(filters summed: a grey image gives what the backbone gives for its grey RGB copy)"
                    if target.shape[1] == 1
                    else "(an image with equal channels gives the backbone's response to its grey copy)"
                )
            )
            continue
        if src.shape != target.shape:
            if name.startswith("fc."):
                report.initialised[name] = f"fresh, classifier {tuple(target.shape)} vs pretrained {tuple(src.shape)}"
                continue
            raise UsageError(
                f"pretrained {name} has shape {tuple(src.shape)}, the model's is {tuple(target.shape)}; build the "
                "model with the backbone's architecture (its name and width)"
            )
        to_load[name] = src
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)

    changed: dict[str, str] = {}
    with torch.no_grad():
        for block_name, block in blocks:
            try:
                for attr, how in block.technique.from_plain(block).items():
                    report.initialised[f"{block_name}.{attr}"] = how
            except FunctionChanged as e:
                changed.setdefault(block.technique.name, str(e))
                for attr in block.technique.parameter_names:
                    report.initialised[f"{block_name}.{attr}"] = "the technique's own init (the function changes)"
    own_names = {n for tech in techniques for n in tech.parameter_names}
    for name, param in model.named_parameters():
        if name in to_load or name in report.initialised or any(name.startswith(k + ".") for k in report.initialised):
            continue
        if name.endswith(".bias") and name[: -len(".bias")] + ".weight" in to_load:
            with torch.no_grad():
                param.zero_()  # a conv bias the backbone does not have: 0 adds nothing
            report.initialised[name] = "0 (absent from the backbone)"
        elif own_names & set(name.split(".")):
            report.initialised[name] = "the technique's own init"
        else:
            raise UsageError(f"the pretrained weights have no {name}; they are not a complete ResNet state dict")
    # buffers (BatchNorm running statistics) of the backbone's layers must all have come along
    missing_buffers = [
        n
        for n, _ in model.named_buffers()
        if n not in to_load
        and not n.endswith("num_batches_tracked")
        and not any(n.startswith(k + ".") for k in report.initialised)
        and not (own_names & set(n.split(".")))
    ]
    if missing_buffers:
        raise UsageError(
            f"the pretrained weights lack {', '.join(missing_buffers[:3])}; they are not a complete ResNet state dict"
        )
    for name, why in changed.items():
        report.function_preserved = False
        report.notes.append(f"{name}: {why}; fine-tuning starts from a changed network")
    return report
