"""Run-time defaults in one place: device, precision, batch size, decode workers and path. Torch
is imported only inside the functions, so modules that merely name these choices stay torch-free.
"""

from __future__ import annotations

import os

from featprobe.errors import FeatprobeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("auto", "cpu", "gpu")
CROPS = ("center", "squash", "letterbox")  # --crop; recorded as ``crop``, absent = center
DTYPES = ("auto", "float16", "float32")


def resolve_dtype(dtype: str, weights_kind: str) -> str:
    """``auto``: float16 for trained weights (half the disk, within 5e-4 of float32), float32
    for random init, whose activations shrink below float16's range (random-init MobileNetV2's
    features all round to 0 in float16)."""
    if dtype != "auto":
        return dtype
    return "float32" if weights_kind == "none" else "float16"

# With 8+ PIL workers the CPU path feeds a GPU better than nvjpeg, which shares the stream with
# the forward pass; below that, decode on the GPU (bench/RESULTS.md).
GPU_DECODE_BELOW_WORKERS = 8


def resolve_device(device="auto", error: type[Exception] = FeatprobeError):
    """``"auto"`` → CUDA when torch sees a GPU, else CPU; anything else must be a device torch
    can run here (``cpu``, ``cuda``, ``cuda:N``). ``error``: the exception type to raise
    (scikit-learn estimators raise ValueError)."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise error(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(f"unknown device {str(device)!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise error(f"device {str(device)!r} asked for, but torch sees "
                    f"{torch.cuda.device_count()} GPU(s) here")
    return dev


def resolve_precision(precision: str, device) -> str:
    """``auto``: fp16 autocast on CUDA, fp32 on CPU. fp16 keeps heads' accuracy within a
    fraction of a point of fp32 where bf16 does not, at the same tensor-core rate (batches that
    overflow are recomputed in fp32); bench/RESULTS.md has the figures."""
    if precision not in PRECISIONS:
        raise FeatprobeError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def default_batch_size(device) -> int:
    return 256 if device.type == "cuda" else 32


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def default_workers(device) -> int:
    """DataLoader worker processes for extraction: all but one core on CUDA (max 16); none on
    CPU, where the forward pass already runs on every core and a decoding process beside it
    would take a core from it (bench/RESULTS.md)."""
    if device.type == "cuda":
        return min(16, max(1, cpu_count() - 1))
    return 0


def resolve_decode(decode: str, device, workers: int | None = None) -> str:
    """``auto``: PIL workers (``cpu``), except on CUDA with fewer than 8 decode workers (``gpu``).

    ``workers``: the DataLoader worker count the run will use (None: the device's default).
    ``gpu`` on a CPU device runs the same tensor path with torchvision's CPU JPEG decoder.
    """
    if decode not in DECODES:
        raise FeatprobeError(f"unknown decode {decode!r}: use {', '.join(DECODES)}")
    if decode != "auto":
        return decode
    if device.type != "cuda":
        return "cpu"
    workers = default_workers(device) if workers is None else workers
    return "gpu" if workers < GPU_DECODE_BELOW_WORKERS else "cpu"
