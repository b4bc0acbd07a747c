"""Packed training against one run at a time: how many more images a second K runs train
when they are one packed model (``reslab.engine.packed.PackedModel``) than when their
training steps run one after another, by each of the pack's two routes.

Per configuration ``MODEL:K:BATCH[:TECHNIQUE]`` (K runs of one technique, baseline unless
named, BATCH images each per step), each round times
``--steps`` training steps (forward, backward, SGD with Nesterov momentum and weight decay)
of every variant, in a freshly shuffled order, on random Fashion-MNIST-sized data already
on the device:

* ``sep``: K models, each with its own optimizer, stepped one after another (what a grid
  of runs in one process does), in channels_last on a GPU as the engine trains a run alone;
* ``vmap``: the same K models stacked into one PackedModel mapped with ``torch.func.vmap``;
* ``grouped``: the same K models as one PackedModel of grouped layers (channels_last on a
  GPU), the route ``train_pack`` takes for every built-in technique.

Each round gives ratios of throughputs (``vmap / sep`` and ``grouped / sep``, images per
second of all K runs), so slow drifts of the machine cancel; the median ratios over rounds
are printed with the median throughputs. CUDA is synchronised around each timing and uses
bf16 autocast (as the engine does there); the CPU runs fp32 in NCHW.

    python benchmarks/pack_speed.py                                  # CPU, small configurations
    python benchmarks/pack_speed.py --device cuda --width 1 --configs resnet56:16:512,resnet20:32:128
    python benchmarks/pack_speed.py --configs resnet20:8:128,resnet20:8:128:scale   # a technique's cost in a pack
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F

from reslab.engine.devices import pick_device, synchronize
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel
from reslab.nn.models import build_model


def make(model: str, technique: str, k: int, width: float, device: torch.device) -> tuple[list, list]:
    models, opts = [], []
    for i in range(k):
        torch.manual_seed(i)
        m = build_model(model, technique=technique, num_classes=10, in_channels=1, width=width).to(device)
        models.append(m)
        opts.append(torch.optim.SGD(param_groups(m, 5e-4), lr=0.05, momentum=0.9, nesterov=True))
    return models, opts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--configs",
        default="resnet8:4:64,resnet20:4:64,resnet20:8:32",
        help="comma-separated MODEL:K:BATCH[:TECHNIQUE] (K runs of BATCH images each per step; baseline unless named)",
    )
    p.add_argument("--width", type=float, default=0.25, help="width multiplier of every model")
    p.add_argument("--steps", type=int, default=3, help="training steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (unset: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)  # as the engine: on a GPU, cuDNN times its algorithms
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; width {args.width:g}; {'bf16' if cuda else 'fp32'}")
    print(
        "| model | technique | batch per run | K | sep img/s | vmap img/s | grouped img/s"
        " | vmap / sep | grouped / sep |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.configs.split(","):
        model, k_s, b_s, *named = spec.split(":")
        technique = named[0] if named else "baseline"
        try:
            measure(model, technique, int(k_s), int(b_s), args, device)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. out of memory: say so, go on
            what = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            print(f"| {model} | {technique} | {b_s} | {k_s} | {what} | | | | |", flush=True)
        if cuda:
            torch.cuda.empty_cache()


def measure(model: str, technique: str, k: int, b: int, args: argparse.Namespace, device: torch.device) -> None:
    """One table row: the median throughputs of the variants and of their ratios to ``sep``."""
    cuda = device.type == "cuda"
    models, opts = make(model, technique, k, args.width, device)
    # the packs stack the members as built (NCHW), as train_pack does: vmap cannot map
    # channels_last weights (torch: "NYI: querying is_contiguous inside of vmap"), and the
    # grouped route lays out its own stacks
    packs = {
        route: PackedModel(
            copy.deepcopy(models),
            [torch.optim.SGD(param_groups(m, 5e-4), lr=0.05) for m in models],
            5e-4,
            0.9,
            True,
            0.05,
            route=route,
            channels_last=cuda,
        )
        for route in ("vmap", "grouped")
    }
    if cuda:  # a run alone trains in channels_last on a GPU
        models = [m.to(memory_format=torch.channels_last) for m in models]
    x = torch.randn(k, b, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (k, b), device=device)
    xs = [xi.contiguous(memory_format=torch.channels_last) if cuda else xi for xi in x]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def sep() -> None:
        for i, (m, o) in enumerate(zip(models, opts, strict=True)):
            with autocast():
                loss = F.cross_entropy(m(xs[i]).float(), y[i], label_smoothing=0.1)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    def packed(pack: PackedModel) -> None:
        with autocast():
            losses, _ = pack.train_losses(x, y, 0.1)
        pack.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        pack.step()

    # grouped first: where memory runs short, the route the targets are about is measured
    variants = {"sep": sep, **{r: (lambda p=p: packed(p)) for r, p in sorted(packs.items(), reverse=True)}}
    failed: dict[str, str] = {}
    for v, fn in list(variants.items()):  # warm-up: allocations, kernel choice
        try:
            fn()
        except RuntimeError as e:  # this variant does not fit or fails: the others are still measured
            oom = isinstance(e, torch.OutOfMemoryError)
            failed[v] = "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
            del variants[v]
            if cuda:
                torch.cuda.empty_cache()
    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in packs if v in variants and "sep" in variants}
    for _ in range(args.rounds):
        order = list(variants)
        random.shuffle(order)
        got = {}
        for v in order:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[v]()
            synchronize(device)
            got[v] = k * b * args.steps / (time.perf_counter() - t0)
            rates[v].append(got[v])
        for v in ratios:
            ratios[v].append(got[v] / got["sep"])

    def rate(v: str) -> str:
        return failed.get(v) or f"{statistics.median(rates[v]):,.0f}"

    def ratio(v: str) -> str:
        return f"{statistics.median(ratios[v]):.2f}x" if v in ratios else ""

    print(
        f"| {model} | {technique} | {b} | {k} | {rate('sep')} | {rate('vmap')} | {rate('grouped')} | "
        f"{ratio('vmap')} | {ratio('grouped')} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
