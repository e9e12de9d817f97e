"""Out-of-core fitting: heads trained from the HDF5 cache under a memory budget.

When the split's rows would not fit the budget (``--max-memory``, default: half of the
available RAM), torch heads train from a :class:`~featprobe.probe.rows.BlockRows` source (a
shuffle buffer of chunk-aligned blocks); heads registered with an ``sgd:<loss>`` stand-in fit
``SGDClassifier.partial_fit`` on the same buffers, with a notice. The budget covers the buffer,
the blocks in flight, the minibatches and the head's weights and optimiser state.
"""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import torch
from sklearn.base import clone
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featprobe.cache.reader import iter_rows
from featprobe.errors import FeatprobeError
from featprobe.probe.registry import HEADS, HeadSpec, plain_params, split_pipeline
from featprobe.probe.rows import MIN_BLOCKS, SCAN_BYTES, BlockRows, open_layer
from featprobe.probe.sweeps import _result, grid_points, score_each, train_stacked
from featprobe.probe.torch_heads import _TorchHead

__all__ = ["default_budget", "fit_out_of_core", "in_memory_bytes", "parse_size", "resolve_budget"]

SGD_EPOCHS = 5  # passes of the SGDClassifier fallback
log = logging.getLogger("featprobe")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"512MB"``, ``"1.5GiB"``, ``"1000000"`` → bytes (case-insensitive; KB/MB/GB/TB and
    K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024); FeatprobeError otherwise or ≤ 0."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise FeatprobeError(f"bad memory size {text!r}; use e.g. 512MB, 2GB, 1.5GiB or a "
                                 "number of bytes")
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
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def model_bytes(head, d: int, n_classes: int, n_heads: int = 1) -> int:
    """Weights + gradient + two Adam moments of a torch head, float32 (0 for other heads)."""
    head, _ = split_pipeline(head)
    if not isinstance(head, _TorchHead):
        return 0
    return 16 * head.n_parameters(d, n_classes) * n_heads


def in_memory_bytes(est, n_rows: int, d: int, itemsize: int, n_classes: int,
                    n_heads: int = 1) -> int:
    """What the in-memory fit holds: the split's rows as stored, the standardised copy, the
    float64 copy scikit-learn heads make, the torch head's weights and optimiser state."""
    head, standardize = split_pipeline(est)
    data = n_rows * d * itemsize
    total = data * (2 if standardize else 1)
    if isinstance(head, _TorchHead):
        return total + model_bytes(head, d, n_classes, n_heads)
    return total + n_rows * d * 8  # lbfgs / liblinear / libsvm work on a float64 copy


def streaming_scaler(source: BlockRows) -> StandardScaler:
    """A ``StandardScaler`` fitted on the source's rows in one sequential pass (partial_fit
    on float32 blocks; scikit-learn accumulates in float64)."""
    scaler = StandardScaler()
    for xb, _ in source.scan():
        scaler.partial_fit(xb.astype(np.float32))
    return scaler


def _stream_predict(est, path, layer, rows, nbytes: int) -> np.ndarray:
    """``est.predict`` over ``rows`` (any order), read ~``nbytes`` at a time as float32."""
    out = None
    f, ds = open_layer(path, layer)
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
        raise FeatprobeError(f"--max-memory {_human(budget)} is too small for {what}: it needs "
                             f"at least {_human(weights + 4 * MIN_BLOCKS * row_bytes)} (weights "
                             f"and optimiser state {_human(weights)}); raise --max-memory")
    return left * 2 // 5


def _scan_bytes(budget: int) -> int:
    """Sequential reads (statistics, scoring): a float16 block read, selected, converted to
    float32, standardised and (for inference) to float64 takes ~12x its size."""
    return min(SCAN_BYTES, budget // 128)  # (at least 64 rows: see BlockRows / span_rows)


def fit_out_of_core(path, layer: str, est, spec: HeadSpec, train_rows, y_train, val_rows,
                    y_val, budget: int, sweep: bool, seed: int, progress: bool = True) -> dict:
    """Fit ``est`` (an unfitted registry head or StandardScaler pipeline) from the file; return
    ``{"estimator", "train_pred", "val_pred", "sweep_result", "info"}`` (``info``: the run
    record's ``out_of_core``)."""
    inner, standardize = split_pipeline(est)
    n_classes = len(np.unique(y_train))
    f, ds = open_layer(path, layer)
    with f:
        d, itemsize = ds.shape[1], ds.dtype.itemsize
    features = _human(len(train_rows) * d * itemsize)
    if spec.out_of_core is None:
        torch_ready = [n for n, s in HEADS.items() if s.out_of_core]
        raise FeatprobeError(f"head {spec.name!r} needs all features in memory ({features} of "
                             "them) and has no out-of-core variant; raise --max-memory or use "
                             f"{', '.join(torch_ready)}")
    if sweep and spec.out_of_core != "torch":
        raise FeatprobeError(f"--sweep for {spec.name} needs the features in memory; raise "
                             "--max-memory or fit single parameter values")
    n_heads = len(grid_points(spec.grid)) if sweep else 1
    weights = model_bytes(inner, d, n_classes, n_heads) or 8 * (d + 1) * n_classes
    buffer_bytes = _buffer_budget(budget, weights, d * itemsize, f"the {spec.name} head")
    scan = _scan_bytes(budget)
    info = {"max_memory": int(budget), "buffer_bytes": 0, "block_rows": 0,
            "estimator": f"featprobe.heads.{type(inner).__name__}"}
    sweep_result = None
    t0 = time.perf_counter()
    with BlockRows(path, layer, train_rows, y_train, buffer_bytes, scan, progress=progress) as src:
        info.update(buffer_bytes=src.buffer_nbytes(), block_rows=src.block_rows,
                    blocks=len(src.blocks))
        scaler = None
        if standardize:
            scaler = streaming_scaler(src)
            src.shift = torch.as_tensor(scaler.mean_, dtype=torch.float32)
            src.scale = torch.as_tensor(1 / scaler.scale_, dtype=torch.float32)
        if spec.out_of_core == "torch" and not sweep:
            fitted = inner.fit_rows(src, src.y)
        elif spec.out_of_core == "torch":
            fitted, sweep_result = _sweep_out_of_core(src, inner, spec, seed, scaler, train_rows,
                                                      y_train, val_rows, y_val)
        else:
            fitted = _sgd_fallback(src, spec.sgd_loss, inner.get_params(), seed)
            info.update(estimator="sklearn.linear_model.SGDClassifier",
                        fallback=f"SGDClassifier(loss={fitted.loss!r}, alpha={fitted.alpha:.3g}) "
                                 f"partial_fit, {SGD_EPOCHS} epochs",
                        sgd_params=plain_params(fitted))
            log.warning(f"note: {spec.name} on {features} of features over the {_human(budget)} "
                        f"memory budget: fitting {info['fallback']} instead")
        if scaler is not None:
            fitted = make_pipeline(scaler, fitted)
    info["fit_seconds"] = time.perf_counter() - t0  # training (and statistics) only
    train_pred = _stream_predict(fitted, path, layer, train_rows, scan)
    val_pred = _stream_predict(fitted, path, layer, val_rows, scan)
    return {"estimator": fitted, "train_pred": train_pred, "val_pred": val_pred,
            "sweep_result": sweep_result, "info": info}


def _sweep_out_of_core(src, inner, spec, seed, scaler, train_rows, y_train, val_rows, y_val):
    """The registered grid trained in one pass over the blocks, scored streaming."""
    proto = clone(inner).set_params(random_state=seed)
    proto.classes_ = np.unique(src.y)
    proto.n_features_in_ = src.d
    src.set_targets(np.searchsorted(proto.classes_, src.y))
    points = grid_points(spec.grid)
    fitted = train_stacked(proto, points, src)

    def blocks(rows, y):
        def scan():
            if not len(rows):
                return
            with BlockRows(src.path, src.layer, rows, y, 0, src.scan_bytes) as s:
                for xb, yb in s.scan():
                    xb = xb.astype(np.float32)
                    yield (scaler.transform(xb) if scaler is not None else xb), yb
        return scan

    result = _result(points, fitted, score_each(fitted, blocks(train_rows, y_train)),
                     score_each(fitted, blocks(val_rows, y_val)))
    return result.best_estimator_, result


def _sgd_fallback(src: BlockRows, loss: str, params: dict, seed: int) -> SGDClassifier:
    """``SGDClassifier.partial_fit`` on shuffled buffers with the stand-in ``loss``; ``alpha =
    1 / (C * n_train)`` matches ``C`` (LogisticRegression / LinearSVC sum the loss over rows)."""
    C = float(params.get("C", 1.0))
    sgd = SGDClassifier(loss=loss, alpha=1.0 / (C * src.n), random_state=seed, average=False)
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

