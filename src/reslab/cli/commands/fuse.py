"""Fold a trained model's BatchNorms and technique merges into plain convolutions and save
it as safetensors (tensors plus a JSON layout: loading it runs no code). SOURCE is a run
folder, a reslab .safetensors weights file. The fused model's eval outputs equal the
original's; this is checked on random inputs before the file is written."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from reslab.errors import UsageError
from reslab.paths import check_writable_file

if TYPE_CHECKING:
    import torch

NAME = "fuse"
HELP = "fold BatchNorm and the technique's merge into plain convs (inference model)"
ORDER = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR_OR_WEIGHTS", help="run folder or reslab .safetensors weights")
    parser.add_argument("--out", "-o", required=True, help="fused model file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def check_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse to clobber the source or an existing file (unless --overwrite)."""
    if out.exists() and out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the source file itself; choose another path")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def run(args: argparse.Namespace) -> int:
    import torch

    from reslab.deploy.fuse import fuse
    from reslab.deploy.fused import FusedResNet, save_fused
    from reslab.deploy.sources import export_metadata, load_source, weights_path

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out} must end in .safetensors")
    src = weights_path(args.source)
    check_out(out, src, args.overwrite)
    check_writable_file(out)
    model, meta = load_source(src)
    if isinstance(model, FusedResNet):
        raise UsageError(f"{src} is already fused")
    fused = fuse(model)
    assert isinstance(fused, FusedResNet)
    info = export_metadata(fused, meta, meta.get("input_size") or _guess_size(model))
    x = torch.randn(8, *info["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = relative_error(model(x), fused(x))
    if not err <= 1e-4:
        raise UsageError(f"internal error: the fused model differs from the original (relative {err:.2e}); not written")
    extra = {k: meta[k] for k in ("input_size", "dataset", "classes", "mean", "std") if k in meta}
    save_fused(out, fused, extra)
    before = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    after = sum(t.numel() for t in fused.state_dict().values())
    spec = info["spec"]
    print(f"fused {spec.get('name')} ({spec.get('technique')}) -> {out}")
    print(f"  tensors: {before:,} values -> {after:,}; max relative output difference {err:.1e}")
    return 0


def _guess_size(model: torch.nn.Module) -> list[int]:
    # Weights not written by 'reslab train' carry no input size; any size checks the folding.
    return [int(model.conv1.in_channels), 32, 32]
