"""Export a trained model for deployment, and load it back to predict.

Sources (what ``reslab fuse``/``export``/``predict`` read) are data only, never code:

* a run folder (``RUN/model.safetensors`` written by ``reslab train``),
* a reslab weights file (``.safetensors`` with the model spec in its metadata),
* a fused model (``.safetensors`` written by ``reslab fuse``: tensors plus a JSON layout).

Export formats (what other runtimes read), each carrying the reslab metadata (model,
technique, input size, classes, mean/std) as ``reslab.json``:

* ``torchscript``: :func:`torch.jit.trace` of the (fused) model, for libtorch/C++;
  metadata in the archive's ``extra/reslab.json``.
* ``exported``: :func:`torch.export.export` with a dynamic batch dimension, saved as
  ``.pt2`` (for ``torch.export.load``, AOTInductor); metadata in ``extra/reslab.json``.
* ``onnx``: :func:`torch.onnx.export` (needs the optional extra ``reslab[onnx]``);
  metadata as the model's ``reslab`` metadata property.

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

import copy
import io
import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reslab.deploy.fuse import fuse
from reslab.deploy.fused import FusedResNet, is_fused_file, load_fused
from reslab.errors import UsageError
from reslab.files import atomic_write
from reslab.nn.normalize import Normalize
from reslab.nn.weights import load_model, read_metadata
from reslab.version import __version__

FORMATS = ("torchscript", "exported", "onnx")
SUFFIXES = {"torchscript": ".pt", "exported": ".pt2", "onnx": ".onnx"}
META_NAME = "reslab.json"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")


# ---------------------------------------------------------------------------------------
# Sources.


def weights_path(source: str | Path) -> Path:
    """``source`` itself, or ``source/model.safetensors`` for a run folder."""
    p = Path(source)
    if p.is_dir():
        w = p / "model.safetensors"
        if not w.is_file():
            raise UsageError(
                f"run folder {p} has no model.safetensors (the run did not complete); finish it with "
                f"'reslab train --resume --out {p}' or pass a weights file"
            )
        return w
    if not p.exists():
        raise UsageError(f"{p} does not exist; pass a run folder or a .safetensors weights file")
    return p


def load_source(source: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a run folder, reslab weights file or fused file: ``(eval model, metadata)``.

    The model is a reslab ResNet, or a :class:`~reslab.deploy.fuse.FusedResNet` for a fused file.
    """
    path = weights_path(source)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path} is not a .safetensors file; pass a run folder or reslab weights")
    meta = read_metadata(path)
    if is_fused_file(meta):
        model, meta = load_fused(path, device)
        return model, meta
    return load_model(path, device).eval(), meta


def fused_source(source: str | Path, device: str | torch.device = "cpu") -> tuple[FusedResNet, dict[str, Any]]:
    """The fused model of a run folder / weights file / fused file, with its metadata."""
    model, meta = load_source(source, device)
    if isinstance(model, FusedResNet):
        return model, meta
    fused = fuse(model)
    assert isinstance(fused, FusedResNet)
    return fused, meta


def export_metadata(model: nn.Module, meta: dict[str, Any], input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The metadata carried by exported files.

    ``input_size`` overrides (or supplies, for files without it) the ``[C, H, W]`` input.
    """
    spec = meta.get("spec") or {}
    size = list(input_size) if input_size is not None else meta.get("input_size")
    if size is None:
        raise UsageError(
            "the weights have no input_size in their metadata (not written by 'reslab train'); pass --input-size CxHxW"
        )
    in_channels = spec.get("in_channels")
    if in_channels is not None and int(size[0]) != int(in_channels):
        raise UsageError(
            f"input size {size} has {size[0]} channels but the model takes {in_channels}; fix --input-size"
        )
    num_classes = spec.get("num_classes")
    classes = meta.get("classes")
    if classes is None and num_classes is not None:
        classes = [str(i) for i in range(int(num_classes))]
    channels = int(size[0])
    return {
        "reslab_version": __version__,
        "model": spec.get("name"),
        "technique": spec.get("technique"),
        "spec": spec,
        "fused": isinstance(model, FusedResNet),
        "input_size": [int(s) for s in size],
        "dataset": meta.get("dataset"),
        "classes": classes,
        "mean": meta.get("mean", [0.0] * channels),
        "std": meta.get("std", [1.0] * channels),
    }


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
    text = json.dumps(metadata)
    with torch.no_grad():
        if fmt == "torchscript":
            # TorchScript is deprecated in favour of torch.export but still what libtorch loads.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(model, example, check_trace=False)

            def write(p: Path) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.jit.save(traced, str(p), _extra_files={META_NAME: text})

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
    if fmt == "onnx" and not _onnxruntime_available():
        return  # nothing here can run it; the exporter itself succeeded
    run = _load_file(path, fmt, {}).run
    with torch.no_grad():
        got = run(x).float().cpu()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-4:
        raise UsageError(
            f"the exported {fmt} file does not reproduce the model (relative error {err:.2e}); not written"
        )


# ---------------------------------------------------------------------------------------
# Loading for prediction.


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
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UsageError(f"{path} has corrupt reslab metadata; export it again") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} has corrupt reslab metadata; export it again")
    return meta


def _onnxruntime_available() -> bool:
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
        return _load_file(p, "exported" if suffix == ".pt2" else "torchscript", meta)
    raise UsageError(
        f"{p}: unknown model file type {suffix or '(none)'}; pass a run folder, .safetensors, .pt/.ts (TorchScript), "
        ".pt2 or .onnx"
    )


def _load_file(path: Path, fmt: str, meta: dict[str, Any]) -> Predictor:
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
    if not _onnxruntime_available():
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
    meta = json.loads(raw)
    name = sess.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(sess.run(None, {name: x.float().numpy()})[0])

    return Predictor(run, meta, str(path))


# ---------------------------------------------------------------------------------------
# Images.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_images(paths: Sequence[str | Path], input_size: Sequence[int]) -> tuple[Tensor, list[str]]:
    """Read images as a float batch in [0, 1], ``N x C x H x W``, with a name for each.

    Image files (PNG, JPEG, ...) are converted to the model's channels (grayscale or RGB)
    and resized to its input size when they differ. A ``.npy`` file holds one image or a
    batch: ``H x W``, ``N x H x W`` (one channel), ``C x H x W`` or ``N x C x H x W``, or
    colour images channel-last as image libraries give them (``H x W x 3``,
    ``N x H x W x 3``, or 4 with alpha); uint8 in 0..255 or floats in [0, 1]. Colour
    arrays are converted to the model's channels like image files (uint8 ones through
    the same PIL conversion and resize). It is read with ``allow_pickle=False``.
    The first unreadable file raises; :func:`read_image_file` reads one file.
    """
    batches: list[Tensor] = []
    names: list[str] = []
    for raw in paths:
        x, n = read_image_file(raw, input_size)
        batches.append(x)
        names += n
    if not batches:
        raise UsageError("no images given; pass PNG/JPEG files or a .npy batch")
    return torch.cat(batches), names


def read_image_file(raw: str | Path, input_size: Sequence[int]) -> tuple[Tensor, list[str]]:
    """One image file or ``.npy`` batch as in :func:`load_images`: ``(batch, names)``."""
    c, h, w = (int(s) for s in input_size)
    p = Path(raw)
    if p.is_dir():
        raise UsageError(f"{p} is a folder, not an image; pass the files in it (e.g. {p}/*.png)")
    if not p.is_file():
        raise UsageError(f"image {p} does not exist")
    if p.suffix.lower() == ".npy":
        x = _npy_batch(p, c, h, w)
        return x, ([f"{p}[{i}]" for i in range(x.shape[0])] if x.shape[0] > 1 else [str(p)])
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _image(p, c, h, w)[None], [str(p)]
    raise UsageError(f"{p}: unsupported image type; pass PNG/JPEG files or a .npy batch")


def _image(path: Path, c: int, h: int, w: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _from_pil(im, c, h, w)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path} is not a readable image ({e})") from None


def _from_pil(im: Any, c: int, h: int, w: int) -> Tensor:
    """A PIL image converted to ``c`` channels (grayscale or RGB) and ``h x w``, in [0, 1]."""
    from PIL import Image

    if c not in (1, 3):
        raise UsageError(f"the model takes {c} channels; image files can only feed 1 (grayscale) or 3 (RGB)")
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float() / 255.0


#: PIL's grayscale conversion (ITU-R 601-2 luma), for float colour arrays
_LUMA = (0.299, 0.587, 0.114)


def _npy_batch(path: Path, c: int, h: int, w: int) -> Tensor:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise UsageError(
            f"{path} is not a readable .npy array: it has no NumPy header (a text or other file named .npy?); "
            "write arrays with numpy.save"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        reason = "it holds Python objects, which reslab never unpickles" if "pickle" in str(e) else str(e)
        reason = reason.splitlines()[0] if reason else type(e).__name__
        raise UsageError(
            f"{path} is not a readable .npy array ({reason}); save a numeric array with numpy.save"
        ) from None
    if arr.ndim in (3, 4) and arr.shape[-1] in (3, 4) and arr.shape[-3] not in (1, 3, 4):
        return _colour_last(path, arr if arr.ndim == 4 else arr[None], c, h, w)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        # One C x H x W image, or (for one-channel models) a batch of H x W images.
        arr = arr[None] if tuple(arr.shape) == (c, h, w) or c != 1 else arr[:, None]
    elif arr.ndim != 4:
        raise UsageError(f"{path} has shape {arr.shape}; expected HxW, NxHxW, CxHxW, HxWx3 or NxCxHxW")
    # besides c: RGB for a grayscale model, grayscale for an RGB one (converted below)
    convertible = {c} | ({3} if c == 1 else {1} if c == 3 else set())
    if tuple(arr.shape[2:]) != (h, w) or arr.shape[1] not in convertible:
        raise UsageError(f"{path} holds images of shape {tuple(arr.shape[1:])}; the model takes {(c, h, w)}")
    x = _unit_range(path, arr)
    if x.shape[1] == 3 and c == 1:  # colour to grayscale, as PIL converts an RGB image
        luma = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x * luma).sum(1, keepdim=True)
    elif x.shape[1] == 1 and c == 3:  # grayscale to RGB, as PIL does: the value in every channel
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x


def _colour_last(path: Path, arr: np.ndarray, c: int, h: int, w: int) -> Tensor:
    """``N x H x W x 3|4`` colour images, converted like image files."""
    if arr.dtype == np.uint8:
        from PIL import Image

        mode = "RGB" if arr.shape[-1] == 3 else "RGBA"
        return torch.stack([_from_pil(Image.fromarray(np.ascontiguousarray(a), mode=mode), c, h, w) for a in arr])
    x = _unit_range(path, np.ascontiguousarray(arr[..., :3].transpose(0, 3, 1, 2)))
    if tuple(x.shape[2:]) != (h, w):
        raise UsageError(
            f"{path} holds {tuple(x.shape[2:])} float images; the model takes {(h, w)} (uint8 arrays are resized)"
        )
    if c == 1:
        luma = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
        return (x * luma).sum(1, keepdim=True)
    if c != 3:
        raise UsageError(f"the model takes {c} channels; colour arrays can only feed 1 (grayscale) or 3 (RGB)")
    return x


def _unit_range(path: Path, arr: np.ndarray) -> Tensor:
    """uint8 0..255 or floats in [0, 1] as float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(arr.astype(np.float32))
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise UsageError(f"{path} has float values outside [0, 1]; save uint8 0..255 or floats in [0, 1]")
        return x
    raise UsageError(f"{path} has dtype {arr.dtype}; save uint8 0..255 or floats in [0, 1]")


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


__all__ = [
    "FORMATS",
    "Predictor",
    "export",
    "export_metadata",
    "fused_source",
    "load_images",
    "load_predictor",
    "load_source",
    "normalize",
    "predict",
    "read_archive_metadata",
    "read_image_file",
]
