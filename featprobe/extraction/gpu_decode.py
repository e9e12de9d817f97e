"""GPU decoding: JPEG bytes decoded, resized and cropped on the device; PIL for everything else.

With ``decode="gpu"`` DataLoader workers only read file bytes and this process decodes each
batch's JPEGs on the device in one batched call (nvjpeg on CUDA), because 16 CPU cores decode
~1.8k JPEGs/s while an H100 runs VGG16 at ~7.9k images/s. :func:`sniff` reads the markers to
decide what the tensor decoder takes (8-bit 3-component Huffman JPEGs with an end marker and no
EXIF rotation); anything else, and any JPEG the decoder rejects, goes through the PIL path for
that image only, with the same reason strings for bad files. The tensor resize differs from
PIL's by at most one 8-bit level on a few pixels (tests/test_decoding.py; docs/guide.md).
``torchvision.io.decode_jpeg`` (deprecated in 0.29 for TorchCodec) is called in one place,
:func:`decode_jpegs`.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import defaultdict
from collections.abc import Sequence

import torch
from PIL import Image

from featprobe.extraction import pixels
from featprobe.extraction.images import BadImage, load_rgb

_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
_SOF_OK = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_RGB_IDS = (ord("R"), ord("G"), ord("B"))


# ----------------------------------------------------------------------------- sniffing


def sniff(data: bytes) -> str:
    """"" when the tensor JPEG decoder may take ``data``; otherwise why PIL should.

    Reads the markers up to the first scan (microseconds: no pixel is decoded).
    """
    n = len(data)
    if n < 4 or data[:3] != b"\xff\xd8\xff":
        return "not a JPEG"
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "no end-of-image marker (truncated?)"
    pos, sof = 2, None
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return "malformed JPEG header"
        m = data[pos + 1]
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        if m in _STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        seg = data[pos + 4: pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            return "malformed JPEG header"
        if m == 0xDA:  # start of scan: the header is over
            break
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            if m not in _SOF_OK:
                return f"SOF{m - 0xC0} JPEG (lossless, arithmetic or hierarchical)"
            if len(seg) < 6:
                return "malformed JPEG header"
            precision, h, w, ncomp = seg[0], (seg[1] << 8) | seg[2], (seg[3] << 8) | seg[4], seg[5]
            if precision != 8:
                return f"{precision}-bit JPEG"
            if ncomp != 3:
                return "grayscale JPEG" if ncomp == 1 else f"{ncomp}-component JPEG (CMYK?)"
            if len(seg) < 15:
                return "malformed JPEG header"
            if (seg[6], seg[9], seg[12]) == _RGB_IDS:
                return "RGB-coded JPEG"
            if h == 0 or w == 0:
                return "JPEG without a height in its frame header"
            if Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS:
                return "very large JPEG"  # PIL's decompression-bomb check decides
            sof = m
        elif m == 0xE1 and seg[:6] == b"Exif\x00\x00":
            if _exif_orientation(seg[6:]) != 1:
                return "EXIF orientation"
        elif m == 0xE1 and seg.startswith(b"http://ns.adobe.com/xap/") and b"Orientation" in seg:
            return "XMP orientation"  # Pillow reads it when EXIF has none
        elif m == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12 and seg[11] != 1:
            return "Adobe colour transform"  # 0: RGB stored as is; 2: YCCK
        pos += 2 + length
    return "" if sof is not None else "malformed JPEG header"


def _exif_orientation(tiff: bytes) -> int:
    """IFD0's Orientation (1 when absent); 0 when the block cannot be read."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind = struct.unpack_from(order + "HH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", tiff, ifd + 10 + 12 * k)[0] * (kind == 3)
    except (KeyError, struct.error):
        return 0
    return 1


# ----------------------------------------------------------------------------- decode + transform


def decode_jpegs(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """The one call to torchvision's JPEG decoder: uint8 [3, H, W] RGB images on ``device``.

    ``datas`` are 1-D uint8 CPU tensors. One batched call (nvjpeg on CUDA); raises
    ``RuntimeError`` when any image fails. torchvision ≥ 0.29 deprecates it for TorchCodec
    (not a dependency): the warning is silenced here and nowhere else.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # libjpeg's "corrupt data" notes
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def _crop_hw(pre: dict) -> list[int]:
    c = pre["crop_size"]
    return [c[0], c[0]] if len(c) == 1 else [c[0], c[1]]


def preprocess(images: Sequence[torch.Tensor], pre: dict) -> torch.Tensor:
    """uint8 [3, H, W] images → uint8 crops [B, 3, h, w], on their device.

    The weights' own preprocessing facts, in the order of torchvision's ``ImageClassification``
    preset (so the PIL path and this one differ only where the resize kernels do): shorter side to
    ``resize_size`` (uint8 out), centre crop; :func:`featprobe.extraction.pixels.normalize` does the
    rest. Same-sized images are resized together, one kernel call per size.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = _crop_hw(pre)
    device = images[0].device
    out = torch.empty(len(images), 3, h, w, dtype=torch.uint8, device=device)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[tuple(im.shape)].append(i)
    interpolation = InterpolationMode(pre["interpolation"])
    for idx in groups.values():
        x = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
        if pre.get("resize_size"):
            x = F.resize(x, list(pre["resize_size"]), interpolation=interpolation,
                         antialias=pre["antialias"])
        x = F.center_crop(x, [h, w])
        if len(idx) == len(images):
            out.copy_(x)
        else:
            out[torch.tensor(idx, device=device)] = x
    return out


def pil_input(data: bytes, transform, size: int) -> tuple[torch.Tensor, str]:
    """One image through the PIL path, from its bytes, with a :func:`featprobe.extraction.pixels.
    pixel_transform`: (uint8 [3, s, s], "") or (zeros, reason)."""
    try:
        return transform(load_rgb(io.BytesIO(data))), ""
    except BadImage as e:
        return torch.zeros(3, size, size, dtype=torch.uint8), str(e) or "cannot decode"


def decode_tensors(datas: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """:func:`decode_jpegs` in one call; when it fails, one by one (None for the culprits)."""
    try:
        return list(decode_jpegs(datas, device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpegs([d], device)[0])
        except RuntimeError:
            out.append(None)
    return out


def decode_batch(datas: Sequence[bytes], pre: dict, device="cpu", transform=None,
                 ) -> tuple[torch.Tensor, list[str]]:
    """Raw file bytes → (model input [B, 3, h, w] float on ``device``, per-image reasons).

    JPEGs the tensor decoder takes are decoded on ``device`` in one batched call; the rest (and
    any it rejects) go through PIL one by one (``transform``: a :func:`featprobe.extraction.pixels.
    pixel_transform`). ``reasons[i]`` is "" for a good image; a bad one gets zero pixels and
    PIL's reason, as on the CPU path (zeros in the result).
    """
    transform = transform or pixels.pixel_transform(pre)
    device = torch.device(device)
    h, w = _crop_hw(pre)
    x = torch.zeros(len(datas), 3, h, w, dtype=torch.uint8, device=device)
    reasons = [""] * len(datas)
    fast = [i for i, d in enumerate(datas) if not sniff(d)]
    slow = [i for i in range(len(datas)) if i not in set(fast)]
    if fast:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in fast]
        done = _place(x, fast, decode_tensors(tensors, device), pre)
        slow += [i for i, ok in zip(fast, done) if not ok]
    for i in sorted(slow):
        img, reasons[i] = pil_input(bytes(datas[i]), transform, h)
        x[i] = img.to(device)
    x = pixels.normalize(x, pre)
    bad = [i for i, r in enumerate(reasons) if r]
    if bad:
        x[torch.tensor(bad, device=device)] = 0
    return x, reasons


def _place(x: torch.Tensor, rows: list[int], images: list, pre: dict) -> list[bool]:
    """Preprocess the decoded ``images`` into ``x[rows]``; which ones were there."""
    ok = [im is not None for im in images]
    good = [im for im in images if im is not None]
    if good:
        target = [r for r, k in zip(rows, ok) if k]
        y = preprocess(good, pre)
        if len(target) == x.shape[0]:
            x.copy_(y)
        else:
            x[torch.tensor(target, device=x.device)] = y
    return ok


# ----------------------------------------------------------------------------- the loader side


class EncodedRows(torch.utils.data.Dataset):
    """Rows as ``(index, jpeg bytes or None, PIL-path uint8 crop or None, reason)`` for GPU
    decoding.

    A DataLoader worker only reads the file and sniffs it; files the tensor decoder will not take
    are decoded and cropped here with PIL and ``transform`` (a :func:`featprobe.extraction.pixels.
    pixel_transform`: the CPU path, with its reasons for bad files).
    """

    def __init__(self, ds, transform, size: int):
        self.ds = ds
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        path = self.ds.path(i)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # load_rgb below gives the CPU path's reason (missing, a directory...)
        if data and not sniff(data):
            return i, data, None, ""
        try:
            return i, None, self.transform(load_rgb(path)), ""
        except BadImage as e:
            return i, None, torch.zeros(3, self.size, self.size, dtype=torch.uint8), \
                str(e) or "cannot decode"


def collate_encoded(items):
    """A batch of :class:`EncodedRows` items as a few tensors (cheap to pass between processes):

    ``(index [B], data uint8 [sum of lengths], lengths [J], jpeg_rows [J], pil [P,3,s,s],
    pil_rows [P], reasons)`` where ``*_rows`` are positions within the batch.
    """
    index = torch.tensor([it[0] for it in items], dtype=torch.int64)
    jpeg_rows = [k for k, it in enumerate(items) if it[1] is not None]
    pil_rows = [k for k, it in enumerate(items) if it[1] is None]
    blobs = [items[k][1] for k in jpeg_rows]
    data = (torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if blobs
            else torch.empty(0, dtype=torch.uint8))
    size = items[pil_rows[0]][2].shape[-1] if pil_rows else 0
    pil = (torch.stack([items[k][2] for k in pil_rows]) if pil_rows
           else torch.empty(0, 3, size, size, dtype=torch.uint8))
    return (index, data, torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            torch.tensor(jpeg_rows, dtype=torch.int64), pil,
            torch.tensor(pil_rows, dtype=torch.int64), [it[3] for it in items])


def assemble(batch, pre: dict, device: torch.device, transform=None,
             ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A :func:`collate_encoded` batch → ``(index, uint8 crops [B, 3, h, w] on device, reasons)``
    (:func:`featprobe.extraction.pixels.normalize` makes them the model's input).

    The JPEGs are decoded on ``device`` in one batched call; the PIL rows are copied
    (non-blocking from pinned memory); JPEGs the decoder rejects fall back to PIL here.
    """
    index, data, lengths, jpeg_rows, pil, pil_rows, reasons = batch
    reasons = list(reasons)
    h, w = _crop_hw(pre)
    x = torch.empty(len(index), 3, h, w, dtype=torch.uint8, device=device)
    if len(pil_rows):
        x[pil_rows.to(device, non_blocking=True)] = pil.to(device, non_blocking=True)
    if len(jpeg_rows):
        rows = jpeg_rows.tolist()
        tensors = list(torch.split(data, lengths.tolist()))
        done = _place(x, rows, decode_tensors(tensors, device), pre)
        if not all(done):
            transform = transform or pixels.pixel_transform(pre)
            for r, t, ok in zip(rows, tensors, done):
                if not ok:
                    img, reasons[r] = pil_input(t.numpy().tobytes(), transform, h)
                    x[r] = img.to(device)
    return index, x, reasons
