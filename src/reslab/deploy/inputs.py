"""The images ``reslab predict`` reads: image files (any size or mode, resized and converted
to the model's input) and ``.npy`` batches, checked for shape and range."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reslab.errors import UsageError

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
