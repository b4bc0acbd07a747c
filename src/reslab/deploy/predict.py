"""Predicting with a trained, fused or exported model: loading it as a :class:`Predictor`
and the top classes of a batch.

Trust model. A safetensors file or a run folder is loaded without executing anything.
TorchScript and ``.pt2`` files are programs: :func:`torch.jit.load` compiles and runs the
archive's TorchScript (including ``__setstate__`` methods while loading), and
:func:`torch.export.load` unpickles parts of the archive (weights_only=False for some
payloads) and resolves ``torch.*`` names and sympy expressions from the file. Loading
either is as safe as running a script from the same author. :func:`load_predictor` reads
their metadata from the zip archive directly (no code runs) but refuses to load the model
unless ``trust=True``. ONNX files are data (protobuf) and are read with onnxruntime when
it is installed.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reslab.deploy.sources import META_NAME, export_metadata, fused_source
from reslab.errors import UsageError
from reslab.nn.normalize import Normalize
from reslab.nn.weights import decode_metadata

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")


@dataclass
class Predictor:
    """A loaded model for inference: ``logits(batch)`` on normalized float input."""

    run: Callable[[Tensor], Tensor]
    metadata: dict[str, Any]
    source: str

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.run(x).float().cpu()


def read_archive_metadata(path: str | Path) -> dict[str, Any]:
    """``reslab.json`` of a TorchScript or .pt2 archive, read from the zip without loading it."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_NAME}") or n == f"extra/{META_NAME}"]
            if not names:
                raise UsageError(f"{path} has no reslab metadata ({META_NAME}); export it with 'reslab export'")
            raw = z.read(names[0])
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"{path} is not a readable TorchScript/.pt2 archive ({e}); export it again") from None
    return decode_metadata(raw, path, "export it again")


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_predictor(
    source: str | Path, *, trust: bool = False, device: str = "cpu", input_size: Sequence[int] | None = None
) -> Predictor:
    """Load a run folder, a weights/fused ``.safetensors``, or an exported file for prediction.

    Reslab weights are fused on load (``input_size`` supplies ``[C, H, W]`` for weights
    saved without it). TorchScript (``.pt``/``.ts``) and ``.pt2`` files run code when
    loaded and need ``trust=True`` (see the module docstring); ``.onnx`` needs onnxruntime.
    """
    p = Path(source)
    if p.is_dir() or p.suffix == ".safetensors":
        fused, meta = fused_source(p, device)
        return Predictor(fused.eval(), export_metadata(fused, meta, input_size), str(p))
    if not p.is_file():
        raise UsageError(f"{p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return _onnx_predictor(p)
    if suffix == ".pt2" or suffix in TORCHSCRIPT_SUFFIXES:
        meta = read_archive_metadata(p)
        if not trust:
            kind = ".pt2 (torch.export)" if suffix == ".pt2" else "TorchScript"
            raise UsageError(
                f"{p} is a {kind} file, and loading one runs code from it; pass --trust if you made it or trust "
                "its author, or predict from the fused .safetensors ('reslab fuse'), which is data only"
            )
        return load_exported(p, "exported" if suffix == ".pt2" else "torchscript", meta)
    raise UsageError(
        f"{p}: unknown model file type {suffix or '(none)'}; pass a run folder, .safetensors, .pt/.ts (TorchScript), "
        ".pt2 or .onnx"
    )


def load_exported(path: Path, fmt: str, meta: dict[str, Any]) -> Predictor:
    """Load an exported file of format ``fmt`` (TorchScript and .pt2 run code: trusted files only)."""
    if fmt == "onnx":
        return _onnx_predictor(path)
    try:
        if fmt == "exported":
            ep = torch.export.load(io.BytesIO(path.read_bytes()))
            return Predictor(ep.module(), meta, str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ts = torch.jit.load(str(path), map_location="cpu")
        return Predictor(ts.eval(), meta, str(path))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad archives
        raise UsageError(f"{path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _onnx_predictor(path: Path) -> Predictor:
    if not onnxruntime_available():
        raise UsageError(
            f"{path} is an ONNX file and onnxruntime is not installed; pip install onnxruntime, or predict from the "
            "fused .safetensors"
        )
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        raw = sess.get_modelmeta().custom_metadata_map.get("reslab")
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds
        raise UsageError(f"{path} cannot be loaded by onnxruntime ({str(e).splitlines()[0][:200]})") from None
    if raw is None:
        raise UsageError(f"{path} has no reslab metadata; export it with 'reslab export --format onnx'")
    meta = decode_metadata(raw, path, "export it again")
    name = sess.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(sess.run(None, {name: x.float().numpy()})[0])

    return Predictor(run, meta, str(path))


def normalize(x: Tensor, metadata: dict[str, Any]) -> Tensor:
    """``(x - mean) / std`` per channel of a [0, 1] batch, with the training data's
    statistics from a saved model's ``metadata`` (:class:`reslab.nn.normalize.Normalize`)."""
    return Normalize.from_metadata(metadata, x.shape[1]).from_unit(x)


def predict(predictor: Predictor, images: Tensor, top: int = 3, batch_size: int = 256) -> list[list[tuple[str, float]]]:
    """Top ``top`` (class name, probability) per image of a [0, 1] batch."""
    classes = predictor.metadata.get("classes")
    out: list[list[tuple[str, float]]] = []
    for i in range(0, images.shape[0], batch_size):
        probs = torch.softmax(predictor.logits(normalize(images[i : i + batch_size], predictor.metadata)), dim=1)
        k = min(top, probs.shape[1])
        p, idx = probs.topk(k, dim=1)
        for pr, ix in zip(p.tolist(), idx.tolist(), strict=True):
            out.append(
                [(classes[j] if classes and j < len(classes) else str(j), v) for j, v in zip(ix, pr, strict=True)]
            )
    return out
