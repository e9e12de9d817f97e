"""The streaming loop: DataLoader → frozen model → writer thread → crash-safe parts.

Workers decode and crop to uint8; the batch is normalised on the model's device, run under
``torch.inference_mode()``, cast to the cache's dtype there (:class:`StorageCast`) and handed to
a writer thread that saves it as one part, so decoding, the forward pass and disk writes overlap
and memory stays flat. The main process's per-batch work is kept small: on a GPU it is the
critical path.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading

import numpy as np
import torch
from tqdm import tqdm

from featprobe.cache.writer import PartialCache
from featprobe.errors import FeatprobeError
from featprobe.extraction import backbones, gpu_decode, pixels
from featprobe.extraction.images import ImageRows
from featprobe.extraction.settings import ExtractJob
from featprobe.faults import crash_point
from featprobe.policy import default_workers

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("featprobe")


def image_loader(ds, pre, dev, decode, batches, workers):
    """The in-order DataLoader over ``batches`` for a decode path, and the PIL transform.
    ``cpu``: batches of uint8 crops; ``gpu``: :mod:`featprobe.extraction.gpu_decode` batches."""
    transform = pixels.pixel_transform(pre)
    size = pre["crop_size"][0]
    if decode == "gpu":
        rows, collate = gpu_decode.EncodedRows(ds, transform, size), gpu_decode.collate_encoded
    else:
        threads = torch.get_num_threads() if workers == 0 else 1
        rows = ImageRows(ds, transform, size, threads=threads)
        collate = None
    loader = torch.utils.data.DataLoader(rows, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate, pin_memory=dev.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    return loader, transform


def feature_batches(model: backbones.FeatureModel, ds, dev, prec: str, batches, workers=None,
                    progress=True, initial=0, desc=None, decode="cpu", cast=None):
    """Yield ``(rows, {layer: array}, reasons)`` for each batch of row indices.

    The network is built here, so callers that find nothing to do never pay for it.
    ``reasons[i]`` is "" for a good image, else why it could not be read. Arrays are float32 (a
    bad image's features are garbage); with ``cast`` (a :class:`StorageCast`) they are in its
    dtype, cast on the device, with a bad image's row zeroed. ``decode``: see
    :func:`image_loader`. On CUDA the features of batch k are copied back while batch k+1 is
    decoded and run (one batch in flight).
    """
    backbone, layers, pre = model.backbone, list(model.layers), model.preprocessing
    extractor = backbones.feature_extractor(model)
    # channels-last is faster for convolutions on GPUs and on CPUs alike (oneDNN)
    extractor = extractor.to(dev, memory_format=torch.channels_last)
    n_workers = default_workers(dev) if workers is None else workers
    loader, transform = image_loader(ds, pre, dev, decode, batches, n_workers)
    bar = tqdm(total=initial + sum(len(b) for b in batches), initial=initial, unit="img",
               desc=desc or f"extract {backbone}", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    autocast = (torch.autocast(dev.type, dtype=_AUTOCAST[prec]) if prec in _AUTOCAST
                else contextlib.nullcontext())
    cuda = dev.type == "cuda"
    guard = _Fp16Guard(extractor, layers, cast)
    pending = None  # CUDA: (index, {layer: pinned host tensor}, copy-done event, reasons)
    try:
        for batch in loader:
            with torch.inference_mode():
                if decode == "gpu":
                    index, x, reasons = gpu_decode.assemble(batch, pre, dev, transform)
                else:
                    index, x, reasons = batch
                # uint8 to the device (a quarter of the float bytes), channels-last while it is
                # still 1 byte a value; normalising keeps the layout
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                x = pixels.normalize(x, pre)
                with autocast:
                    out = extractor(x)
                if not cuda:  # the CPU loop: no copies to overlap
                    if prec == "fp16" and not bool(_finite_flag(out, layers)):
                        out = guard.recompute(x)
                    feats = _to_host(out, layers, cast, reasons)
                    bar.update(len(index))  # before the yield: the consumer may stop after
                    yield index.tolist(), {k: t.numpy() for k, t in feats.items()}, list(reasons)
                    continue  # the last batch and never resume this generator
                finite = None
                if prec == "fp16":  # checked when the batch lands: no sync here
                    finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                    finite.copy_(_finite_flag(out, layers), non_blocking=True)
                # fp16 features lose nothing to fp16 storage, so they are not counted (and a
                # batch that overflowed is recomputed in fp32, and counted, when it lands)
                host = _to_host(out, layers, cast, reasons, pinned=True, count=finite is None)
                done = torch.cuda.Event()
                done.record()
            if pending is not None:
                yield guard.landed(pending, bar)
            pending = (index, host, done, list(reasons), finite, x if finite is not None else None)
        if pending is not None:
            yield guard.landed(pending, bar)
    finally:
        bar.close()
        if guard.batches:
            log.warning(f"warning: fp16 overflowed (inf/nan features) in {guard.batches} "
                        "batch(es); they were recomputed in fp32")


def _to_host(out: dict, layers, cast, reasons, pinned: bool = False, count: bool = True) -> dict:
    """Each layer's features on the host: float32, or cast on the device by ``cast``; with
    ``pinned``, copied non-blocking into pinned memory (wait on an event before use)."""
    host = {}
    for layer in layers:
        y = out[layer].float() if cast is None else cast(out[layer], reasons, count)
        if pinned:
            host[layer] = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            host[layer].copy_(y, non_blocking=True)
        else:
            host[layer] = y.cpu()
    return host


class StorageCast:
    """Casts features to the cache's dtype where they are computed, zeroes bad images' rows,
    and counts the nonzero values that float16 storage turns into 0 or inf (on the device: no
    sync until :meth:`lost_fraction`). torch's cast rounds exactly as numpy's ``astype``."""

    def __init__(self, dtype):
        self.dtype = {np.dtype(np.float16): torch.float16,
                      np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        self.kept = self.lost = 0  # device tensors once anything is counted

    def __call__(self, y: torch.Tensor, reasons, count: bool = True) -> torch.Tensor:
        """``y`` (any float dtype: fp16 autocast output is cast once, not via float32) in the
        storage dtype, bad rows zeroed; ``count``: add its losses to the totals."""
        out = y.to(self.dtype)
        stored = out
        if any(reasons):
            keep = torch.tensor([not r for r in reasons], device=y.device)
            if out is y:  # same dtype: do not zero the caller's tensor
                out = y.clone()
            out[~keep] = 0
            y, stored = y[keep], out[keep]
        if count and self.dtype == torch.float16:
            nonzero = torch.count_nonzero(y)
            self.kept = self.kept + nonzero
            self.lost = self.lost + nonzero - torch.count_nonzero(
                torch.isfinite(stored) & (stored != 0))
        return out

    def lost_fraction(self) -> float:
        kept = int(self.kept)
        return int(self.lost) / kept if kept else 0.0


def _finite_flag(out: dict, layers) -> torch.Tensor:
    return torch.stack([torch.isfinite(out[layer]).all() for layer in layers]).all()


class _Fp16Guard:
    """fp16 is more precise than bf16 but overflows past 65,504: a batch whose features come out
    inf/nan is recomputed in fp32, so fp16 adds no non-finite feature."""

    def __init__(self, extractor, layers, cast=None):
        self.extractor, self.layers, self.cast, self.batches = extractor, layers, cast, 0

    def recompute(self, x: torch.Tensor) -> dict:
        self.batches += 1
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            return self.extractor(x.float())

    def landed(self, pending, bar):
        """Wait for a batch's device-to-host copies; its ``(rows, features, reasons)``."""
        index, host, done, reasons, finite, x = pending
        done.synchronize()
        bar.update(len(index))
        if finite is not None and not bool(finite):
            host = _to_host(self.recompute(x), self.layers, self.cast, reasons)
        return index.tolist(), {layer: t.numpy() for layer, t in host.items()}, reasons


def run_parts(job: ExtractJob, part_rows: int, todo: list[int], builder=None,
              mine: list[int] | None = None) -> None:
    """Compute the missing parts, one crash-safe part per batch, written on a thread; with
    ``builder`` (an H5Builder) each part is also copied into the final HDF5 file as written.
    ``mine``: the parts of this shard (default: all), which its progress bar counts."""
    ds, layers = job.ds, job.model.layers

    def rows(k):
        return list(range(k * part_rows, min((k + 1) * part_rows, len(ds))))

    batches = [rows(k) for k in todo]
    total = len(ds) if mine is None else sum(len(rows(k)) for k in mine)
    stream = feature_batches(job.model, ds, job.device, job.precision, batches, job.workers,
                             job.progress, initial=total - sum(len(b) for b in batches),
                             decode=job.decode, cast=(cast := StorageCast(job.dtype)))
    writer = _PartWriter(job.partial, builder)
    try:
        for k, (rows, feats, reasons) in zip(todo, stream):
            bad = [i for i, r in enumerate(reasons) if r]
            if bad and job.on_error == "fail":
                raise FeatprobeError(f"cannot read image {ds.ids[rows[bad[0]]]}: {reasons[bad[0]]} "
                                     "— fix or remove it, or rerun with --on-error skip (finished "
                                     "batches are kept)")
            valid = np.array([not r for r in reasons], dtype=bool)
            arrays = {"f_" + layer: feats[layer] for layer in layers}  # cast, bad rows zeroed
            arrays.update(start=np.int64(k * part_rows), valid=valid,
                          bad_ids=np.array([ds.ids[rows[i]] for i in bad], dtype=str),
                          bad_reasons=np.array([reasons[i] for i in bad], dtype=str))
            crash_point("stream.batch_ready")  # computed, not yet handed to the writer
            writer.put(k, arrays)
    finally:
        stream.close()
        writer.close()
    writer.check()
    if (lost := cast.lost_fraction()) > 0.001:
        log.warning(f"warning: float16 storage lost {100 * lost:.1f}% of the nonzero feature "
                    "values (underflow to 0 or overflow to inf: features this small or large "
                    "are typical of random weights); re-extract with --dtype float32 (auto "
                    "picks it for --weights none)")


class _PartWriter:
    """Writes parts on a thread so disk I/O overlaps the next forward pass; the queue is
    bounded, so a slow disk slows extraction instead of filling memory."""

    def __init__(self, partial: PartialCache, builder=None, depth: int = 4):
        self.partial = partial
        self.builder = builder
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="featprobe-writer")
        self.thread.start()

    def _loop(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.partial.write_part(*item)
                    self._copy(*item)
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def _copy(self, k: int, arrays: dict) -> None:
        """Copy a written part into the final file; on failure (say, a full disk) drop the
        half-built file and go on writing parts: consolidation retries from them at the end."""
        if self.builder is None or self.builder.failed:
            return
        try:
            self.builder.add(k, arrays)
        except Exception:
            self.builder.failed = True
            self.builder.abort()

    def check(self):
        if self.error is not None:
            e = self.error
            raise FeatprobeError(f"could not write to {self.partial.dir} ("
                                 f"{getattr(e, 'strerror', None) or e}); finished batches are "
                                 "kept: free space and rerun the same command")

    def put(self, k: int, arrays: dict) -> None:
        self.check()
        self.q.put((k, arrays))

    def close(self) -> None:
        """Finish writing what is queued (those parts are whole and valid) and stop."""
        self.q.put(None)
        self.thread.join()
