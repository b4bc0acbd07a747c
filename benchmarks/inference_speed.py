"""Eval throughput and latency of every technique, unfused and fused, relative to fused ``baseline``.

    python benchmarks/inference_speed.py                        # resnet20, 1x28x28, 1 thread
    python benchmarks/inference_speed.py --rounds 9 --threads 2 --channels-last
    python benchmarks/inference_speed.py --device cuda --batch 1024 --channels-last   # benchmarks/gpu.sh

Every variant (technique x {unfused, fused}) is built once with its BN statistics and
technique parameters moved away from init the way training moves them (positive residual
scales, positive BN gains), then each round times all variants in a shuffled order:
``--iters`` forward passes at batch ``--batch`` (throughput, images/s) and
``--latency-iters`` passes at batch 1 (latency). Each time is divided by the fused
``baseline`` time of the same round, so that drifts of a shared machine hit both sides of
a ratio alike; the table gives the median ratio over rounds and its interquartile range.
Outputs of each fused model are checked against its unfused model before timing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import reslab
from reslab.engine.devices import pick_device, synchronize


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and technique parameters as after training (not at their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("scale", "alpha") and p.numel() == 1:
                p.uniform_(0.5, 1.5, generator=g)
            elif leaf == "gamma" or (leaf in ("bias", "input_bias") and p.numel() == 1):
                p.normal_(0.0, 0.3, generator=g)
            elif p.dim() >= 2 and not bool(p.any()):
                p.normal_(0.0, 0.05, generator=g)
    return model.eval()


def timer(clock: str) -> Callable[[], float]:
    return time.process_time if clock == "cpu" else time.perf_counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input-size", default="1x28x28")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=2, help="forward passes at --batch per variant per round")
    p.add_argument("--latency-iters", type=int, default=40, help="batch-1 passes per variant per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true", help="NHWC models and inputs")
    p.add_argument("--techniques", default="all")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA is synchronised around each timing)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall or process CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)  # as the engine: on a GPU, cuDNN times its algorithms
    c, h, w = (int(v) for v in args.input_size.split("x"))
    techniques = reslab.list_techniques() if args.techniques == "all" else args.techniques.split(",")
    if "baseline" not in techniques:
        techniques = ["baseline", *techniques]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    xb = torch.randn(args.batch, c, h, w, generator=gen).to(device).contiguous(memory_format=fmt)
    x1 = torch.randn(1, c, h, w, generator=gen).to(device).contiguous(memory_format=fmt)

    variants: dict[str, nn.Module] = {}
    for t in techniques:
        model = trained_like(reslab.build_model(args.model, technique=t, num_classes=10, in_channels=c))
        fused = reslab.fuse(model)
        model, fused = model.to(device), fused.to(device)
        # checked in full fp32: cuDNN's default TF32 convolutions alone move logits by ~5e-4
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        with torch.inference_mode():
            ref, out = model(xb[:16]), fused(xb[:16])
        torch.backends.cudnn.allow_tf32 = tf32
        err = float((ref - out).abs().max() / ref.abs().max())
        assert err < 1e-4, f"{t}: fused output differs by {err:.1e}"
        variants[f"{t}"] = model.to(memory_format=fmt)
        variants[f"{t}+fused"] = fused.to(memory_format=fmt)

    clock = timer(args.clock)

    def run(model: nn.Module, x: Tensor, n: int) -> float:
        synchronize(device)  # CUDA runs asynchronously: time the kernels, not their launches
        t0 = clock()
        for _ in range(n):
            model(x)
        synchronize(device)
        return (clock() - t0) / n

    names = list(variants)
    thr: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    secs: dict[str, list[float]] = {n: [] for n in names}
    lat_ms: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    with torch.inference_mode():
        for m in variants.values():  # warm-up: allocator, kernel selection
            run(m, xb, 1)
            run(m, x1, 3)
        for r in range(args.rounds):
            order = names[:]
            rng.shuffle(order)
            t_b = {n: run(variants[n], xb, args.iters) for n in order}
            rng.shuffle(order)
            t_1 = {n: run(variants[n], x1, args.latency_iters) for n in order}
            for n in names:
                thr[n].append(t_b[n] / t_b["baseline+fused"])
                lat[n].append(t_1[n] / t_1["baseline+fused"])
                secs[n].append(t_b[n])
                lat_ms[n].append(t_1[n] * 1e3)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    def q(v: list[float]) -> tuple[float, float, float]:
        qs = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        return qs[0], statistics.median(v), qs[2]

    print(
        f"\n{args.model}, input {args.input_size}, batch {args.batch}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} thread(s)'}, "
        f"{'NHWC' if args.channels_last else 'NCHW'}, {args.clock} clock, {args.rounds} rounds; "
        "time ratios to fused baseline (median [IQR]), lower is faster"
    )
    print(f"{'variant':<20} {'images/s':>9} {f'batch {args.batch}':>22} {'batch-1 ms':>11} {'batch 1':>22}")
    for n in names:
        lo, med, hi = q(thr[n])
        llo, lmed, lhi = q(lat[n])
        ips = args.batch / statistics.median(secs[n])
        ms = statistics.median(lat_ms[n])
        print(f"{n:<20} {ips:>9.0f} {med:>8.3f} [{lo:.3f}-{hi:.3f}] {ms:>11.2f} {lmed:>8.3f} [{llo:.3f}-{lhi:.3f}]")


if __name__ == "__main__":
    main()
