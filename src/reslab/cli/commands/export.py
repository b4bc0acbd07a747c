"""Export a trained model for deployment: TorchScript (libtorch), a torch.export program
(.pt2) or ONNX (needs 'pip install reslab[onnx]'). The model is fused first (--no-fuse
exports it as trained). The file carries the model name, technique, input size, classes
and mean/std as reslab.json metadata, and is reloaded and compared with the model before
the command succeeds. TorchScript and .pt2 files run code when loaded: load them only
from authors you trust; the fused .safetensors from 'reslab fuse' is data only."""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.cli.commands.describe import parse_input_size
from reslab.cli.commands.fuse import check_out
from reslab.errors import UsageError
from reslab.paths import check_writable_file

# reslab.export's FORMATS and SUFFIXES, kept here so that parsing options does not import
# torch (tests/test_startup.py checks they agree)
FORMATS = ("torchscript", "exported", "onnx")
SUFFIXES = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}

NAME = "export"
HELP = "export a model as TorchScript, torch.export (.pt2) or ONNX"
ORDER = 41


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR", help="run folder, reslab .safetensors weights or a fused model")
    parser.add_argument("--format", "-f", required=True, choices=FORMATS, help="torchscript, exported (.pt2) or onnx")
    parser.add_argument("--out", "-o", required=True, help="file to write")
    parser.add_argument("--no-fuse", action="store_true", help="export the model as trained, without folding")
    parser.add_argument("--input-size", help="CxHxW input size (default: from the run's metadata)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from reslab.deploy.export import export
    from reslab.deploy.fuse import fuse
    from reslab.deploy.fused import FusedResNet
    from reslab.deploy.sources import export_metadata, load_source, weights_path

    out = Path(args.out)
    want = SUFFIXES[args.format]
    if args.format == "torchscript":
        if out.suffix not in (".pt", ".ts", ".torchscript", ".jit"):
            raise UsageError(f"--out {out}: name TorchScript files .pt or .ts")
    elif out.suffix != want:
        raise UsageError(f"--out {out}: name {args.format} files {want}")
    src = weights_path(args.source)
    check_out(out, src, args.overwrite)
    check_writable_file(out)
    model, meta = load_source(src)
    if not args.no_fuse and not isinstance(model, FusedResNet):
        model = fuse(model)
    size = parse_input_size(args.input_size) if args.input_size else None
    info = export_metadata(model, meta, size)
    export(model, info, args.format, out)
    kind = "fused" if isinstance(model, FusedResNet) else "unfused"
    print(f"exported {info['model']} ({info['technique']}, {kind}) as {args.format} -> {out}")
    print(
        f"  input {'x'.join(map(str, info['input_size']))}, {len(info['classes'] or [])} classes; reloaded and checked"
    )
    return 0
