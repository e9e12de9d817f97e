"""The fit stage: a head on cached features, on the fixed split, recorded in ``runs.jsonl``.

It reads only the cache, so it runs in seconds for every head, layer and seed; every run
appends a record to the runs log in the cache's directory, which ``featprobe compare`` reads.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import make_pipeline

from featprobe.cache import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.files import output_path
from featprobe.probe import outofcore
from featprobe.probe.headfile import save_head
from featprobe.probe.registry import HEADS, head_params, make_head, spec_of, split_pipeline
from featprobe.probe.rows import non_finite_rows, read_rows
from featprobe.probe.sweeps import SCORES, grid_points, sweep_head
from featprobe.runs.records import append_run, compute_metrics, majority_rate, make_record
from featprobe.splits import split as make_split

log = logging.getLogger("featprobe")

# The metadata a saved head carries so that `predict` can rebuild its exact feature extractor.
HEAD_META_KEYS = ("backbone", "weights", "weights_id", "weights_file", "weights_sha256", "dtype",
                  "preprocessing", "precision", "cache_key", "dataset_fingerprint")


@dataclass(frozen=True)
class FitSettings:
    """Everything one fit is asked for (what ``featprobe fit``'s options say)."""

    head: str = "logreg"
    layer: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    standardize: bool = False
    sweep: bool = False
    max_memory: str | int | None = None
    params: dict = field(default_factory=dict)  # head parameters, e.g. {"epochs": 50}


def fit(cache: FeatureCache | str | os.PathLike, head: str = "logreg", layer: str | None = None,
        seed: int = 0, val_fraction: float = 0.1, standardize: bool = False, sweep: bool = False,
        save: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
        record: bool = True, max_memory: str | int | None = None, progress: bool = False,
        **params: Any) -> dict:
    """Fit ``head`` on ``layer`` of a cache over the seeded stratified split; return the record.

    ``params`` go to the head (e.g. ``epochs=50``, ``C=0.1``); ``random_state`` defaults to
    ``seed`` where the head has one. With ``sweep=True`` the head's registered grid (linear: a
    learning rate × weight decay grid trained in one pass; logreg: a grid of C) is fitted and
    the winner on val is recorded (every grid point is kept in ``record["sweep"]["grid"]``).
    The record is appended to ``runs.jsonl`` in ``runs_dir`` (default: the cache's directory).

    ``max_memory`` (bytes or a size such as ``"2GB"``; default: ``$FEATPROBE_MAX_MEMORY`` or
    half of the available RAM) bounds the features held in memory; past it the head trains from
    the file in shuffled blocks (``logreg``/``svm`` as an ``SGDClassifier``) and the record says
    so in ``out_of_core``. ``progress`` shows a bar per out-of-core epoch.
    """
    settings = FitSettings(head, layer, seed, val_fraction, standardize, sweep, max_memory, params)
    c = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if save is not None:
        output_path(save)  # its folder, before the fit
    rec, est = run_fit(c, settings, progress)
    try:
        if save is not None:
            rec["saved_head"] = str(save_fitted(save, est, c, rec["layer"], rec))
    finally:  # a head that could not be written does not cost the run its record
        if record:
            append_run(runs_dir if runs_dir is not None else c.directory, rec)
    return rec


def run_fit(c: FeatureCache, s: FitSettings, progress: bool = False) -> tuple[dict, Any]:
    """One fit as ``s`` says: the run record (not yet appended) and the fitted estimator."""
    budget = outofcore.resolve_budget(s.max_memory)
    spec = spec_of(s.head)
    layer = c._layer(s.layer)
    if not c.checksummed:
        log.warning(f"warning: {c.path.name} has no per-chunk checksums (made by featprobe "
                    "0.1.0): damage in its features goes unseen here; `featprobe verify` checks "
                    "them in full, re-extracting adds the checksums")
    split = make_split(c.ids, c.labels, val_fraction=s.val_fraction, seed=s.seed, valid=c.valid)
    est = make_head(s.head, standardize=s.standardize, **s.params)
    inner, _ = split_pipeline(est)
    if "random_state" in inner.get_params() and "random_state" not in s.params:
        inner.set_params(random_state=s.seed)
    if s.sweep and not spec.grid:
        with_grid = [n for n, h in HEADS.items() if h.grid]
        raise FeatprobeError(f"--sweep is available for the {' and '.join(with_grid)} heads, "
                             f"not {s.head!r}")

    y_train, y_val = c.labels[split.train], c.labels[split.val]
    requested, sweep_info, ooc, degenerate = est, None, None, None
    n_heads = len(grid_points(spec.grid)) if s.sweep else 1
    need = outofcore.in_memory_bytes(est, len(split.train) + len(split.val), c.shapes[layer][1],
                                     c.dtypes[layer].itemsize, len(c.classes), n_heads)
    if need > budget:
        t0 = time.perf_counter()
        out = outofcore.fit_out_of_core(c.path, layer, est, spec, split.train, y_train,
                                        split.val, y_val, budget, s.sweep, s.seed,
                                        progress=progress)
        est, ooc = out["estimator"], out["info"]
        fit_seconds = ooc.pop("fit_seconds", time.perf_counter() - t0)
        train_pred, val_pred = out["train_pred"], out["val_pred"]
        if out["sweep_result"] is not None:
            sweep_info = _sweep_record(out["sweep_result"])
    else:
        # read only the split's rows, in bounded blocks (never a second copy of the layer)
        X = read_rows(c.path, layer, np.concatenate([split.train, split.val]))
        _require_finite(X, c, layer)
        X_train, X_val = X[: len(split.train)], X[len(split.train):]
        degenerate = degenerate_features(X_train)
        if degenerate:
            hint = ("float16 storage rounds tiny features to 0: re-extract with --dtype float32"
                    if c.dtypes[layer] == np.float16 else "check the weights and the layer")
            log.warning(f"warning: {c.path.name} {layer}: {degenerate} over the training rows, "
                        f"so every head can only score the majority rate; {hint}")
        t0 = time.perf_counter()
        if s.sweep:
            est, sweep_info = _sweep(est, spec, X_train, y_train, X_val, y_val)
        else:
            est.fit(X_train, y_train)
        fit_seconds = time.perf_counter() - t0
        train_pred, val_pred = est.predict(X_train), est.predict(X_val)

    # the params asked for (an out-of-core logreg/svm is an SGDClassifier: see out_of_core)
    fallback = ooc is not None and "fallback" in ooc
    all_params = head_params(requested if fallback else est)
    defaults = spec.params()
    labels = list(range(len(c.classes)))
    rec = make_record(
        kind="probe", cache=c.path.name, cache_path=str(c.path.resolve()),
        dataset_fingerprint=c.meta.get("dataset_fingerprint"), backbone=c.backbone,
        weights=c.meta.get("weights"), layer=layer, head=s.head,
        params={k: v for k, v in all_params.items() if k != "standardize"},
        params_set={k: v for k, v in all_params.items()
                    if k != "standardize" and defaults.get(k) != v},
        standardize=s.standardize, seed=s.seed, val_fraction=s.val_fraction,
        split_hash=split.hash, n_train=len(split.train), n_val=len(split.val),
        n_invalid=split.n_invalid, classes=c.classes,
        train=compute_metrics(y_train, train_pred, labels),
        val=compute_metrics(y_val, val_pred, labels), fit_seconds=round(fit_seconds, 4),
        sweep=sweep_info, out_of_core=ooc, majority_rate=majority_rate(y_train, y_val),
        degenerate=degenerate,
    )
    return rec, est


def degenerate_features(X: np.ndarray) -> str | None:
    """What makes ``X`` useless to any head, or None: every value 0, or every column constant
    (non-finite values are refused before this)."""
    if X.size == 0:
        return None
    lo, hi = X.min(axis=0), X.max(axis=0)
    if not hi.any() and not lo.any():
        return "every feature value is 0"
    if (lo == hi).all():
        return f"all {X.shape[1]} features are constant"
    return None


def _require_finite(X: np.ndarray, c: FeatureCache, layer: str) -> None:
    """NaN or inf (float16 storage overflows above 65504) would make the heads fail mid-fit."""
    bad = non_finite_rows(X)
    if bad:
        raise FeatprobeError(f"{c.path.name}: features/{layer} has NaN or inf values in {bad} "
                             "row(s); float16 storage overflows above 65504 (re-extract with "
                             "--dtype float32), or the file is damaged (featprobe verify)")


def _sweep(est, spec, X_train, y_train, X_val, y_val):
    """Fit the head's registered grid; return the winning estimator and the grid record."""
    inner, standardize = split_pipeline(est)
    scaler = None
    if standardize:
        scaler = est.steps[0][1].fit(X_train)
        X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)
    result = sweep_head(inner, spec.grid, X_train, y_train, X_val, y_val)
    best = result.best_estimator_
    if scaler is not None:
        best = make_pipeline(scaler, best)
    return best, _sweep_record(result)


def _sweep_record(result) -> dict:
    won = {"params": {k: v for k, v in result.best.items() if k not in SCORES},
           **{k: result.best[k] for k in SCORES}}
    return {"grid": result.grid, "best": won}


def save_fitted(path: str | os.PathLike, est, cache: FeatureCache, layer: str, rec: dict) -> Path:
    """Save a fitted head with what ``predict`` needs to rebuild its features exactly."""
    meta = {k: cache.meta.get(k) for k in HEAD_META_KEYS}
    meta.update(classes=cache.classes, layer=layer, n_features=int(cache.shapes[layer][1]),
                head=rec["head"], split_hash=rec["split_hash"], run_id=rec["run_id"],
                val_accuracy=rec["val"]["accuracy"])
    return save_head(path, est, meta)
