"""Classify images with a trained or exported model and print the top classes.

MODEL is a run folder, a reslab .safetensors (weights or fused), a TorchScript (.pt/.ts),
a .pt2 or an .onnx file. IMAGES are PNG/JPEG files (converted to the model's channels and
resized to its input size) or .npy arrays (one image or a batch; uint8 0..255 or floats in
[0, 1]). Inputs are normalized with the training data's mean/std from the file's metadata.
TorchScript and .pt2 files run code when loaded, so they need --trust; safetensors and run
folders never do. An image that cannot be read is reported on stderr (one line naming the
file and the problem) and skipped; the others are still classified, and the exit status
is then 2."""

from __future__ import annotations

import argparse
import json
import sys

from reslab.cli.commands.describe import parse_input_size
from reslab.errors import UsageError

NAME = "predict"
HELP = "classify images with a trained or exported model"
ORDER = 42


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="run folder, .safetensors, .pt/.ts, .pt2 or .onnx")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="PNG/JPEG files or .npy batches")
    parser.add_argument("--top", "-k", type=int, default=3, help="classes to print per image (default 3)")
    parser.add_argument("--trust", action="store_true", help="allow loading TorchScript/.pt2 files (they run code)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--input-size", help="CxHxW, for weights saved without it (default: from the metadata)")


def run(args: argparse.Namespace) -> int:
    import torch

    from reslab.deploy.inputs import read_image_file
    from reslab.deploy.predict import load_predictor, predict

    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    size = parse_input_size(args.input_size) if args.input_size else None
    predictor = load_predictor(args.model, trust=args.trust, input_size=size)
    size = predictor.metadata.get("input_size")
    if not size:
        raise UsageError(f"{args.model} has no input_size in its metadata; export it again with 'reslab export'")
    batches, names, skipped = [], [], 0
    for path in args.images:
        try:
            x, n = read_image_file(path, size)
        except UsageError as e:
            if len(args.images) == 1:
                raise  # the one input: its problem is the error, in one line
            print(f"reslab predict: skipped {path}: {e}", file=sys.stderr)
            skipped += 1
            continue
        batches.append(x)
        names += n
    if batches:
        results = predict(predictor, torch.cat(batches), top=args.top)
        for name, top in zip(names, results, strict=True):
            if args.json:
                print(json.dumps({"image": name, "top": [{"class": c, "p": round(p, 6)} for c, p in top]}))
            else:
                print(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
    if skipped:
        print(
            f"reslab predict: {skipped} of {len(args.images)} files skipped (see above); fix or remove them",
            file=sys.stderr,
        )
        return 2
    return 0
