"""GPU decoding: JPEG bytes decoded, resized and cropped on the device; PIL for everything else.

With ``decode="gpu"`` DataLoader workers only read file bytes and this process decodes each
batch's JPEGs on the device in one batched call (nvjpeg on CUDA), for hosts whose cores cannot
decode as fast as the GPU runs the model. :func:`sniff` decides what the tensor decoder takes;
anything else, and any JPEG it rejects, goes through the PIL path for that image only, with the
same reasons for bad files. The tensor resize differs from PIL's by at most one 8-bit level.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import torch
from PIL import ExifTags, Image

from featprobe.extraction import pixels
from featprobe.extraction.images import ImageRows, pil_input

_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field
_SOF_OK = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_RGB_IDS = (ord("R"), ord("G"), ord("B"))


def sniff(data: bytes) -> str:
    """"" when the tensor JPEG decoder may take ``data``; otherwise why PIL should. Reads the
    markers up to the first scan (no pixel is decoded)."""
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
            if max(h, w) > 64 * min(h, w):
                return "extreme aspect ratio"  # PIL's path bounds the resized size
            if Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS:
                return "very large JPEG"  # PIL's decompression-bomb check decides
            sof = m
        elif m == 0xE1 and seg[:6] == b"Exif\x00\x00":
            if _exif_orientation(seg) != 1:
                return "EXIF orientation"
        elif m == 0xE1 and seg.startswith(b"http://ns.adobe.com/xap/") and b"Orientation" in seg:
            return "XMP orientation"  # Pillow reads it when EXIF has none
        elif m == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12 and seg[11] != 1:
            return "Adobe colour transform"  # 0: RGB stored as is; 2: YCCK
        pos += 2 + length
    return "" if sof is not None else "malformed JPEG header"


def _exif_orientation(segment: bytes) -> int:
    """IFD0's Orientation as Pillow reads it (1 when absent); 0 when the block cannot be read."""
    try:
        exif = Image.Exif()
        exif.load(segment)
        return int(exif.get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed block: let PIL's own path decide
        return 0


def decode_jpegs(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """The one call to torchvision's JPEG decoder: 1-D uint8 CPU tensors → uint8 [3, H, W] RGB
    images on ``device``, in one batched call; ``RuntimeError`` when any image fails. Its
    deprecation (for TorchCodec, not a dependency) is silenced here and nowhere else."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # libjpeg's "corrupt data" notes
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def _crop_hw(pre: dict) -> list[int]:
    c = pre["crop_size"]
    return [c[0], c[0]] if len(c) == 1 else [c[0], c[1]]


def preprocess(images: Sequence[torch.Tensor], pre: dict, out: torch.Tensor | None = None,
               rows: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 [3, H, W] images → uint8 crops [B, 3, h, w], on their device (into rows ``rows`` of
    ``out`` when given): resize and centre crop in the order of torchvision's preset (so this
    path and PIL's differ only where the resize kernels do). Same-sized images are resized
    together, one kernel call per size."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = _crop_hw(pre)
    device = images[0].device
    if out is None:
        out = torch.empty(len(images), 3, h, w, dtype=torch.uint8, device=device)
    rows = list(range(len(images)) if rows is None else rows)
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
        if len(idx) == len(out):  # every row, in order
            out.copy_(x)
        else:
            out[torch.tensor([rows[i] for i in idx], device=device)] = x
    return out


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
    """Raw file bytes → (model input [B, 3, h, w] float on ``device``, per-image reasons): the
    loader side's path in one call. A bad image gets PIL's reason and zeros, as on the CPU path.
    """
    transform = transform or pixels.pixel_transform(pre)
    size = _crop_hw(pre)[0]
    batch = collate_encoded([_item(i, d, d, transform, size) for i, d in enumerate(datas)])
    _, x, reasons = assemble(batch, pre, torch.device(device), transform)
    x = pixels.normalize(x, pre)
    bad = [i for i, r in enumerate(reasons) if r]
    if bad:
        x[torch.tensor(bad, device=x.device)] = 0
    return x, reasons


def _item(i: int, data: bytes, source, transform, size: int) -> tuple:
    """``(i, data, None, "")`` when the tensor decoder takes ``data``; else ``(i, None, crop,
    reason)`` from ``source`` (a path or the bytes) on the PIL path."""
    if not sniff(data):
        return i, data, None, ""
    return (i, None, *pil_input(source, transform, size))


class EncodedRows(ImageRows):
    """Rows as ``(index, jpeg bytes or None, PIL-path uint8 crop or None, reason)``: a worker
    reads and sniffs the file, and decodes with PIL and ``transform`` (the CPU path, with its
    reasons for bad files) only what the tensor decoder will not take."""

    def __getitem__(self, i: int):
        path = self.ds.path(i)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""  # load_rgb gives the CPU path's reason (missing, a directory...)
        return _item(i, data, path, self.transform, self.size)


def collate_encoded(items):
    """:class:`EncodedRows` items as a few tensors, cheap to pass between processes: ``(index
    [B], data uint8 [sum of lengths], lengths [J], jpeg_rows [J], pil [P,3,s,s], pil_rows [P],
    reasons)`` where ``*_rows`` are positions within the batch."""
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
    """A :func:`collate_encoded` batch → ``(index, uint8 crops [B, 3, h, w] on device, reasons)``:
    the JPEGs decoded on ``device`` in one call, the PIL rows copied (non-blocking from pinned
    memory), and JPEGs the decoder rejects through PIL here."""
    index, data, lengths, jpeg_rows, pil, pil_rows, reasons = batch
    reasons = list(reasons)
    h, w = _crop_hw(pre)
    x = torch.empty(len(index), 3, h, w, dtype=torch.uint8, device=device)
    if len(pil_rows):
        x[pil_rows.to(device, non_blocking=True)] = pil.to(device, non_blocking=True)
    if len(jpeg_rows):
        tensors = list(torch.split(data, lengths.tolist()))
        images = decode_tensors(tensors, device)
        good = [r for r, im in zip(jpeg_rows.tolist(), images) if im is not None]
        if good:
            preprocess([im for im in images if im is not None], pre, out=x, rows=good)
        for r, t, im in zip(jpeg_rows.tolist(), tensors, images):
            if im is None:
                transform = transform or pixels.pixel_transform(pre)
                img, reasons[r] = pil_input(t.numpy().tobytes(), transform, h)
                x[r] = img.to(device)
    return index, x, reasons
