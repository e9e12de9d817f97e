"""Row sources: where the torch heads' training loop gets its minibatches.

A row source has ``n``, ``d``, ``batches(gen, batch_size, device)`` (one epoch of ``(x float32
[k, D], y class indices [k])`` on the device, in an order drawn from ``gen``), ``set_targets``
and ``check_finite``. :class:`ArrayRows` holds its rows in memory; :class:`BlockRows` reads them
from the HDF5 cache in shuffled blocks under a memory budget.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from featprobe.cache.reader import chunk_rows, read_block, row_ranges, span_rows
from featprobe.cache.reader import read_rows as read_dataset_rows
from featprobe.errors import FeatprobeError

BLOCK_BYTES = 2 << 20  # target size of one read: whole HDF5 row chunks, about 2 MiB
MIN_BLOCKS = 16  # a shuffle buffer holds at least this many blocks (smaller blocks if need be)
SCAN_BYTES = 32 << 20  # sequential passes (statistics, scoring) read at most this at a time
_CHECK_BYTES = 64 << 20  # the finiteness scan converts at most this much at a time


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a numpy array; read-only arrays (memmaps) are fine, we never write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(a)


def non_finite_rows(X: np.ndarray) -> int:
    """How many rows of ``X`` hold NaN or inf: an exact scan in bounded pieces (numpy: fit
    runs it in processes forked from one that used torch's thread pool)."""
    step = max(1, _CHECK_BYTES // (4 * max(1, X.shape[1])))
    return sum(int((~np.isfinite(X[s : s + step])).any(axis=1).sum())
               for s in range(0, X.shape[0], step))


def check_finite_rows(X: np.ndarray) -> None:
    """Slow; only run once training or inference has produced a non-finite value."""
    if non_finite_rows(X):
        raise ValueError("Input X contains NaN or infinity.")


class _Gather:
    """Minibatch rows gathered and converted to float32 into buffers reused across steps (a
    fresh buffer per step costs page faults that dominate a small fit), standardised in place
    when ``shift``/``scale`` are set."""

    def __init__(self, rows: int, d: int, dtype: torch.dtype, device: torch.device,
                 shift=None, scale=None):
        self.f32 = torch.empty(rows, d, dtype=torch.float32, device=device)
        self.raw = (None if dtype == torch.float32
                    else torch.empty(rows, d, dtype=dtype, device=device))
        self.shift = None if shift is None else shift.to(device)
        self.scale = None if scale is None else scale.to(device)

    def __call__(self, X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        k = idx.shape[0]
        out = self.f32[:k]
        if self.raw is None:
            torch.index_select(X, 0, idx, out=out)
        else:
            torch.index_select(X, 0, idx, out=self.raw[:k])
            out.copy_(self.raw[:k])
        if self.shift is not None:
            out.sub_(self.shift).mul_(self.scale)
        return out


class ArrayRows:
    """Rows held in memory (float16 or float32, never copied whole): a permutation per epoch."""

    def __init__(self, X: np.ndarray, y_idx=None):
        self.X = X
        self.n, self.d = X.shape
        self.y = None if y_idx is None else torch.as_tensor(np.asarray(y_idx), dtype=torch.long)

    def set_targets(self, y_idx) -> None:
        self.y = torch.as_tensor(np.asarray(y_idx), dtype=torch.long)

    def batches(self, gen: torch.Generator, batch_size: int, device: torch.device):
        if getattr(self, "_device_X", None) is None or self._device_X.device != device:
            # one transfer per fit, in the stored dtype (float16 stays float16); CPU: a view
            self._device_X = as_tensor(self.X).to(device)
        X, y = self._device_X, self.y.to(device)
        if getattr(self, "_gather", None) is None or self._gather.f32.shape[0] < batch_size:
            self._gather = _Gather(batch_size, self.d, X.dtype, device)  # kept across epochs
        gather = self._gather
        perm = torch.randperm(self.n, generator=gen).to(device)
        for idx in perm.split(batch_size):
            yield gather(X, idx), y[idx]

    def check_finite(self) -> None:
        check_finite_rows(self.X)


def open_layer(path, layer):
    f = h5py.File(path, "r")
    try:
        ds = f["features"][layer]
    except KeyError:
        f.close()
        raise FeatprobeError(f"layer {layer!r} is not in {path}") from None
    return f, ds


def _read_selected(ds, lo, hi, rows, out, at, scratch):
    """Rows ``rows`` (sorted, all in ``[lo, hi)``) → ``out[at : at + len(rows)]``."""
    k = len(rows)
    if k == hi - lo:  # the whole range is wanted: read straight into place
        read_block(ds, out, np.s_[lo:hi], np.s_[at : at + k])
    else:
        read_block(ds, scratch, np.s_[lo:hi], np.s_[0 : hi - lo])
        np.take(scratch, rows - lo, axis=0, out=out[at : at + k])
    return k


def read_rows(path, layer: str, rows) -> np.ndarray:
    """The given rows of ``features/<layer>``, in the given order, as stored; memory is the
    result plus one chunk-aligned range (:func:`featprobe.cache.reader.read_rows`)."""
    f, ds = open_layer(path, layer)
    with f:
        return read_dataset_rows(ds, rows, SCAN_BYTES)


class BlockRows:
    """A row source that reads an HDF5 layer in shuffled blocks: the training rows ``rows``
    (used in sorted order, labels ``y``) of ``path``/``layer``, through a shuffle buffer of
    ``buffer_bytes`` (rows as stored).
    """

    def __init__(self, path, layer: str, rows, y, buffer_bytes: int,
                 scan_bytes: int = SCAN_BYTES, progress: bool = False):
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        self.rows, self.y = rows[order], np.asarray(y)[order]
        self.path, self.layer, self.progress = Path(path), layer, progress
        self.epochs = 0  # epochs started (fills), for the progress bar
        self._f, self._ds = open_layer(path, layer)
        self.n, self.d = len(self.rows), self._ds.shape[1]
        self.dtype = self._ds.dtype
        self.row_bytes = self.d * self.dtype.itemsize
        self.scan_bytes = scan_bytes
        # Blocks: whole chunks of ~BLOCK_BYTES, but at least MIN_BLOCKS per buffer (then a
        # fraction of a chunk: HDF5 reads the chunk once into its cache and copies part).
        buffer_rows = max(1, int(buffer_bytes) // self.row_bytes)
        chunk = chunk_rows(self._ds)
        self.block_rows = span_rows(self._ds, BLOCK_BYTES)
        if self.block_rows * MIN_BLOCKS > buffer_rows:
            most = max(1, buffer_rows // MIN_BLOCKS)
            self.block_rows = chunk // -(-chunk // most) if most < chunk else most // chunk * chunk
        self.blocks = list(row_ranges(self.rows, self.block_rows, self._ds.shape[0]))
        self.buffer_rows = min(max(2 * self.block_rows, buffer_rows), self.n + self.block_rows)
        self._scratch = np.empty((self.block_rows, self.d), dtype=self.dtype)
        self._buf = None
        self.shift = self.scale = None  # optional standardisation (float32 [D] tensors)

    def close(self) -> None:
        self._buf = self._lab = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def buffer_nbytes(self) -> int:
        return self.buffer_rows * self.row_bytes

    def scan(self):
        """``(X_block, y_block)`` over all rows in file order, ~``scan_bytes`` at a time."""
        span = span_rows(self._ds, self.scan_bytes)
        out = np.empty((span, self.d), dtype=self.dtype)
        scratch = np.empty((span, self.d), dtype=self.dtype)
        for lo, hi, a, b in row_ranges(self.rows, span, self._ds.shape[0]):
            k = _read_selected(self._ds, lo, hi, self.rows[a:b], out, 0, scratch)
            yield out[:k], self.y[a:b]

    def check_finite(self) -> None:
        for xb, _ in self.scan():
            if not np.isfinite(xb).all():
                raise ValueError("Input X contains NaN or infinity.")

    def _buffers(self, min_rows: int = 0):
        if self._buf is None:
            self.buffer_rows = max(self.buffer_rows, self.block_rows + min_rows)
            self._buf = np.empty((self.buffer_rows, self.d), dtype=self.dtype)
            self._lab = np.empty(self.buffer_rows, dtype=np.int64)
        return self._buf, self._lab

    def fills(self, gen: torch.Generator, keep_multiple: int = 1):
        """One epoch: yield ``(filled, perm, use)`` per buffer fill, blocks in random order.

        ``_buf[perm[:use]]`` (labels: ``_lab``) are the rows to use now, ``use`` a multiple of
        ``keep_multiple`` except on the last fill; consume them before advancing the generator,
        which then moves the remaining rows to the buffer's front.
        """
        buf, lab = self._buffers(keep_multiple)
        order = torch.randperm(len(self.blocks), generator=gen).tolist()
        filled, i = 0, 0
        self.epochs += 1
        # shown when asked for, terminal or not (tqdm's disable=None hides it off a terminal)
        bar = tqdm(total=self.n, unit="row", disable=not self.progress, file=sys.stderr,
                   desc=f"out-of-core epoch {self.epochs}", dynamic_ncols=True, leave=False)
        while True:
            while i < len(order):
                lo, hi, a, b = self.blocks[order[i]]
                if filled + (b - a) > self.buffer_rows:
                    break
                _read_selected(self._ds, lo, hi, self.rows[a:b], buf, filled, self._scratch)
                lab[filled : filled + b - a] = self._targets[a:b]
                filled += b - a
                i += 1
            last = i == len(order)
            perm = torch.randperm(filled, generator=gen)
            use = filled if last else filled // keep_multiple * keep_multiple
            yield filled, perm, use
            bar.update(use)
            if last:
                break
            rest = perm[use:].numpy()
            buf[: len(rest)] = buf[rest]
            lab[: len(rest)] = lab[rest]
            filled = len(rest)
        bar.refresh()  # its total, before the next epoch's bar replaces it
        bar.close()

    def set_targets(self, y_idx) -> None:
        self._targets = np.asarray(y_idx, dtype=np.int64)

    def batches(self, gen: torch.Generator, batch_size: int, device: torch.device):
        """One epoch of minibatches drawn from shuffled buffer fills (see :meth:`fills`)."""
        gather = getattr(self, "_gather", None)  # kept across epochs
        for filled, perm, use in self.fills(gen, keep_multiple=batch_size):
            x = torch.from_numpy(self._buf[:filled])
            y = torch.from_numpy(self._lab[:filled])
            if device.type != "cpu":
                x, y, perm = x.to(device), y.to(device), perm.to(device)
            if gather is None:
                gather = self._gather = _Gather(batch_size, self.d, x.dtype, device, self.shift,
                                                self.scale)
            for idx in perm[:use].split(batch_size):
                yield gather(x, idx), y[idx]
