"""Training speed of reslab's engine against the loop a user would write by hand.

Reference: torchvision ``FashionMNIST`` + ``transforms`` (RandomCrop with the same padding,
RandomHorizontalFlip, ToTensor, Normalize) + ``DataLoader`` (shuffle, ``--workers``
workers) + the same reslab model in NCHW fp32 eager, the same SGD/Nesterov optimizer,
one-cycle schedule and label smoothing, on the same training images (on a GPU, both with
cuDNN timing its convolution algorithms, as reslab's engine does).

reslab: ``reslab.engine.train.train`` with the same hyper-parameters (data resident as uint8,
batched on-tensor augmentation, channels_last).

The two are run alternately (reference, reslab, reference, reslab, ...) in one process
so that load from other work on the machine hits both alike; each pair gives a ratio of
training throughput (images/s over the training loop, evaluation excluded), and the
median ratio is reported with both test accuracies.

    python benchmarks/train_speed.py                      # quick: 10k images, 1 epoch, 3 rounds
    python benchmarks/train_speed.py --train-subset 0 --epochs 10 --rounds 1   # full runs
    python benchmarks/train_speed.py --device cuda --train-subset 0 --workers 8   # on a GPU (benchmarks/gpu.sh)
    python benchmarks/train_speed.py --device cuda --train-subset 0 --workers 8 --cuda-graphs   # reslab's step replayed
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from reslab.engine.data import load_arrays, search_dirs
from reslab.engine.devices import pick_device
from reslab.engine.optim import lr_at, param_groups
from reslab.engine.sources import SPLIT_SEED, derive_seed
from reslab.engine.train import TrainConfig, train
from reslab.nn.models import build_model


def torchvision_root(tmp: Path) -> Path:
    """A torchvision FashionMNIST root made from the files reslab finds (decompressed)."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    src = next(d for d in search_dirs("fashion-mnist") if (d / "train-images-idx3-ubyte.gz").is_file())
    for f in src.glob("*-ubyte.gz"):
        with gzip.open(f) as g:
            (raw / f.name[:-3]).write_bytes(g.read())
    return tmp


def reference_run(cfg: TrainConfig, root: Path, workers: int) -> tuple[float, float, int]:
    """The hand-written loop. Returns (training images/s, test accuracy, images seen)."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cpu")
    cuda = device.type == "cuda"
    ds = load_arrays("fashion-mnist")
    mean, std = ds.mean, ds.std
    pad = cfg.crop_padding if cfg.crop_padding is not None else ds.crop_padding
    train_tf = transforms.Compose(
        [
            transforms.RandomCrop(28, padding=pad),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    full = torchvision.datasets.FashionMNIST(str(root), train=True, transform=train_tf, download=False)
    split = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED))
    idx = split[cfg.val_size :]
    if cfg.train_subset:
        idx = idx[: cfg.train_subset]
    loader = DataLoader(
        Subset(full, idx.tolist()),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=cuda,
    )
    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    model = build_model(cfg.model, technique=cfg.technique, in_channels=1, num_classes=10).to(device)
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total = len(loader) * cfg.epochs
    step, seen, train_s = 0, 0, 0.0
    model.train()
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(y)
        if cuda:
            torch.cuda.synchronize()  # the kernels run asynchronously: time them, not their launches
        train_s += time.perf_counter() - t0
    model.eval()
    test = torchvision.datasets.FashionMNIST(str(root), train=False, transform=test_tf, download=False)
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000, num_workers=0):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return seen / train_s, correct / len(test), seen


def reslab_run(cfg: TrainConfig, out: Path) -> tuple[float, float, int]:
    import json

    s = train(cfg, out, overwrite=True, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # images_per_s is over the training loop only, like the reference's
    seen = (cfg.train_subset or 55000) // cfg.batch_size * cfg.batch_size
    train_s = sum(seen / r["images_per_s"] for r in rows)
    return seen * len(rows) / train_s, float(s["test_acc"]), seen * len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=10000, help="training images (0 = all 55,000)")
    p.add_argument("--rounds", type=int, default=3, help="reference/reslab pairs, alternated")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: PyTorch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for both")
    p.add_argument("--cuda-graphs", action="store_true", help="reslab replays its training step as a CUDA graph")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # On a GPU reslab's engine lets cuDNN time its algorithms (pick_device); the reference gets
    # the same from the first round, not only after reslab's first run has switched it on.
    pick_device(args.device)
    cfg = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        train_subset=args.train_subset or None,
        val_size=5000,
        threads=args.threads,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
    )
    print(
        f"{args.model} on fashion-mnist, {args.train_subset or 55000} images x {args.epochs} epoch(s), "
        f"batch {cfg.batch_size}, {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
        + f", {torch.get_num_threads()} threads, reference with {args.workers} workers"
        + (", reslab with CUDA graphs" if args.cuda_graphs else ""),
        flush=True,
    )
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(tmp) / "tv")
        print(
            f"{'round':>5} {'reference img/s':>16} {'reslab img/s':>13} {'ratio':>6} {'ref acc':>8} {'reslab acc':>10}"
        )
        for r in range(args.rounds):
            ref_ips, ref_acc, _ = reference_run(cfg, root, args.workers)
            res_ips, res_acc, _ = reslab_run(cfg, Path(tmp) / "run")
            ratios.append(res_ips / ref_ips)
            print(
                f"{r + 1:>5} {ref_ips:>16.1f} {res_ips:>13.1f} {ratios[-1]:>6.2f} {ref_acc:>8.4f} {res_acc:>10.4f}",
                flush=True,
            )
    target = "1.5x on a GPU" if args.device.startswith("cuda") else "1.4x"
    print(f"median speed-up of reslab over the reference: {statistics.median(ratios):.2f}x (target >= {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
