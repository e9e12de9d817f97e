"""The fit stage: a head on cached features, on the fixed split, recorded in ``runs.jsonl``.

It reads only the cache, so it runs in seconds for every head, layer and seed; every run
appends a record to the runs log in the cache's directory, which ``featprobe compare`` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from featprobe.cache import FeatureCache
from featprobe.data import image_digest
from featprobe.errors import FeatprobeError
from featprobe.files import output_path
from featprobe.probe import outofcore
from featprobe.probe.headfile import save_head
from featprobe.probe.registry import (
    HEADS,
    HeadSpec,
    default_random_state,
    head_params,
    make_head,
    plain_params,
    spec_of,
    split_pipeline,
    with_preprocessing,
)
from featprobe.probe.rows import non_finite_rows, read_rows
from featprobe.probe.selection import capped_grid, select
from featprobe.probe.sweeps import grid_points, sweep_head
from featprobe.runs.records import (
    append_run,
    compute_metrics,
    correct_mask,
    majority_rate,
    make_record,
    recorded_run,
    val_outputs,
)
from featprobe.splits import split as make_split

log = logging.getLogger("featprobe")

# The metadata a saved head carries so that `predict` can rebuild its exact feature extractor.
HEAD_META_KEYS = ("backbone", "weights", "weights_id", "weights_file", "weights_sha256", "dtype",
                  "preprocessing", "precision", "cache_key", "dataset_fingerprint")


@dataclass(frozen=True)
class FitSettings:
    """Everything one fit is asked for (what ``featprobe fit``'s options say). ``head`` is a
    registry name or an unfitted scikit-learn classifier."""

    head: Any = "logreg"
    layer: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    standardize: bool = False
    sweep: bool = False
    max_memory: str | int | None = None
    params: dict = field(default_factory=dict)  # head parameters, e.g. {"epochs": 50}
    l2_normalize: bool = False


class FitResult(dict):
    """A fit's run record (this dict, as appended to runs.jsonl) with the fitted ``estimator``;
    ``duplicate_of`` names the recorded run this one repeats (then it was not appended again)."""

    def __init__(self, record: dict, estimator: Any = None, duplicate_of: str | None = None):
        super().__init__(record)
        self.estimator, self.duplicate_of = estimator, duplicate_of

    @property
    def record(self) -> dict:
        return dict(self)


def fit(cache: FeatureCache | str | os.PathLike, head: Any = "logreg", layer: str | None = None,
        seed: int = 0, val_fraction: float = 0.1, standardize: bool = False, sweep: bool = False,
        save: str | os.PathLike | None = None, runs_dir: str | os.PathLike | None = None,
        record: bool = True, max_memory: str | int | None = None, progress: bool = False,
        l2_normalize: bool = False, seeds: Iterable[int] | None = None, force: bool = False,
        skip_recorded: bool = False, **params: Any) -> FitResult | list[FitResult]:
    """Fit ``head`` on ``layer`` of a cache over the seeded stratified split; return a
    :class:`FitResult` (the run record, with ``.estimator``), or one per seed of ``seeds``.

    ``head``: a registry name (``featprobe heads``) or any unfitted scikit-learn classifier.
    ``params`` go to a registry head (e.g. ``epochs=50``, ``C=0.1``); ``random_state`` defaults
    to ``seed`` where the head has one. ``sweep=True`` fits the head's registered grid and
    chooses on an inner split of the training rows (``knn`` always chooses its ``k`` so): the
    val rows, which score the run, play no part in the choice (docs/heads.md). The record is
    appended to ``runs.jsonl`` in ``runs_dir`` (default: the cache's directory), unless the
    same run (configuration and seed) is recorded there already and ``force`` is False; with
    ``skip_recorded`` such a run is not even fitted (its recorded result comes back, with
    ``estimator`` None) — what ``featprobe fit`` does.

    ``max_memory`` (bytes or a size such as ``"2GB"``; default: ``$FEATPROBE_MAX_MEMORY`` or
    half of the available RAM) bounds the features held in memory; past it the head trains from
    the file in shuffled blocks (``logreg``/``svm`` as an ``SGDClassifier``) and the record says
    so in ``out_of_core``. ``progress`` shows a bar per out-of-core epoch.
    """
    c = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if seeds is not None:
        seeds = list(seeds)
        if save is not None and len(seeds) > 1:
            raise FeatprobeError("--save keeps one head: fit the seed you want with --seed N "
                                 "--save PATH")
        return [fit(c, head, layer, s, val_fraction, standardize, sweep, save, runs_dir, record,
                    max_memory, progress, l2_normalize, None, force, skip_recorded, **params)
                for s in seeds]
    settings = FitSettings(head, layer, seed, val_fraction, standardize, sweep, max_memory, params,
                           l2_normalize)
    where = runs_dir if runs_dir is not None else c.directory
    key = run_key(c, settings)[1]
    earlier = recorded_run(where, key) if record and not force else None
    if earlier is not None and skip_recorded and save is None:
        return FitResult(earlier, None, earlier["run_id"])
    if save is not None:
        output_path(save)  # its folder, before the fit
    rec, est = run_fit(c, settings, progress)
    try:
        if save is not None:
            rec["saved_head"] = str(save_fitted(save, est, c, rec["layer"], rec))
    finally:  # a head that could not be written does not cost the run its record
        if record and earlier is None:
            append_run(where, rec)
    return FitResult(rec, est, earlier["run_id"] if earlier else None)


def run_key(c: FeatureCache, s: FitSettings) -> tuple[str, str]:
    """``(config_key, run_key)``: what a run measures (cache, layer, head and the parameters
    asked, preprocessing, selection, val fraction), and that with the seed. Two runs with the
    same run_key are the same measurement: ``runs.jsonl`` holds it once."""
    spec, _ = _head(s)  # also checks the head and its params, before fit touches any file
    config = {"cache": c.meta.get("cache_key") or c.path.name, "layer": c._layer(s.layer),
              "head": spec.name, "params": _asked(s), "standardize": s.standardize,
              "l2_normalize": s.l2_normalize, "sweep": s.sweep, "val_fraction": s.val_fraction}
    if s.max_memory is not None:  # a budget may swap logreg/svm for an SGDClassifier
        config["max_memory"] = str(s.max_memory)
    config_key = _digest(config)
    return config_key, _digest({"config": config_key, "seed": s.seed})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _head(s: FitSettings) -> tuple[HeadSpec, Any]:
    """The head's spec and an unfitted estimator (behind its preprocessing)."""
    if isinstance(s.head, str):
        est = make_head(s.head, standardize=s.standardize, l2_normalize=s.l2_normalize,
                        **s.params)
        return spec_of(s.head), est
    if not (hasattr(s.head, "fit") and hasattr(s.head, "predict") and
            hasattr(s.head, "get_params")):
        raise FeatprobeError(f"head must be a registered name ({', '.join(HEADS)}) or a "
                             f"scikit-learn classifier, not {type(s.head).__name__}")
    if s.params:
        raise FeatprobeError("params go to registered heads; set them on your estimator")
    spec = HeadSpec(f"sklearn:{type(s.head).__name__}", type(s.head), "a user's estimator")
    return spec, with_preprocessing(clone(s.head), s.standardize, s.l2_normalize)


def _asked(s: FitSettings) -> dict:  # the params asked for (a user's estimator: all its own)
    return dict(s.params) if isinstance(s.head, str) else plain_params(s.head)


def run_fit(c: FeatureCache, s: FitSettings, progress: bool = False) -> tuple[dict, Any]:
    """One fit as ``s`` says: the run record (not yet appended) and the fitted estimator."""
    budget = outofcore.resolve_budget(s.max_memory)
    spec, est = _head(s)
    layer = c._layer(s.layer)
    if not c.checksummed:
        log.warning(f"warning: {c.path.name} has no per-chunk checksums (made by featprobe "
                    "0.1.0): damage in its features goes unseen here; `featprobe verify` checks "
                    "them in full, re-extracting adds the checksums")
    split = make_split(c.ids, c.labels, val_fraction=s.val_fraction, seed=s.seed, valid=c.valid)
    default_random_state(est, s.seed, s.params)
    if s.sweep and not spec.grid:
        with_grid = [n for n, h in HEADS.items() if h.grid]
        raise FeatprobeError(f"--sweep is available for the {', '.join(with_grid)} heads, "
                             f"not {spec.name!r}")
    selecting = bool(spec.grid) and (s.sweep or spec.always_selects)

    y_train, y_val = c.labels[split.train], c.labels[split.val]
    requested, sweep_info, ooc, degenerate = est, None, None, None
    n_heads = len(grid_points(spec.grid)) if selecting else 1
    need = outofcore.in_memory_bytes(est, len(split.train) + len(split.val), c.shapes[layer][1],
                                     c.dtypes[layer].itemsize, len(c.classes), n_heads)
    t0 = time.perf_counter()
    unconverged: list[tuple[str, str]] = []  # (which fit, the library's message)
    if need > budget:
        if s.l2_normalize:
            raise FeatprobeError("--l2-normalize needs the features in memory; raise "
                                 "--max-memory")
        if selecting:
            with noting_convergence(unconverged, "grid"):
                est, sweep_info = select(c, split, spec, est, s.seed, lambda tr, ytr, va, yva:
                                         outofcore.fit_out_of_core(
                                             c.path, layer, est, spec, tr, ytr, va, yva, budget,
                                             True, s.seed, progress)["sweep_result"])
        with noting_convergence(unconverged, "scored"):
            out = outofcore.fit_out_of_core(c.path, layer, est, spec, split.train, y_train,
                                            split.val, y_val, budget, False, s.seed,
                                            progress=progress)
        est, ooc = out["estimator"], out["info"]
        ooc.pop("fit_seconds", None)
        train_pred, val_pred = out["train_pred"], out["val_pred"]
        val_conf = None  # streamed rows: no second pass for probabilities
        fit_seconds = time.perf_counter() - t0
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
        if selecting:
            with noting_convergence(unconverged, "grid"):
                est, sweep_info = select(c, split, spec, est, s.seed, lambda tr, ytr, va, yva:
                                         _sweep(est, spec, X_train[tr], ytr, X_train[va], yva),
                                         positions=True)
        with noting_convergence(unconverged, "scored"):
            est.fit(X_train, y_train)
        train_pred, val_pred = est.predict(X_train), est.predict(X_val)
        fit_seconds = time.perf_counter() - t0
        val_conf = confidence(est, X_val, val_pred)

    # the params asked for (an out-of-core logreg/svm is an SGDClassifier: see out_of_core)
    fallback = ooc is not None and "fallback" in ooc
    all_params = head_params(requested if fallback else est)
    defaults = spec.params() if isinstance(s.head, str) else {}
    labels = list(range(len(c.classes)))
    if unconverged:
        _warn_unconverged(spec.name, unconverged, 1 + len(sweep_info["grid"] if sweep_info else []))
    config_key, key = run_key(c, s)
    rec = make_record(
        kind="probe", cache=c.path.name, cache_path=str(c.path.resolve()),
        dataset_fingerprint=c.meta.get("dataset_fingerprint"), backbone=c.backbone,
        weights=c.meta.get("weights"), layer=layer, head=spec.name,
        params={k: v for k, v in all_params.items() if k not in _PREPROCESSING},
        params_set={k: v for k, v in all_params.items()
                    if k not in _PREPROCESSING and defaults.get(k) != v},
        standardize=s.standardize, l2_normalize=s.l2_normalize, seed=s.seed,
        val_fraction=s.val_fraction, split_hash=split.hash, n_train=len(split.train),
        n_val=len(split.val), n_invalid=split.n_invalid, classes=c.classes,
        train=compute_metrics(y_train, train_pred, labels),
        val=compute_metrics(y_val, val_pred, labels), fit_seconds=round(fit_seconds, 4),
        sweep=sweep_info, out_of_core=ooc, majority_rate=majority_rate(y_train, y_val),
        val_correct=correct_mask(y_val, val_pred), config_key=config_key, run_key=key,
        **val_outputs(val_pred, val_conf),
        params_asked=_asked(s),
        degenerate=degenerate, converged=not any(w == "scored" for w, _ in unconverged),
    )
    return rec, est


@contextmanager
def noting_convergence(notes: list[tuple[str, str]], which: str):
    """Collect the ConvergenceWarnings of the fits inside as ``(which, message)`` in ``notes``
    (scikit-learn prints two lines naming its own file once per grid point; fit says it once,
    in one line, and records it); other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        yield
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            notes.append((which, " ".join(str(w.message).split())))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn_unconverged(head: str, notes: list[tuple[str, str]], n_fits: int) -> None:
    fits = {w for w, _ in notes}
    n = sum(w == "grid" for w, _ in notes) + ("scored" in fits)
    where = "the scored fit" if n == 1 and "scored" in fits else (
        f"{n} of its {n_fits} fits" + (", the scored one among them" * ("scored" in fits)))
    msgs = "; ".join(dict.fromkeys(m.rstrip(".") for _, m in notes))
    log.warning(f"warning: {head} did not converge in {where} ({msgs}); its scores stand as "
                "recorded" + (", with converged: false" if "scored" in fits else ""))


_PREPROCESSING = ("standardize", "l2_normalize")


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


def confidence(est, X_val: np.ndarray, val_pred: np.ndarray) -> np.ndarray | None:
    """The probability of each val row's predicted class (None: the head has none); the
    record's ``val_confidence``, and what the report shows of a refitted head."""
    if not hasattr(est, "predict_proba") or not len(X_val):
        return None
    try:
        proba = est.predict_proba(X_val)
    except (AttributeError, NotImplementedError):
        return None
    return proba[np.arange(len(val_pred)), np.searchsorted(est.classes_, val_pred)]


def _require_finite(X: np.ndarray, c: FeatureCache, layer: str) -> None:
    """NaN or inf (float16 storage overflows above 65504) would make the heads fail mid-fit."""
    bad = non_finite_rows(X)
    if bad:
        raise FeatprobeError(f"{c.path.name}: features/{layer} has NaN or inf values in {bad} "
                             "row(s); float16 storage overflows above 65504 (re-extract with "
                             "--dtype float32), or the file is damaged (featprobe verify)")


def _sweep(est, spec, X_train, y_train, X_val, y_val):
    """Fit the head's registered grid on ``X_train``, score on ``X_val``: a SweepResult."""
    inner, standardize = split_pipeline(est)
    grid = capped_grid(spec, len(y_train))
    if isinstance(est, Pipeline):  # the preprocessing is fit on the rows the grid trains on
        prep = Pipeline(est.steps[:-1]).fit(X_train)
        X_train, X_val = prep.transform(X_train), prep.transform(X_val)
    return sweep_head(inner, grid, X_train, y_train, X_val, y_val, patience=spec.grid_patience)


def _train_images(cache: FeatureCache, rec: dict) -> list[str] | None:
    """Digests of the training images' paths, so that ``predict`` can say when it is asked to
    score images the head was trained on (None: the cache does not record where they were)."""
    root = cache.meta.get("images_root")
    if not root:
        return None
    split = make_split(cache.ids, cache.labels, val_fraction=rec["val_fraction"],
                       seed=rec["seed"], valid=cache.valid)
    return sorted(image_digest(Path(root) / cache.ids[i]) for i in split.train)


def save_fitted(path: str | os.PathLike, est, cache: FeatureCache, layer: str, rec: dict) -> Path:
    """Save a fitted head with what ``predict`` needs to rebuild its features exactly."""
    meta = {k: cache.meta.get(k) for k in HEAD_META_KEYS}
    meta.update(classes=cache.classes, layer=layer, n_features=int(cache.shapes[layer][1]),
                head=rec["head"], split_hash=rec["split_hash"], run_id=rec["run_id"],
                val_accuracy=rec["val"]["accuracy"], train_images=_train_images(cache, rec))
    return save_head(path, est, meta)
