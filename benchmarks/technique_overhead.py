"""Train-step time of every technique relative to ``baseline``, measured interleaved.

    python benchmarks/technique_overhead.py                 # resnet20, batch 128, NHWC
    python benchmarks/technique_overhead.py --rounds 15 --steps 5 --threads 2
    python benchmarks/technique_overhead.py --device cuda --batch 256   # on a GPU (benchmarks/gpu.sh)
    python benchmarks/technique_overhead.py --device cuda --batch 256 --cuda-graphs   # steps replayed

Each round times ``--steps`` SGD steps (forward, backward, update) of every variant, in a
shuffled order, and divides each by the ``baseline`` time of the same round, so that
drifts of a shared machine hit both sides of a ratio alike. The table gives the median
ratio over rounds and its spread (interquartile range). ``article-eager:*`` rows are the
source article's merges transcribed literally (``out + scale * s``, ``out +
residual_norm(out - s)``, ``out + feature_fusion(cat[out, s])``), for comparison with
reslab's fused forms; ``unfolded:*`` rows are ``skipinit`` and ``layerscale`` with their gain
applied by the merge (``s + g * F(x)``) instead of inside the branch's last BatchNorm, as
reslab trains them (under bf16 autocast the unfolded merge also promotes the block's output
to float32, so on a GPU those rows differ in precision too). Steps run in the engine's
precision (bf16 autocast on a GPU, fp32 on the CPU) unless ``--precision`` says otherwise.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import Tensor

import reslab
from reslab.engine.devices import autocast_factory, pick_device, pick_precision, synchronize
from reslab.engine.graphed import WARMUP_STEPS
from reslab.engine.timing import training_step
from reslab.nn.describe import forward_flops
from reslab.nn.techniques import FeatureFusion, LayerScale, ResidualNormalization, ResidualScaling, SkipInit


class EagerScale(ResidualScaling):
    def merge(self, block, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + block.scale * shortcut


class EagerNorm(ResidualNormalization):
    def merge(self, block, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + block.residual_norm(branch - shortcut)


class EagerFusion(FeatureFusion):
    def merge(self, block, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + block.feature_fusion(torch.cat([branch, shortcut], dim=1))


class UnfoldedSkipInit(SkipInit):
    def branch_gain(self, block) -> None:  # the block then calls merge: s + alpha * F(x)
        return None


class UnfoldedLayerScale(LayerScale):
    def branch_gain(self, block) -> None:
        return None


EAGER = {
    "article-eager:scale": EagerScale(),
    "article-eager:norm": EagerNorm(),
    "article-eager:fusion": EagerFusion(),
    "unfolded:skipinit": UnfoldedSkipInit(),
    "unfolded:layerscale": UnfoldedLayerScale(),
}


def make_step(model: torch.nn.Module, x: Tensor, y: Tensor, autocast, graphs: bool):
    """The engine's timing-pass step (:func:`reslab.engine.timing.training_step`): SGD with
    Nesterov momentum, forward under ``autocast``; with ``graphs`` replayed as a CUDA graph,
    as ``cuda_graphs`` trains."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    return training_step(model, opt, x, y, autocast, graphs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", default="1x28x28")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-eager", action="store_true", help="skip the reference rows (article-eager, unfolded)")
    p.add_argument("--techniques", default="all")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA is synchronised around each timing)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="as the engine's: auto is bf16 autocast on a GPU, fp32 on the CPU",
    )
    p.add_argument(
        "--cuda-graphs", action="store_true", help="time the engine's step replayed as a CUDA graph (GPU only)"
    )
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time (the figure users feel); cpu: this process's CPU time, steadier on a "
        "shared machine (use with --threads 1, where OpenMP spin-waits cannot inflate it)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)  # as the engine: on a GPU, cuDNN times its algorithms
    if args.cuda_graphs and device.type != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    precision = pick_precision(args.precision, device)
    autocast = autocast_factory(precision, device)
    c, h, w = (int(v) for v in args.input_size.split("x"))
    techniques = reslab.list_techniques() if args.techniques == "all" else args.techniques.split(",")
    variants: dict[str, reslab.Technique | str] = {t: t for t in techniques}
    if not args.no_eager:
        variants.update(EAGER)
    torch.manual_seed(0)
    x = torch.randn(args.batch, c, h, w).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,)).to(device)
    steps = {}
    flops = {}
    for name, tech in variants.items():
        model = reslab.build_model(args.model, technique=tech, in_channels=c)
        flops[name] = forward_flops(model, (c, h, w))
        model = model.to(device, memory_format=torch.channels_last)
        steps[name] = make_step(model.train(), x, y, autocast, args.cuda_graphs)
        # warm-up: allocator, kernel choice, optimizer state (and a graph's eager steps and capture)
        for _ in range(WARMUP_STEPS + 2 if args.cuda_graphs else 2):
            steps[name]()
    ratios: dict[str, list[float]] = {n: [] for n in variants}
    base_times: list[float] = []
    order = list(variants)
    rng = random.Random(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for r in range(args.rounds):
        rng.shuffle(order)
        times = {}
        for name in order:
            synchronize(device)  # CUDA runs asynchronously: time the kernels, not their launches
            t0 = clock()
            for _ in range(args.steps):
                steps[name]()
            synchronize(device)
            times[name] = (clock() - t0) / args.steps
        base_times.append(times["baseline"])
        for name in variants:
            ratios[name].append(times[name] / times["baseline"])
        print(f"round {r + 1}/{args.rounds}: baseline {times['baseline'] * 1e3:.1f} ms/step", flush=True)

    print(
        f"\n{args.model}, batch {args.batch}, input {args.input_size}, channels_last, {precision}, "
        f"{'CUDA graphs' if args.cuda_graphs else 'eager'}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}, "
        f"{args.clock} clock, torch {torch.__version__}; "
        f"baseline median {statistics.median(base_times) * 1e3:.1f} ms/step"
    )
    print(f"{'variant':<22} {'time / baseline':>15} {'IQR':>15} {'FLOPs / baseline':>17}")
    for name in variants:
        q = statistics.quantiles(ratios[name], n=4)
        print(
            f"{name:<22} {statistics.median(ratios[name]):>14.3f}x {q[0]:>7.3f}-{q[2]:<7.3f}"
            f" {flops[name] / flops['baseline']:>16.3f}x"
        )


if __name__ == "__main__":
    main()
