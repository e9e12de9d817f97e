"""Out-of-core fitting: train heads from the HDF5 cache in shuffled blocks under a memory budget.

The fit stage normally loads the split's rows into memory. When they would not fit the budget
(``featprobe fit --max-memory``, default: half of the available RAM), :func:`fit_out_of_core`
trains instead from the file:

- **Reading.** The training rows (the split is over row indices; invalid rows are never read)
  are read in *blocks*: ranges of contiguous rows aligned to the dataset's HDF5 row chunks
  (~2 MiB each), so each read is a few whole chunks.
- **Shuffling.** Each epoch visits the blocks in a fresh random order and fills a *shuffle
  buffer* of many blocks; the buffer's rows are shuffled and cut into minibatches. Rows left
  over (fewer than a batch) stay in the buffer for the next fill. The trade-off: minibatches
  draw from ``buffer / block`` random blocks rather than from the whole set, so rows that are
  stored next to each other (e.g. one class per folder) are somewhat correlated within a
  buffer; with hundreds of blocks per buffer this costs no measurable accuracy (tested
  against in-memory training), with a handful it would.
- **Conversion.** The buffer holds rows as stored (float16); minibatch slices are converted to
  float32 as in memory, and standardised on the fly with ``--standardize`` (mean and variance
  from one streaming pass before training).
- **Scoring** of train and val rows is streamed the same way.
- ``logreg`` and ``svm`` have no such loop: over budget they fall back to
  ``SGDClassifier(loss="log_loss" | "hinge").partial_fit`` on the same shuffled buffers, with a
  one-line notice on stderr and ``record["out_of_core"]``.

**The budget** bounds the feature data held in memory: the shuffle buffer, the blocks being
read and converted, the float32 minibatch buffers, and the head's weights and optimiser state.
The buffer gets 40% of what remains after the weights; the rest is headroom. The test
(tests/test_outofcore.py) checks the process's peak RSS growth over its post-import baseline
stays under the budget.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from featprobe.cache import _chunk_rows, _runs, _span, iter_rows
from featprobe.cache import read_rows as cache_read_rows
from featprobe.errors import FeatprobeError

__all__ = [
    "BlockRows",
    "default_budget",
    "fit_out_of_core",
    "in_memory_bytes",
    "parse_size",
    "read_rows",
    "resolve_budget",
]

BLOCK_BYTES = 2 << 20  # target size of one read: whole HDF5 row chunks, about 2 MiB
MIN_BLOCKS = 16  # a shuffle buffer holds at least this many blocks (smaller blocks if need be)
SCAN_BYTES = 32 << 20  # sequential passes (statistics, scoring) read at most this at a time
SGD_EPOCHS = 5  # passes of the SGDClassifier fallback

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"512MB"``, ``"2GB"``, ``"1.5GiB"``, ``"1000000"`` → bytes.

    KB/MB/GB/TB (and K/M/G/T) are powers of 1000; KiB/MiB/GiB/TiB powers of 1024;
    case-insensitive. Raises :class:`FeatprobeError` for anything else or a size ≤ 0.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise FeatprobeError(
                f"bad memory size {text!r}; use e.g. 512MB, 2GB, 1.5GiB or a number of bytes"
            )
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise FeatprobeError(f"memory size must be positive; got {text!r}")
    return value


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """``$FEATPROBE_MAX_MEMORY`` if set, else half of MemAvailable (2 GiB if unknown)."""
    env = os.environ.get("FEATPROBE_MAX_MEMORY")
    if env:
        return parse_size(env)
    avail = _mem_available()
    return avail // 2 if avail else 2 << 30


def resolve_budget(max_memory: str | int | None) -> int:
    return default_budget() if max_memory is None else parse_size(max_memory)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def model_bytes(head: str, params: dict, d: int, n_classes: int, n_heads: int = 1) -> int:
    """Weights + gradient + two Adam moments of a torch head, float32."""
    if head == "mlp":
        h = int(params.get("hidden", 4096))
        n = d * h + h + h * n_classes + n_classes
    elif head == "linear":
        n = (d + 1) * n_classes * n_heads
    else:
        return 0
    return 16 * n


def in_memory_bytes(head: str, n_rows: int, d: int, itemsize: int, standardize: bool,
                    params: dict, n_classes: int, sweep: bool = False) -> int:
    """What the in-memory fit holds: the split's rows as stored, the standardised copy, the
    float64 copy scikit-learn heads make, the torch head's weights and optimiser state."""
    data = n_rows * d * itemsize
    total = data * (2 if standardize else 1)
    if head in ("linear", "mlp"):
        total += model_bytes(head, params, d, n_classes, 12 if sweep else 1)
    else:
        total += n_rows * d * 8  # lbfgs / liblinear / libsvm work on a float64 copy
    return total


# --------------------------------------------------------------------------- reading


def _open(path, layer):
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
        ds.read_direct(out, np.s_[lo:hi], np.s_[at : at + k])
    else:
        ds.read_direct(scratch, np.s_[lo:hi], np.s_[0 : hi - lo])
        np.take(scratch, rows - lo, axis=0, out=out[at : at + k])
    return k


def read_rows(path, layer: str, rows) -> np.ndarray:
    """The given rows of ``features/<layer>``, in the given order, as stored.

    Reads chunk-aligned ranges of ~32 MiB (:func:`featprobe.cache.read_rows`), so memory is the
    result plus one range (not a copy of the whole dataset).
    """
    f, ds = _open(path, layer)
    with f:
        return cache_read_rows(ds, rows, SCAN_BYTES)


class BlockRows:
    """A row source for the torch training loop that reads an HDF5 layer in shuffled blocks.

    Parameters
    ----------
    path, layer
        The cache file and layer.
    rows : array of int
        The rows to train on (e.g. the split's train rows); used in sorted order.
    y : array
        Their labels, aligned with ``rows``.
    buffer_bytes : int
        Size of the shuffle buffer (rows as stored).
    """

    def __init__(self, path, layer: str, rows, y, buffer_bytes: int,
                 scan_bytes: int = SCAN_BYTES, progress: bool = False):
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        self.rows, self.y = rows[order], np.asarray(y)[order]
        self.path, self.layer, self.progress = Path(path), layer, progress
        self._f, self._ds = _open(path, layer)
        self.n, self.d = len(self.rows), self._ds.shape[1]
        self.dtype = self._ds.dtype
        self.row_bytes = self.d * self.dtype.itemsize
        self.scan_bytes = scan_bytes
        # Blocks: whole chunks of ~BLOCK_BYTES, but at least MIN_BLOCKS per buffer (then a
        # fraction of a chunk: HDF5 reads the chunk once into its cache and copies part).
        buffer_rows = max(1, int(buffer_bytes) // self.row_bytes)
        chunk = _chunk_rows(self._ds)
        self.block_rows = _span(self._ds, BLOCK_BYTES)
        if self.block_rows * MIN_BLOCKS > buffer_rows:
            most = max(1, buffer_rows // MIN_BLOCKS)
            self.block_rows = chunk // -(-chunk // most) if most < chunk else most // chunk * chunk
        self.blocks = list(_runs(self.rows, self.block_rows, self._ds.shape[0]))
        self.buffer_rows = min(max(2 * self.block_rows, buffer_rows), self.n + self.block_rows)
        self._scratch = np.empty((self.block_rows, self.d), dtype=self.dtype)
        self._buf = self.feeder = None
        self.shift = self.scale = None  # optional standardisation (float32 [D] tensors)

    def close(self) -> None:
        self._buf = self._lab = self.feeder = None  # the feeder holds a view of the buffer
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def buffer_nbytes(self) -> int:
        return self.buffer_rows * self.row_bytes

    # ----- sequential passes

    def scan(self):
        """``(X_block, y_block)`` over all rows in file order, ~``scan_bytes`` at a time."""
        span = _span(self._ds, self.scan_bytes)
        out = np.empty((span, self.d), dtype=self.dtype)
        scratch = np.empty((span, self.d), dtype=self.dtype)
        for lo, hi, a, b in _runs(self.rows, span, self._ds.shape[0]):
            k = _read_selected(self._ds, lo, hi, self.rows[a:b], out, 0, scratch)
            yield out[:k], self.y[a:b]

    def check_finite(self) -> None:
        for xb, _ in self.scan():
            if not np.isfinite(xb).all():
                raise ValueError("Input X contains NaN or infinity.")

    # ----- shuffled passes

    def _buffers(self, min_rows: int = 0):
        if self._buf is None:
            self.buffer_rows = max(self.buffer_rows, self.block_rows + min_rows)
            self._buf = np.empty((self.buffer_rows, self.d), dtype=self.dtype)
            self._lab = np.empty(self.buffer_rows, dtype=np.int64)
        return self._buf, self._lab

    def fills(self, gen: torch.Generator, keep_multiple: int = 1):
        """One epoch: yield ``(filled, perm, last)`` per buffer fill, blocks in random order.

        ``buf[perm[:use]]`` are the rows to use now, with ``use`` a multiple of
        ``keep_multiple`` except on the last fill; the caller must consume them before
        advancing the generator, which then moves the remaining rows to the buffer's front.
        Labels are class indices in ``self._lab`` (set by :meth:`set_targets`).
        """
        buf, lab = self._buffers(keep_multiple)
        order = torch.randperm(len(self.blocks), generator=gen).tolist()
        filled, i = 0, 0
        from tqdm import tqdm

        bar = tqdm(total=self.n, unit="row", leave=False, disable=not self.progress or None,
                   file=sys.stderr, desc="out-of-core epoch")
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
        bar.close()

    def set_targets(self, y_idx) -> None:
        self._targets = np.asarray(y_idx, dtype=np.int64)

    # ----- the training loop's row-source protocol (see featprobe.heads._ArrayRows)

    def bind(self, y_idx, n_classes: int, slice_rows: int, device) -> None:
        from featprobe.heads import _Feeder

        self.set_targets(y_idx)
        self.n_classes, self.device = n_classes, device
        dummy = torch.from_numpy(np.zeros((1, self.d), dtype=self.dtype))
        self.feeder = _Feeder(dummy, None, slice_rows, device)
        if self.shift is not None:
            self.feeder.shift = self.shift.to(device)
            self.feeder.scale = self.scale.to(device)

    def epoch(self, gen: torch.Generator, batch_size: int, slice_rows: int):
        from featprobe.heads import _onehot_t

        for filled, perm, use in self.fills(gen, keep_multiple=batch_size):
            buf, lab = self._buf, self._lab
            x = torch.from_numpy(buf[:filled])
            self.feeder.X = x if self.device.type == "cpu" else x.to(self.device)
            onehot = _onehot_t(lab[:filled], self.n_classes, self.device)
            perm = perm.to(self.device)
            for idx in perm[:use].split(batch_size):
                yield idx.shape[0], (self.feeder.rows(p, onehot) for p in idx.split(slice_rows))


# --------------------------------------------------------------------------- fitting


def streaming_scaler(source: BlockRows):
    """A ``StandardScaler`` fitted on the source's rows in one sequential pass (partial_fit
    on float32 blocks; scikit-learn accumulates in float64)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    for xb, _ in source.scan():
        scaler.partial_fit(xb.astype(np.float32))
    return scaler


def _apply_scaler(source: BlockRows, scaler) -> None:
    source.shift = torch.as_tensor(scaler.mean_, dtype=torch.float32)
    source.scale = torch.as_tensor(1 / scaler.scale_, dtype=torch.float32)


def _stream_predict(est, path, layer, rows, nbytes: int) -> np.ndarray:
    """``est.predict`` over ``rows`` (any order), read ~``nbytes`` at a time as float32."""
    out = None
    f, ds = _open(path, layer)
    with f:
        if not len(rows):
            return np.empty(0, dtype=np.int64)
        for where, block in iter_rows(ds, rows, nbytes):
            pred = est.predict(block.astype(np.float32))
            if out is None:
                out = np.empty(len(rows), dtype=pred.dtype)
            out[where] = pred
    return out


def _buffer_budget(budget: int, weights: int, row_bytes: int, what: str) -> int:
    """40% of what the budget leaves after the weights; the rest is headroom (read blocks,
    float32 minibatches, statistics and scoring passes, allocator slack)."""
    left = budget - weights
    if left < 4 * MIN_BLOCKS * row_bytes:
        raise FeatprobeError(
            f"--max-memory {_human(budget)} is too small for {what}: it needs at least "
            f"{_human(weights + 4 * MIN_BLOCKS * row_bytes)} (weights and optimiser state "
            f"{_human(weights)}); raise --max-memory"
        )
    return left * 2 // 5


def _scan_bytes(budget: int) -> int:
    """Sequential reads (statistics, scoring): a float16 block read, selected, converted to
    float32, standardised and (for inference) to float64 takes ~12x its size."""
    return min(SCAN_BYTES, budget // 128)  # (at least 64 rows: see BlockRows / _span)


def fit_out_of_core(path, layer: str, est, head: str, train_rows, y_train, val_rows,
                    y_val, budget: int, standardize: bool, sweep: bool, seed: int,
                    progress: bool = True) -> dict:
    """Fit ``est`` (an unfitted registry head or StandardScaler pipeline) from the file.

    Returns ``{"estimator", "train_pred", "val_pred", "sweep_result", "info"}``; ``info``
    is what goes into the run record's ``out_of_core``.
    """
    from sklearn.pipeline import make_pipeline

    inner = est.steps[-1][1] if standardize else est
    n_classes = len(np.unique(y_train))
    f, ds = _open(path, layer)
    with f:
        d, itemsize = ds.shape[1], ds.dtype.itemsize
    params = inner.get_params()
    if head in ("linear", "mlp"):
        weights = model_bytes(head, params, d, n_classes, 12 if sweep else 1)
    elif head in ("logreg", "svm"):
        if sweep:
            raise FeatprobeError(
                "--sweep for logreg needs the features in memory; raise --max-memory or fit "
                "single values of C"
            )
        weights = 8 * (d + 1) * n_classes
    else:
        raise FeatprobeError(
            f"head {head!r} needs all features in memory "
            f"({_human(len(train_rows) * d * itemsize)} of them) and has no out-of-core "
            f"variant; raise --max-memory or use linear, mlp, logreg or svm"
        )
    buffer_bytes = _buffer_budget(budget, weights, d * itemsize, f"the {head} head")
    scan = _scan_bytes(budget)
    info = {"max_memory": int(budget), "buffer_bytes": 0, "block_rows": 0,
            "estimator": f"featprobe.heads.{type(inner).__name__}"}
    sweep_result = None
    t0 = time.perf_counter()
    with BlockRows(path, layer, train_rows, y_train, buffer_bytes, scan,
                   progress=progress) as src:
        info.update(buffer_bytes=src.buffer_nbytes(), block_rows=src.block_rows,
                    blocks=len(src.blocks))
        scaler = None
        if standardize:
            scaler = streaming_scaler(src)
            _apply_scaler(src, scaler)
        if head in ("linear", "mlp") and not sweep:
            inner._fit_source(src, src.y)
            fitted = make_pipeline(scaler, inner) if scaler is not None else inner
        elif head == "linear":
            fitted, sweep_result = _sweep_out_of_core(src, inner, seed, scaler, train_rows,
                                                      y_train, val_rows, y_val)
        else:
            sgd = _sgd_fallback(src, head, params, seed)
            fitted = make_pipeline(scaler, sgd) if scaler is not None else sgd
            info.update(estimator="sklearn.linear_model.SGDClassifier",
                        fallback=f"SGDClassifier(loss={sgd.loss!r}, alpha={sgd.alpha:.3g}) "
                                 f"partial_fit, {SGD_EPOCHS} epochs",
                        sgd_params={k: v for k, v in sgd.get_params().items()
                                    if isinstance(v, (int, float, str, bool, type(None)))})
            print(f"note: {head} on {_human(len(train_rows) * d * itemsize)} of features over "
                  f"the {_human(budget)} memory budget: fitting {info['fallback']} instead",
                  file=sys.stderr)
    info["fit_seconds"] = time.perf_counter() - t0  # training (and statistics) only
    train_pred = _stream_predict(fitted, path, layer, train_rows, scan)
    val_pred = _stream_predict(fitted, path, layer, val_rows, scan)
    return {"estimator": fitted, "train_pred": train_pred, "val_pred": val_pred,
            "sweep_result": sweep_result, "info": info}


def _sweep_out_of_core(src, inner, seed, scaler, train_rows, y_train, val_rows, y_val):
    from featprobe.heads import _sweep_result, _sweep_scorer, _sweep_setup

    p = inner.get_params()
    proto, points = _sweep_setup((1e-4, 3e-4, 1e-3, 3e-3), (0, 1e-4, 1e-2), p["epochs"],
                                 p["batch_size"], p["device"], seed)
    y_idx = proto._set_classes(src.y)
    proto.n_features_in_ = src.d
    weights, curve = proto._train(src, y_idx, [q[0] for q in points], [q[1] for q in points])
    correct = _sweep_scorer(proto, weights)

    def acc(rows, y):
        rows, y = np.asarray(rows), np.asarray(y)
        total = np.zeros(len(points))
        if not len(rows):
            return total
        with BlockRows(src.path, src.layer, rows, y, 0, src.scan_bytes) as s:
            for xb, yb in s.scan():
                xb = xb.astype(np.float32)
                if scaler is not None:
                    xb = scaler.transform(xb)
                total += correct(xb, yb)
        return total / len(rows)

    result = _sweep_result(proto, points, weights, curve, acc(train_rows, y_train),
                           acc(val_rows, y_val))
    best = result.best_estimator_
    if scaler is not None:
        from sklearn.pipeline import make_pipeline

        best = make_pipeline(scaler, best)
    return best, result


def _sgd_fallback(src: BlockRows, head: str, params: dict, seed: int):
    """``SGDClassifier.partial_fit`` on shuffled buffers: log loss for logreg, hinge for svm.

    ``alpha = 1 / (C * n_train)`` matches the regularisation of ``C`` in LogisticRegression /
    LinearSVC (which sum the loss over rows where SGD averages it).
    """
    from sklearn.linear_model import SGDClassifier

    C = float(params.get("C", 1.0))
    sgd = SGDClassifier(loss="log_loss" if head == "logreg" else "hinge",
                        alpha=1.0 / (C * src.n), random_state=seed, average=False)
    classes = np.unique(src.y)
    src.set_targets(np.searchsorted(classes, src.y))
    gen = torch.Generator().manual_seed(seed)
    step = max(256, src.scan_bytes // src.row_bytes)  # rows per partial_fit call
    shift = None if src.shift is None else src.shift.numpy()
    scale = None if src.scale is None else src.scale.numpy()
    for _ in range(SGD_EPOCHS):
        for _filled, perm, use in src.fills(gen):
            buf, lab = src._buf, src._lab
            idx = perm[:use].numpy()
            for s in range(0, use, step):
                part = idx[s : s + step]
                xb = buf[part].astype(np.float32)
                if shift is not None:
                    xb -= shift
                    xb *= scale
                sgd.partial_fit(xb, classes[lab[part]], classes=classes)
    return sgd


def describe(info: dict) -> str:
    """One line for the CLI."""
    return (f"out-of-core: budget {_human(info['max_memory'])}, shuffle buffer "
            f"{_human(info['buffer_bytes'])}, blocks of {info['block_rows']} rows")

