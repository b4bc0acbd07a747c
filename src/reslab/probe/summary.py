"""What a probe says to a person: its tables (for the terminal or Markdown) and ``probe.md``,
the one writer of that file (``probe.json`` is :mod:`reslab.probe.records`')."""

from __future__ import annotations

from typing import Any

from reslab.probe.measure import ProbeEntry, fmt, ratio_threshold


def table(entries: list[ProbeEntry], techniques: list[str], depths: list[int], cell: Any, md: bool) -> list[str]:
    by = {(e.technique, e.depth): e for e in entries}
    head = ["technique", *[f"ResNet-{d}" for d in depths]]
    rows = [[t, *[cell(by[(t, d)]) for d in depths]] for t in techniques]
    if md:
        return [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


def ratio_cell(e: ProbeEntry) -> str:
    return f"{fmt(e.probe.grad_ratio)} {e.verdict.label}"


def render_markdown(entries: list[ProbeEntry], techniques: list[str], depths: list[int], meta: dict[str, Any]) -> str:
    blocks = {e.depth: e.probe.num_blocks for e in entries}
    thresholds = ", ".join(f"ResNet-{d}: L={blocks[d]}, {fmt(ratio_threshold(blocks[d]))}" for d in depths)
    lines = [
        f"# reslab probe: gradient flow and signal propagation {meta['source']}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['dataset']}, {meta['batches']} batch(es) of {meta['batch_size']} training images "
        f"(train-mode BatchNorm, cross-entropy), {meta['init']}, seed {meta['seed']}, width {meta['width']:g}, "
        f"{meta['dtype']} (norms overflow-safe, combined in float64), torch {meta['torch']}. "
        f"{meta['cells']} models in {meta['elapsed_s']:.0f} s "
        f"with {meta['workers']} worker(s).",
        "",
        "## Headline: max / min RMS of the gradient w.r.t. each block's output, and verdict",
        "",
        *table(entries, techniques, depths, ratio_cell, md=True),
        "",
        "Verdict: *exploding* when the ratio exceeds L² (L residual blocks) and gradients grow towards the input, "
        "*vanishing* when it exceeds L² and they shrink towards the input, *healthy* otherwise, *undefined* when "
        "every block-output gradient is exactly zero (nothing flows to judge; Fixup zero-initialises its "
        "classifier). Why L²: with an identity shortcut and normalized branches the residual stream's variance "
        "grows about linearly with depth at init (De & Smith 2020), so the backward gain across the network "
        "grows like a low power of L; a merge without an identity path multiplies the gradient by a constant "
        f"factor per block, which passes L² within a few dozen blocks. Thresholds: {thresholds}.",
        "",
        "Precision: the backward pass of an exploding net amplifies float32 rounding by its own gain, so "
        "exploding cells are good to an order of magnitude and a few percent (ratio) to ~10% (single norms); "
        "healthy cells agree with float64 to ~1e-4. `--dtype float64` gives reference digits (~5x slower).",
        "",
        "## Gradient norm of the first block's conv1 / the last block's conv1",
        "",
        "The ratio of the gradient norms of the first and the last residual block's first convolution, a "
        "second view of the same question (n/a where both are zero: the branch is zeroed at init, so its "
        "parameters get no gradient).",
        "",
        *table(entries, techniques, depths, lambda e: fmt(e.probe.conv1_ratio), md=True),
        "",
        "## Logit scale (std of the logits) and loss at init",
        "",
        *table(entries, techniques, depths, lambda e: f"{fmt(e.probe.logit_std)} / {e.probe.loss:.3f}", md=True),
        "",
        "## Figures",
        "",
        "![signal propagation](signal_propagation.png)",
        "",
        "Per block, input to output: average channel variance and squared channel mean of the block output "
        "(Brock, De & Smith 2021) and the RMS of the gradient w.r.t. it.",
        "",
        "![gradient ratio against depth](gradient_ratio.png)",
        "",
    ]
    return "\n".join(lines)
