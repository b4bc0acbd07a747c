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
  GPU), the route ``train_pack`` takes for every built-in technique;
* ``graphed`` (``--graphs``): the grouped pack with its whole step (forward, backward, SGD with
  the members' learning rates in a device vector) captured as one CUDA graph and replayed
  (``reslab.engine.packed.graphed``, what ``train_pack`` does with ``cuda_graphs``). Its own
  start-up is timed: building its K models and the pack, the eager warm-up steps, the capture
  and the first replay. Its achieved TFLOP/s count the training FLOPs of one image (forward
  and backward, matrix products and convolutions, by ``FlopCounterMode``) times its images per
  second, and are set against the card's dense bf16 peak where the card is known (H100, H200).
  On the CPU the graph's arithmetic runs eagerly (no capture).

With ``--train-pack-startup``, a real ``train_pack`` with ``cuda_graphs`` (one short epoch of
Fashion-MNIST per configuration) gives the engine's own start-up: build (the data, the pack's
route check and measurement, the members), warm-up, capture, first step, as its members'
summaries record it. ``--rounds 0`` skips the speed table.

Each round gives ratios of throughputs (``vmap / sep`` and ``grouped / sep``, images per
second of all K runs), so slow drifts of the machine cancel; the median ratios over rounds
are printed with the median throughputs. CUDA is synchronised around each timing and uses
bf16 autocast (as the engine does there); the CPU runs fp32 in NCHW.

    python benchmarks/pack_speed.py                                  # CPU, small configurations
    python benchmarks/pack_speed.py --device cuda --width 1 --configs resnet56:16:512,resnet20:32:128
    python benchmarks/pack_speed.py --configs resnet20:8:128,resnet20:8:128:scale   # a technique's cost in a pack
    python benchmarks/pack_speed.py --device cuda --width 1 --configs resnet56:16:512,resnet20:32:128 --graphs \
        --train-pack-startup                                      # packed and graphed, and start-up
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reslab.engine.devices import pick_device, synchronize
from reslab.engine.graphed import WARMUP_STEPS
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel
from reslab.engine.packed.graphed import GraphedPackStep
from reslab.nn.models import build_model

#: dense bf16 tensor-core peak of a card in TFLOP/s, by the first pattern its name contains
#: (NVIDIA's datasheets give twice these, with 2:4 sparsity); an H100 named neither PCIe nor
#: NVL is the SXM5 card ("NVIDIA H100 80GB HBM3")
BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),
)


def bf16_peak(card: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s, None where the card is not in the table."""
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if pattern in card), None)


def train_flops_per_image(model: str, technique: str, width: float) -> float:
    """FLOPs of one image's training step of one run: forward and backward, matrix products and
    convolutions (element-wise work is not counted), by FlopCounterMode on the CPU."""
    torch.manual_seed(0)
    m = build_model(model, technique=technique, num_classes=10, in_channels=1, width=width)
    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(m(x), y).backward()
    return counter.get_total_flops() / 2


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
    p.add_argument(
        "--graphs",
        action="store_true",
        help="also the grouped pack with its step captured as a CUDA graph: speed, start-up, TFLOP/s, peak fraction",
    )
    p.add_argument(
        "--train-pack-startup",
        action="store_true",
        help="also time train_pack's start-up with cuda_graphs (one short epoch of --dataset per configuration)",
    )
    p.add_argument("--dataset", default="fashion-mnist", help="the dataset of --train-pack-startup")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)  # as the engine: on a GPU, cuDNN times its algorithms
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; width {args.width:g}; {'bf16' if cuda else 'fp32'}")
    specs = []
    for spec in args.configs.split(","):
        model, k_s, b_s, *named = spec.split(":")
        specs.append((model, named[0] if named else "baseline", int(k_s), int(b_s)))
    if args.rounds > 0:
        header = (
            "| model | technique | batch per run | K | sep img/s | vmap img/s | grouped img/s | vmap / sep"
            " | grouped / sep |"
        )
        if args.graphs:
            peak = bf16_peak(name) if cuda else None
            print(f"graphed: bf16 peak of this card {f'{peak:g} TFLOP/s (dense)' if peak else 'unknown'}")
            header += (
                " graphed img/s | graphed / sep | graphed / grouped | graphed start-up s (build + warm-up + capture"
                " + first step) | graphed TFLOP/s | of bf16 peak |"
            )
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for model, technique, k, b in specs:
            try:
                measure(model, technique, k, b, args, device, name)
            except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. out of memory: say so, go on
                what = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                print(f"| {model} | {technique} | {b} | {k} | {what} |" + " |" * (header.count("|") - 6), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    if args.train_pack_startup:
        print()
        print(f"train_pack start-up with cuda_graphs, {args.dataset}, one epoch of {WARMUP_STEPS + 2} steps:")
        print("| model | technique | batch per run | K | start-up s | build | warm-up | capture | first step |")
        print("|---|---|---|---|---|---|---|---|---|")
        for model, technique, k, b in specs:
            try:
                t = train_pack_startup(model, technique, k, b, args, device)
                print(
                    f"| {model} | {technique} | {b} | {k} | **{t['total']:.1f}** | {t['build']:.1f} | "
                    f"{t['warmup']:.1f} | {t['capture']:.2f} | {t['first_step']:.2f} |",
                    flush=True,
                )
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"| {model} | {technique} | {b} | {k} | {type(e).__name__}: {str(e).splitlines()[0][:80]} |")
            if cuda:
                torch.cuda.empty_cache()


def train_pack_startup(
    model: str, technique: str, k: int, b: int, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """train_pack's start-up with cuda_graphs (seconds of build, warm-up, capture, first step
    and their total), from its members' summaries: K runs of one short epoch (the warm-up, the
    capture and two replays) in a temporary folder."""
    from reslab.engine.config import TrainConfig
    from reslab.engine.packed import train_pack

    settings = dict(
        model=model,
        technique=technique,
        width=args.width,
        dataset=args.dataset,
        epochs=1,
        batch_size=b,
        train_subset=(WARMUP_STEPS + 2) * b,
        val_size=b,
        test_subset=b,
        eval_batch_size=max(b, 256),
        device=str(device),
        cuda_graphs=True,
        threads=args.threads,
    )
    with tempfile.TemporaryDirectory() as tmp:
        configs = [TrainConfig(seed=s, **settings) for s in range(k)]
        summaries = train_pack(
            configs, [Path(tmp) / f"s{s}" for s in range(k)], progress=False, graph_capture=device.type == "cuda"
        )
    return summaries[0]["pack_startup_s"]


def measure(
    model: str, technique: str, k: int, b: int, args: argparse.Namespace, device: torch.device, card: str
) -> None:
    """One table row: the median throughputs of the variants and of their ratios to ``sep``
    (with ``--graphs``, the graphed pack's too, its start-up, TFLOP/s and fraction of peak)."""
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

    variants: dict = {"sep": sep}
    startup: dict[str, float] = {}
    if args.graphs:
        # built afresh, so that its start-up counts its own build; first, so that memory running
        # short leaves out the variants the targets are not about
        synchronize(device)
        t0 = time.perf_counter()
        gmodels, gopts = make(model, technique, k, args.width, device)
        gpack = PackedModel(gmodels, gopts, 5e-4, 0.9, True, 0.05, route="grouped", channels_last=cuda)
        synchronize(device)
        startup["build"] = time.perf_counter() - t0
        gautocast = (
            (lambda cache=True: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache))
            if cuda
            else (lambda cache=True: contextlib.nullcontext())
        )
        gstep = GraphedPackStep(gpack, gautocast, 0.1, capture=cuda)
        variants["graphed"] = lambda: gstep(x, y, [0.05] * k)
    # grouped first: where memory runs short, the route the targets are about is measured
    variants.update({r: (lambda p=p: packed(p)) for r, p in sorted(packs.items(), reverse=True)})
    failed: dict[str, str] = {}
    for v, fn in list(variants.items()):  # warm-up: allocations, kernel choice
        try:
            for _ in range(WARMUP_STEPS + 2 if v == "graphed" else 1):  # the graph: warm-up, capture, replays
                fn()
        except RuntimeError as e:  # this variant does not fit or fails: the others are still measured
            oom = isinstance(e, torch.OutOfMemoryError)
            failed[v] = "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
            del variants[v]
            if cuda:
                torch.cuda.empty_cache()
    rates: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in (*packs, "graphed") if v in variants and "sep" in variants}
    over_grouped: list[float] = []
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
        if "graphed" in got and "grouped" in got:
            over_grouped.append(got["graphed"] / got["grouped"])

    def rate(v: str) -> str:
        return failed.get(v) or f"{statistics.median(rates[v]):,.0f}"

    def ratio(v: str) -> str:
        return f"{statistics.median(ratios[v]):.2f}x" if v in ratios else ""

    row = (
        f"| {model} | {technique} | {b} | {k} | {rate('sep')} | {rate('vmap')} | {rate('grouped')} | "
        f"{ratio('vmap')} | {ratio('grouped')} |"
    )
    if args.graphs:
        if "graphed" in rates:
            t = {**startup, **gstep.startup}
            parts = (t["build"], t["warmup_s"], t["capture_s"], t["first_step_s"])
            started = f"{parts[0]:.1f} + {parts[1]:.1f} + {parts[2]:.2f} + {parts[3]:.2f} = {sum(parts):.1f}"
            tflops = train_flops_per_image(model, technique, args.width) * statistics.median(rates["graphed"]) / 1e12
            peak = bf16_peak(card) if cuda else None
            of_peak = f"{tflops / peak:.1%}" if peak else "unknown"
            over = f"{statistics.median(over_grouped):.2f}x" if over_grouped else ""
            row += f" {rate('graphed')} | {ratio('graphed')} | {over} | {started} | {tflops:.3g} | {of_peak} |"
        else:
            row += f" {rate('graphed')} | | | | | |"
    print(row, flush=True)


if __name__ == "__main__":
    main()
