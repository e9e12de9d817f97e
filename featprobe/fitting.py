"""The fit stage: a head on cached features, on the fixed split, recorded in ``runs.jsonl``.

It reads only the cache (never images, never the backbone), so it runs in seconds and can be
repeated for every head, layer and seed. Every run appends one record to the runs log in the
cache's directory; ``featprobe compare`` reads them back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from featprobe.cache import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.runs import append_run, compute_metrics, majority_rate, make_record
from featprobe.splits import split as make_split

# The metadata a saved head carries so that `predict` can rebuild its exact feature extractor.
HEAD_META_KEYS = ("backbone", "weights", "weights_id", "weights_file", "weights_sha256", "dtype",
                  "preprocessing", "precision", "cache_key", "dataset_fingerprint")


def _cache(cache: FeatureCache | str | os.PathLike) -> FeatureCache:
    return cache if isinstance(cache, FeatureCache) else FeatureCache(cache)


def fit(
    cache: FeatureCache | str | os.PathLike,
    head: str = "logreg",
    layer: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    standardize: bool = False,
    sweep: bool = False,
    save: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike | None = None,
    record: bool = True,
    max_memory: str | int | None = None,
    progress: bool = False,
    **params: Any,
) -> dict:
    """Fit ``head`` on ``layer`` of a cache over the seeded stratified split; return the record.

    ``params`` go to the head (e.g. ``epochs=50``, ``C=0.1``); ``random_state`` defaults to
    ``seed`` where the head has one. With ``sweep=True`` a ``linear`` head trains a grid of
    learning rates × weight decays in one pass and ``logreg`` a grid of C, and the winner on
    val is recorded (every grid point is kept in ``record["sweep"]["grid"]``). The record is
    appended to ``runs.jsonl`` in ``runs_dir`` (default: the cache's directory).

    ``max_memory`` (bytes, or a size such as ``"2GB"``, ``"512MB"``, ``"1.5GiB"``; default:
    ``$FEATPROBE_MAX_MEMORY`` or half of the available RAM) bounds the feature data held in
    memory. When the split's rows would not fit, the head trains from the file in shuffled
    blocks (:mod:`featprobe.outofcore`; ``logreg``/``svm`` fall back to ``SGDClassifier``)
    and the record says so in ``out_of_core``. ``progress`` shows a bar per out-of-core epoch.
    """
    from featprobe import heads as registry
    from featprobe import outofcore

    budget = outofcore.resolve_budget(max_memory)
    c = _cache(cache)
    layer = c._layer(layer)
    s = make_split(c.ids, c.labels, val_fraction=val_fraction, seed=seed, valid=c.valid)
    est = registry.make_head(head, standardize=standardize, **params)
    inner = est.steps[-1][1] if standardize else est
    if "random_state" in inner.get_params() and "random_state" not in params:
        inner.set_params(random_state=seed)

    y_train, y_val = c.labels[s.train], c.labels[s.val]
    labels = list(range(len(c.classes)))
    if sweep and head not in ("linear", "logreg"):
        raise FeatprobeError(f"--sweep is available for the linear and logreg heads, not {head!r}")
    requested = est
    need = outofcore.in_memory_bytes(head, len(s.train) + len(s.val), c.shapes[layer][1],
                                     c.dtypes[layer].itemsize, standardize, inner.get_params(),
                                     len(c.classes), sweep)
    sweep_info, ooc = None, None
    if need > budget:
        t0 = time.perf_counter()
        out = outofcore.fit_out_of_core(c.path, layer, est, head, s.train, y_train, s.val,
                                        y_val, budget, standardize, sweep, seed,
                                        progress=progress)
        est, ooc = out["estimator"], out["info"]
        fit_seconds = out["info"].pop("fit_seconds", time.perf_counter() - t0)
        train_pred, val_pred = out["train_pred"], out["val_pred"]
        if out["sweep_result"] is not None:
            sweep_info = _sweep_record(out["sweep_result"])
    else:
        # read only the split's rows, in bounded blocks (never a second copy of the layer)
        X = outofcore.read_rows(c.path, layer, np.concatenate([s.train, s.val]))
        _require_finite(X, c, layer)
        X_train, X_val = X[: len(s.train)], X[len(s.train):]
        t0 = time.perf_counter()
        if sweep:
            est, sweep_info = _sweep(registry, head, inner, standardize, X_train, y_train,
                                     X_val, y_val, seed)
        else:
            est.fit(X_train, y_train)
        fit_seconds = time.perf_counter() - t0
        train_pred, val_pred = est.predict(X_train), est.predict(X_val)

    # the params asked for (an out-of-core logreg/svm is an SGDClassifier: see out_of_core)
    fallback = ooc is not None and "fallback" in ooc
    all_params = registry.head_params(requested if fallback else est)
    defaults = registry.HEADS[head].params()
    rec = make_record(
        kind="probe",
        cache=c.path.name,
        cache_path=str(c.path.resolve()),
        dataset_fingerprint=c.meta.get("dataset_fingerprint"),
        backbone=c.backbone,
        weights=c.meta.get("weights"),
        layer=layer,
        head=head,
        params={k: v for k, v in all_params.items() if k != "standardize"},
        params_set={k: v for k, v in all_params.items()
                    if k != "standardize" and defaults.get(k) != v},
        standardize=standardize,
        seed=seed,
        val_fraction=val_fraction,
        split_hash=s.hash,
        n_train=len(s.train),
        n_val=len(s.val),
        n_invalid=s.n_invalid,
        classes=c.classes,
        train=compute_metrics(y_train, train_pred, labels),
        val=compute_metrics(y_val, val_pred, labels),
        fit_seconds=round(fit_seconds, 4),
        sweep=sweep_info,
        out_of_core=ooc,
        majority_rate=majority_rate(y_train, y_val),
    )
    if save is not None:
        rec["saved_head"] = str(save_fitted(save, est, c, layer, rec))
    if record:
        append_run(runs_dir if runs_dir is not None else c.directory, rec)
    return rec


def _require_finite(X: np.ndarray, c: FeatureCache, layer: str) -> None:
    """NaN or inf (float16 storage overflows above 65504) would make the heads fail mid-fit."""
    bad = sum(int((~np.isfinite(X[i:i + 4096])).any(axis=1).sum())
              for i in range(0, len(X), 4096))
    if bad:
        raise FeatprobeError(
            f"{c.path.name}: features/{layer} has NaN or inf values in {bad} row(s); float16 "
            "storage overflows above 65504 (re-extract with --dtype float32), or the file is "
            "damaged (featprobe verify)"
        )


def _sweep(registry, head, inner, standardize, X_train, y_train, X_val, y_val, seed):
    """Train the head's grid together; return the winning estimator and the grid record."""
    scaler = None
    if standardize:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X_train)
        X_train, X_val = scaler.transform(X_train), scaler.transform(X_val)
    if head == "linear":
        p = inner.get_params()
        result = registry.sweep_linear(X_train, y_train, X_val, y_val, epochs=p["epochs"],
                                       batch_size=p["batch_size"], device=p["device"],
                                       random_state=seed)
    else:
        result = registry.sweep_logreg(X_train, y_train, X_val, y_val)
    best = result.best_estimator_
    if scaler is not None:
        from sklearn.pipeline import make_pipeline

        best = make_pipeline(scaler, best)
    return best, _sweep_record(result)


def _sweep_record(result) -> dict:
    scores = ("train_accuracy", "val_accuracy")
    won = {"params": {k: v for k, v in result.best.items() if k not in scores},
           **{k: result.best[k] for k in scores}}
    return {"grid": result.grid, "best": won}


def save_fitted(path: str | os.PathLike, est, cache: FeatureCache, layer: str, rec: dict) -> Path:
    """Save a fitted head with what ``predict`` needs to rebuild its features exactly."""
    from featprobe.headio import save_head

    meta = {k: cache.meta.get(k) for k in HEAD_META_KEYS}
    meta.update(classes=cache.classes, layer=layer, n_features=int(cache.shapes[layer][1]),
                head=rec["head"], split_hash=rec["split_hash"], run_id=rec["run_id"],
                val_accuracy=rec["val"]["accuracy"])
    return save_head(path, est, meta)
