"""Export a trained model for other runtimes, each format carrying the reslab metadata
(model, technique, input size, classes, mean/std) as ``reslab.json``:

* ``torchscript``: :func:`torch.jit.trace` of the (fused) model, for libtorch/C++;
  metadata in the archive's ``extra/reslab.json``.
* ``exported``: :func:`torch.export.export` with a dynamic batch dimension, saved as
  ``.pt2`` (for ``torch.export.load``, AOTInductor); metadata in ``extra/reslab.json``.
* ``onnx``: :func:`torch.onnx.export` (needs the optional extra ``reslab[onnx]``);
  metadata as the model's ``reslab`` metadata property.

What is exported is read by :mod:`reslab.deploy.sources`; what an exported file predicts,
by :mod:`reslab.deploy.predict`.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.deploy.predict import (
    load_exported,
    onnxruntime_available,
)
from reslab.deploy.sources import META_NAME
from reslab.deploy.sources import load_source as load_source  # reslab 0.2's path: reslab.export.load_source
from reslab.errors import UsageError
from reslab.files import atomic_write
from reslab.nn.weights import encode_metadata

FORMATS = ("torchscript", "exported", "onnx")
SUFFIXES = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}


# ---------------------------------------------------------------------------------------
# Export.


def export(
    model: nn.Module,
    metadata: dict[str, Any],
    fmt: str,
    out: str | Path,
    *,
    check: bool = True,
) -> Path:
    """Write ``model`` (eval mode) in format ``fmt`` to ``out`` atomically, with ``metadata``.

    ``check`` reloads the written file and compares its output with ``model``'s on a
    batch of random inputs (a wrong trace or export fails here, not in deployment).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if model.training:
        raise UsageError("export needs a model in eval mode; call model.eval() first")
    out = Path(out)
    if next(model.parameters()).device.type != "cpu":
        # Exported files are loaded on the CPU by default; export (and check) from there.
        model = copy.deepcopy(model).cpu()
    c, h, w = metadata["input_size"]
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    # Batch 2: a batch of 1 would let tracing and export specialize the batch dimension.
    example = torch.randn(2, c, h, w, generator=gen).to(device)
    text = encode_metadata(metadata)
    with torch.no_grad():
        if fmt == "torchscript":
            # TorchScript is deprecated in favour of torch.export but still what libtorch loads.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, example, check_trace=False)

            def write(p: Path) -> None:
                # into memory first: libtorch's file writer aborts the process when a write fails
                # (a full disk, a size limit) where Python's raises an error that can be reported
                buf = io.BytesIO()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.jit.save(traced, buf, _extra_files={META_NAME: text})
                p.write_bytes(buf.getvalue())

        elif fmt == "exported":
            ep = _torch_export(model, example)

            def write(p: Path) -> None:
                # torch.export.save wants a .pt2 name for files; a buffer has none.
                p.write_bytes(_pt2_bytes(ep, text))

        else:
            write = _onnx_writer(model, example, text)

    def write_checked(p: Path) -> None:
        write(p)
        if check:
            # Checked before the rename: a failed export never replaces an existing file.
            _check_file(model, fmt, p, c, h, w)

    atomic_write(out, write_checked)
    return out


def _torch_export(model: nn.Module, example: Tensor) -> Any:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        raise UsageError(f"torch.export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _pt2_bytes(ep: Any, text: str) -> bytes:
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={META_NAME: text})
    return buf.getvalue()


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _onnx_writer(model: nn.Module, example: Tensor, text: str) -> Callable[[Path], None]:
    if not onnx_available():
        raise UsageError(
            "ONNX export needs the optional packages onnx and onnxscript, which are not installed; "
            "install them with: pip install 'reslab[onnx]'"
        )
    import onnx
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            dynamo=True,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - the ONNX exporter raises many kinds
        raise UsageError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    assert program is not None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"reslab": text})
    return lambda p: onnx.save(proto, str(p))


def _check_file(model: nn.Module, fmt: str, path: Path, c: int, h: int, w: int) -> None:
    x = torch.randn(3, c, h, w, generator=torch.Generator().manual_seed(1))
    device = next(model.parameters()).device
    with torch.no_grad():
        want = model(x.to(device)).float().cpu()
    if fmt == "onnx" and not onnxruntime_available():
        return  # nothing here can run it; the exporter itself succeeded
    run = load_exported(path, fmt, {}).run
    with torch.no_grad():
        got = run(x).float().cpu()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-4:
        raise UsageError(
            f"the exported {fmt} file does not reproduce the model (relative error {err:.2e}); not written"
        )


__all__ = ["FORMATS", "SUFFIXES", "export", "onnx_available"]
