"""The training configuration: one dataclass, read from Python, YAML, TOML or the command
line, validated in one place so every entry point gives the same one-line errors."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from reslab.errors import UsageError

SCHEDULES = ("onecycle", "cosine", "step", "constant")
PRECISIONS = ("auto", "fp32", "bf16")

#: fields that may differ between a run and its ``--resume`` (they change where and how
#: fast it runs, not what it computes).
RESUMABLE_CHANGES = frozenset(
    {
        "device",
        "threads",
        "compile",
        "cuda_graphs",
        "tensorboard",
        "workers",
        "data_dir",
        "precision",
        "channels_last",
        "pack",
    }
)


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field that is also a command-line option: its help text (the default is added to
    it by :func:`cli_options`) and any further argparse keywords, e.g. ``metavar``."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything that decides a training run.

    The defaults train ``resnet20`` on fashion-mnist to about 93% test accuracy in 10
    epochs: SGD with Nesterov momentum 0.9, peak learning rate 0.1 at batch 128, weight
    decay 5e-4 (not on BatchNorm, biases or technique scalars), a one-cycle schedule
    (linear warm-up over the first 20% of steps, then linear decay to zero), label
    smoothing 0.1, random crop and horizontal flip.

    Each field's help text (its metadata) is what ``reslab train --help`` shows, with the
    default read from here (:func:`cli_options`). Fields set to ``None`` are resolved
    from the dataset and machine by :func:`reslab.engine.train.resolve_config` (``val_size``: 5,000 for
    fashion-mnist and CIFAR, 10% otherwise; ``flip`` and
    ``crop_padding``: what suits the dataset; ``device``: CUDA when present).
    """

    model: str = _opt("resnet20", "model name, e.g. resnet20; 'reslab models' lists them")
    technique: str = _opt("baseline", "residual technique; 'reslab models' lists them")
    dataset: str = _opt("fashion-mnist", "fashion-mnist, cifar10, cifar100, digits or folder:PATH")
    data_dir: str | None = _opt(
        None,
        "folder holding the dataset's files, the only place looked at (an error if it lacks them); without it: "
        "$RESLAB_DATA/NAME, ~/.cache/reslab/NAME, /usr/share/datasets/NAME, then a verified download",
    )
    epochs: int = _opt(10, "epochs")
    batch_size: int = _opt(128, "global batch size, all processes together")
    lr: float = _opt(0.1, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum")
    weight_decay: float = _opt(
        5e-4, "weight decay on conv and linear weights (not on BatchNorm, biases or technique gains)"
    )
    label_smoothing: float = _opt(0.1, "label smoothing")
    schedule: str = _opt(
        "onecycle", "learning-rate schedule: onecycle, cosine, step (lr/10 at 50% and 75% of steps) or constant"
    )
    warmup: float = _opt(0.2, "fraction of all steps spent warming the learning rate up linearly from zero")
    val_size: int | None = _opt(
        None,
        "validation images held out of the training set for validation curves (unset: 5000 for fashion-mnist and "
        "CIFAR, 10% otherwise; 0 = use the test set)",
    )
    train_subset: int | None = _opt(
        None, "train on the first N images of the fixed shuffle of the training split (quick runs; unset: all)"
    )
    test_subset: int | None = _opt(
        None, "test on the first N images of a fixed shuffle of the test split (quick runs; unset: all)"
    )
    flip: bool | None = _opt(None, "random horizontal flip (unset: what suits the dataset)")
    crop_padding: int | None = _opt(None, "random-crop padding in pixels (unset: what suits the dataset)")
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    compile: bool = _opt(False, "torch.compile the model")
    cuda_graphs: bool = _opt(
        False,
        "capture the training step as a CUDA graph after 3 eager steps and replay it (CUDA, one process; not with "
        "compile or probe_every)",
    )
    channels_last: bool = _opt(True, "NHWC memory format")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16")
    width: float = _opt(1.0, "width multiplier")
    drop_path_rate: float = _opt(0.0, "stochastic depth rate of the last block")
    #: keyword arguments of the technique (the command line's --technique-arg KEY=VALUE)
    technique_args: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = _opt(
        None,
        "start from a plain ResNet's weights (torchvision/timm .pth or .safetensors, or a reslab model.safetensors) "
        "of the same architecture; the technique starts where it keeps their function (reslab.nn.pretrained; "
        "unset: fresh init)",
        metavar="FILE",
    )
    probe_every: int = _opt(
        0, "record per-block gradient norms every K optimizer steps into gradients.jsonl (0 = off)", metavar="K"
    )
    threads: int | None = _opt(None, "CPU threads for this process (unset: PyTorch's default)")
    workers: int = _opt(2, "DataLoader workers for folder:PATH datasets")
    eval_batch_size: int = _opt(1000, "evaluation batch size")
    evals_per_epoch: int = _opt(
        1,
        "validation evaluations per epoch; above 1, the extra ones fall at evenly spaced steps inside each epoch "
        "and go to evals.jsonl (time-to-target at sub-epoch resolution)",
    )
    image_size: int | None = _opt(None, "square size folder:PATH images are resized to (unset: the first image's size)")
    tensorboard: bool = _opt(False, "also write TensorBoard event files")
    #: the pack a run trained in (:func:`reslab.engine.packed.train_pack`): ``{"size": K,
    #: "index": i, "members": [run folder names], "seeds": [...]}``; ``None`` for a run
    #: trained alone, and then left out of :meth:`to_dict`, so an unpacked run's files are
    #: what they were before packs existed. Where and with whom a run trained, not what it
    #: computes: a packed run may resume alone and the other way round.
    pack: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping (e.g. a parsed YAML file), coercing and validating types."""
        if not isinstance(data, dict):
            raise UsageError(f"{source} must be a mapping of option: value, got {type(data).__name__}")
        names = cls.field_names()
        unknown = [k for k in data if k.replace("-", "_") not in names]
        if unknown:
            raise UsageError(f"{source}: unknown option(s) {', '.join(map(str, unknown))}; valid: {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        values = {k.replace("-", "_"): _coerce(k, v, hints[k.replace("-", "_")], source) for k, v in data.items()}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["pack"] is None:
            del d["pack"]
        return d

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Raise :class:`UsageError` for a value no run could use."""
        from reslab.nn.models import _constructor
        from reslab.nn.techniques import technique_class

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        try:
            _constructor(self.model)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            technique_class(self.technique)
        except ValueError as e:
            raise UsageError(str(e)) from None
        need(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(not (self.nesterov and self.momentum == 0), "nesterov needs a momentum above 0; set --no-nesterov")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(0 <= self.warmup < 1, f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        need(self.val_size is None or self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")
        need(
            self.train_subset is None or self.train_subset >= 1,
            f"train_subset must be at least 1 (or unset), got {self.train_subset}",
        )
        need(
            self.test_subset is None or self.test_subset >= 1,
            f"test_subset must be at least 1 (or unset), got {self.test_subset}",
        )
        need(self.crop_padding is None or self.crop_padding >= 0, "crop_padding must be >= 0")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(self.width > 0, f"width must be positive, got {self.width}")
        need(0 <= self.drop_path_rate < 1, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        need(self.probe_every >= 0, f"probe_every must be >= 0 (0 = off), got {self.probe_every}")
        need(self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}")
        need(self.evals_per_epoch >= 1, f"evals_per_epoch must be at least 1, got {self.evals_per_epoch}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(self.image_size is None or self.image_size >= 1, "image_size must be at least 1")
        need(
            self.pack is None or (isinstance(self.pack, dict) and int(self.pack.get("size", 0)) >= 1),
            f"pack must be unset or a mapping with a size of at least 1, got {self.pack!r}",
        )
        need(
            self.precision in PRECISIONS,
            f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith(("cuda", "mps", "xpu")),
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        from reslab.engine.data import DATASETS

        need(
            self.dataset in DATASETS or self.dataset.startswith("folder:"),
            f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}, folder:PATH",
        )
        try:
            from reslab.nn.techniques import get_technique

            get_technique(self.technique, **self.technique_args)
        except ValueError as e:
            raise UsageError(str(e)) from None
        # remembered outside the fields, so it is not part of the config (to_dict, equality)
        self.__dict__["_validated"] = self.to_dict()

    def ensure_valid(self) -> TrainConfig:
        """:meth:`validate`, unless these exact values were validated already: a config is
        built and checked once (e.g. by :meth:`from_dict`) and then passed down; one changed
        since is checked again."""
        if self.__dict__.get("_validated") != self.to_dict():
            self.validate()
        return self


def _is_optional(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    optional, base = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UsageError(f"{source}: {name} cannot be empty")
    origin = typing.get_origin(base) or base
    bad = UsageError(f"{source}: {name} must be {getattr(origin, '__name__', origin)}, got {value!r}")
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if origin is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if origin is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)  # YAML reads 5e-4 as a string; float() takes it
        except (TypeError, ValueError):
            raise bad from None
    if origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is dict:
        if isinstance(value, dict):
            return {str(k): _number_or_str(v) for k, v in value.items()}
        raise bad
    return value


def _number_or_str(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; give technique arguments their number back."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(items: list[str], flag: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings of a repeatable option as a dict; values read as YAML scalars.

    Keys take underscores for dashes, like the option names. Numbers YAML 1.1 leaves as
    strings (``1e-4``) are restored by :meth:`TrainConfig.from_dict`.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, e.g. {flag} {example}, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file, as a dict."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"config file {p} cannot be parsed ({first}); fix its syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a mapping of option: value")
    # allow the options either at the top level or under a [train] table
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cli_options(names: Sequence[str] | None = None, default_words: str = "") -> dict[str, dict[str, Any]]:
    """argparse keyword arguments for :class:`TrainConfig`'s fields, by field name: all
    fields that have help text, or ``names`` in that order.

    The type comes from the annotation (a flag pair ``--x/--no-x`` for a bool) and the help
    from the field, followed by its default read from the dataclass, so the help cannot
    drift from the defaults that run. ``default_words`` is added after the default (e.g.
    where a preset may set its own). The argparse default stays ``None``: the commands tell
    an option given from one left out.
    """
    import argparse

    hints = typing.get_type_hints(TrainConfig)
    by_name = {f.name: f for f in fields(TrainConfig) if "help" in f.metadata}
    out: dict[str, dict[str, Any]] = {}
    for name in names if names is not None else list(by_name):
        f = by_name[name]
        _, base = _is_optional(hints[name])
        kw: dict[str, Any] = {k: v for k, v in f.metadata.items() if k != "help"}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base in (int, float):
            kw["type"] = base
        text = f.metadata["help"]
        if f.default is not None:
            text += f" (default: {default_text(f.default)}{default_words})"
        kw["help"] = text.replace("%", "%%")  # argparse formats help strings with %
        out[name] = kw
    return out


def default_text(value: Any) -> str:
    """A default as the command line writes it: on/off for flags, 5e-04 as 0.0005."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)
