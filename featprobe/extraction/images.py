"""Image decoding: one swappable stage that turns a file into an RGB image or a reason it can't.

PIL on CPU workers. Any mode becomes 8-bit RGB (alpha dropped) and EXIF orientation is applied
so the model sees the photo as a viewer shows it; bad files raise :class:`BadImage`.
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torchvision.transforms import Resize

from featprobe.data import Dataset


class BadImage(Exception):
    """A file that cannot be decoded as an image; the message is the reason."""


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB PIL image, or raise :class:`BadImage`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: truncated files fail here, not later
                return _to_rgb(_orient(im))
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode: {e}") from None


_T = Image.Transpose
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
              6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation without re-encoding EXIF (a corrupt block is ignored)."""
    try:
        method = _TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF must not make a good picture unreadable
        method = None
    return im.transpose(method) if method is not None else im.copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1 else 1.0), 0, 255).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def _check_resize(transform, size: tuple[int, int]) -> None:
    """PIL's decompression-bomb check sees the source pixels; a sliver (1 x 60,000 px, a few
    hundred bytes of PNG) passes it, and resizing its shorter side to 256 would then allocate
    gigabytes. The resized image gets the same bound, ``Image.MAX_IMAGE_PIXELS``."""
    limit = Image.MAX_IMAGE_PIXELS
    for step in getattr(transform, "transforms", ()):
        if limit and isinstance(step, Resize):
            s = step.size if isinstance(step.size, int) else list(step.size)
            short, long = sorted(size)
            pixels = (s * s * long / max(short, 1) if isinstance(s, int) or len(s) == 1
                      else s[0] * s[1])
            if pixels > limit:
                raise BadImage(f"{size[0]}x{size[1]} pixels: resized it would be "
                               f"{pixels / 1e6:,.0f} million (an extreme aspect ratio)")


def pil_input(source, transform, size: int) -> tuple[torch.Tensor, str]:
    """One image (a path or its bytes) through the PIL path with a :func:`featprobe.extraction.
    pixels.pixel_transform`: ``(uint8 [3, s, s], "")`` or ``(zeros, reason)``, a reason never
    empty ("" means a good row)."""
    try:
        src = source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)
        im = load_rgb(src)
        _check_resize(transform, im.size)
        return transform(im), ""
    except BadImage as e:
        return torch.zeros(3, size, size, dtype=torch.uint8), str(e) or "cannot decode"


class ImageRows(torch.utils.data.Dataset):
    """Rows of a :class:`Dataset` as ``(index, uint8 crop, reason)`` (:func:`pil_input`).

    A bad image yields a zero tensor and its reason, so one file never kills a worker; the
    extraction loop decides (``--on-error``) whether that stops the run or marks the row invalid.

    ``threads > 1``: a DataLoader without workers fetches each batch through
    :meth:`__getitems__`, which decodes its images on that many threads (Pillow releases the
    GIL): how a CPU device decodes, all cores between forward passes.
    """

    def __init__(self, ds: Dataset, transform, size: int, threads: int = 1):
        self.ds = ds
        self.transform = transform
        self.size = size
        self.threads = threads
        self._pool = None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices) -> list:
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="featprobe-decode")
        return list(self._pool.map(self.__getitem__, indices))

    def __getstate__(self) -> dict:  # a worker process gets no thread pool (made on demand)
        return {**self.__dict__, "_pool": None}

    def __getitem__(self, i: int):
        return (i, *pil_input(self.ds.path(i), self.transform, self.size))
