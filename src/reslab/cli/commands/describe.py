"""Print a model's parameters and forward FLOPs with a technique, and the overhead of the
technique over baseline. FLOPs count convolutions and matrix products (a multiply-add
is 2 FLOPs), for one image of the given input size."""

from __future__ import annotations

import argparse
import json

from reslab.errors import UsageError

NAME = "describe"
HELP = "parameters and FLOPs of a model with a technique"
ORDER = 1


def parse_input_size(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise UsageError(f"--input-size must look like CxHxW, e.g. 1x28x28, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name, e.g. resnet20 (see 'reslab models')")
    parser.add_argument("--technique", "-t", default="baseline", help="technique name (default: baseline)")
    parser.add_argument("--input-size", default="1x28x28", help="CxHxW of one image (default: 1x28x28)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from reslab.nn.describe import describe

    size = parse_input_size(args.input_size)
    try:
        d = describe(args.model, args.technique, size, args.num_classes, width=args.width)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['model']} with technique {d['technique']!r}, input {args.input_size}")
    print(f"  parameters     {d['params']:>14,}  ({d['params_ratio']:.4f}x baseline's {d['baseline_params']:,})")
    print(f"  forward FLOPs  {d['flops']:>14,}  ({d['flops_ratio']:.4f}x baseline's {d['baseline_flops']:,})")
    return 0
