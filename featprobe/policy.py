"""Run-time defaults in one place: device, compute precision, batch size, decode workers, decode
path. Every stage (extract, fit, predict, baseline) asks here; torch is imported only inside the
functions, so modules that merely name these choices stay torch-free.
"""

from __future__ import annotations

import os

from featprobe.errors import FeatprobeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("auto", "cpu", "gpu")
DTYPES = ("float16", "float32")

# PIL workers decode and resize a 500x375 JPEG at ~500 img/s per core (measured on the 16-core
# H100 host: 15 workers, 7,516 img/s), and on that GPU nvjpeg shares the stream with the forward
# pass. So with 8+ workers the CPU path feeds the GPU better (steady stream 1.00 of model-only
# vs 0.66); below that, decode on the GPU (bench/RESULTS.md).
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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here")
    return dev


def resolve_precision(precision: str, device) -> str:
    """``auto``: fp16 autocast on CUDA, fp32 on CPU.

    Measured (bench/precision.py, ELPV, MobileNetV2 IMAGENET1K_V1, H100, 5 splits; see
    bench/RESULTS.md): fp16 features are within 5.7e-3 relative error of fp32 and heads on them
    land within 0.38 points of fp32's val accuracy on every split; bf16 features are 9.8e-2 off
    and move val accuracy by up to 2.7 points. Both run at the same tensor-core rate on CUDA, so
    ``auto`` takes fp16 (batches that overflow are recomputed in fp32). On CPU ``auto`` stays
    fp32 even with AMX bf16 units because bf16 fails the same accuracy check.
    """
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
    takes a core from it (resnet18 on 2 cores: 0.68-0.71 of model-only with one worker, 0.84
    decoding each batch on all cores between forward passes; bench/RESULTS.md)."""
    if device.type == "cuda":
        return min(16, max(1, cpu_count() - 1))
    return 0


def resolve_decode(decode: str, device, workers: int | None = None) -> str:
    """``auto``: PIL workers (``cpu``), except on CUDA with fewer than 8 decode workers (``gpu``).

    ``workers`` is the DataLoader worker count the run will use (None: the device's default).
    ``gpu`` on a CPU device is allowed: the same tensor path with torchvision's CPU JPEG decoder
    in the main process (what the tests exercise; slower than ``cpu`` there).
    """
    if decode not in DECODES:
        raise FeatprobeError(f"unknown decode {decode!r}: use {', '.join(DECODES)}")
    if decode != "auto":
        return decode
    if device.type != "cuda":
        return "cpu"
    workers = default_workers(device) if workers is None else workers
    return "gpu" if workers < GPU_DECODE_BELOW_WORKERS else "cpu"
