"""The best probe head, looked at closely: its val predictions, per-class precision, recall and
F1, the confusion matrix and the misclassified val images.

Run records keep the val predictions and their probabilities (``val_predictions``,
``val_confidence``): the page reads them, with the cache's labels and ids, and refits nothing.
For older records, when the run saved its head (``fit --save``) and the file is still there,
that head predicts the val rows; otherwise the report refits the best configuration on its
recorded cache, layer, seed and val fraction through featprobe's own fit path
(:func:`featprobe.probe.fit.run_fit`): the same split, the same head. The split's hash and
the val accuracy are checked against the record, and the page says whether they agree."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from featprobe.cache import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.reporting.thumbnails import image_root, thumbnail
from featprobe.runs.records import recorded_val_outputs
from featprobe.splits import split as make_split

log = logging.getLogger("featprobe")

_IDENTITY = ("dataset", "backbone", "weights", "layer", "head", "params", "standardize",
             "val_fraction")
_NOT_PARAMS = ("seed", "device")  # the split's seed is passed on its own; device: this machine's


@dataclass
class BestHead:
    """What the page shows about the best probe head; ``problem`` says why a part is missing."""

    record: dict
    label: str
    problem: str | None = None
    classes: list = field(default_factory=list)
    per_class: list[dict] = field(default_factory=list)
    confusion: np.ndarray | None = None
    recorded_acc: float | None = None
    refit_acc: float | None = None
    split_agrees: bool | None = None
    n_val: int = 0
    n_wrong: int = 0
    wrong: list[dict] = field(default_factory=list)  # id, true, pred, probability, uri
    missing_images: int = 0
    image_root: str | None = None
    source: str | None = None  # "refit", or "saved head" (the run's own --save file)


def saved_head(record: dict):
    """The head the run itself saved (``fit --save``), when its file is still there and says it
    is this run's: no refit needed."""
    from featprobe.probe.headfile import load_head

    path = record.get("saved_head")
    if not isinstance(path, str) or not Path(path).is_file():
        return None
    try:
        est, meta = load_head(path)
    except FeatprobeError:
        return None
    return est if meta.get("run_id") == record.get("run_id") else None


def best_record(records: list[dict], df: pd.DataFrame) -> tuple[dict, pd.Series] | None:
    """The best probe row of ``df`` (compare's table, best first) and the record behind it: the
    run of that configuration with the lowest seed."""
    from featprobe.runs.compare import compare

    probes = df[(df.get("kind", "probe") != "baseline") & (df["backbone"] != "cnn")]
    if probes.empty:
        return None
    best = probes.iloc[0]
    runs = compare(records, group_seeds=False)
    keys = [k for k in _IDENTITY if k in runs.columns and k in df.columns]
    same = np.ones(len(runs), dtype=bool)
    for k in keys:
        same &= (runs[k].astype(str) == str(best[k])).to_numpy()
    ids = set(runs.loc[same, "run_id"])
    chosen = [r for r in records if r.get("run_id") in ids]
    if not chosen:
        return None
    first = min(chosen, key=lambda r: (r["seed"] if isinstance(r.get("seed"), int) else 1 << 30,
                                       str(r.get("time"))))
    return first, best


def find_cache(record: dict, directory: Path) -> Path | None:
    """The record's cache: where it was written, else by name in the runs' directory (a folder
    moved as a whole)."""
    for candidate in (record.get("cache_path"), directory / str(record.get("cache") or "")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _settings(record: dict):
    """The FitSettings that reproduce ``record`` (fields this featprobe lacks are refused)."""
    from featprobe.probe.fit import FitSettings

    params = record.get("params_asked")  # with sweep=True: the same choice again
    if not isinstance(params, dict):
        params = record.get("params_set")
    if not isinstance(params, dict):
        params = record.get("params") or {}
    params = {k: v for k, v in params.items() if k not in _NOT_PARAMS}
    known = {f.name for f in dataclasses.fields(FitSettings)}
    if not isinstance(record.get("head"), str):
        raise FeatprobeError("the run record names no head")
    asked = dict(head=record["head"], layer=record.get("layer"), seed=int(record.get("seed") or 0),
                 val_fraction=float(record.get("val_fraction") or 0.1),
                 standardize=bool(record.get("standardize")), sweep=bool(record.get("sweep")),
                 params=params)
    if record.get("l2_normalize"):
        asked["l2_normalize"] = True
    unknown = sorted(set(asked) - known)
    if unknown:
        raise FeatprobeError(f"this featprobe cannot refit a run with {', '.join(unknown)}")
    return FitSettings(**asked)


def _predicted(record: dict, cache: FeatureCache, settings, split):
    """Val predictions from the run's saved head, else from a refit (older records)."""
    from featprobe.probe.fit import confidence, run_fit  # imports torch: only when refitting

    est = saved_head(record)
    source = "saved head" if est is not None else "refit"
    if est is None:
        _, est = run_fit(cache, settings)
    X_val = cache.features(settings.layer, split.val).astype(np.float32)
    pred = np.asarray(est.predict(X_val))
    return pred, confidence(est, X_val, pred), source


def examine(record: dict, label: str, directory: Path, images: str | os.PathLike | None = None,
            max_thumbnails: int = 24, refit: bool = True) -> BestHead:
    """Refit ``record``'s configuration and gather what the page shows of it. Problems a user
    can fix (no cache, a head this featprobe cannot rebuild) end up in ``problem``, not raised."""
    out = BestHead(record=record, label=label, recorded_acc=(record.get("val") or {}).get(
        "accuracy"))
    if not refit:
        out.problem = "not refitted (--no-refit): per-class figures and images skipped"
        return out
    path = find_cache(record, directory)
    if path is None:
        out.problem = (f"cache not found: {record.get('cache_path') or record.get('cache')} "
                       "(moved or deleted since the run); per-class figures and images need it")
        return out
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    try:
        cache = FeatureCache(path)
        settings = _settings(record)
        split = make_split(cache.ids, cache.labels, val_fraction=settings.val_fraction,
                           seed=settings.seed, valid=cache.valid)
        pred, prob = recorded_val_outputs(record, len(split.val))
        out.source = "run record"
        if pred is None:
            pred, prob, out.source = _predicted(record, cache, settings, split)
    except (FeatprobeError, ValueError) as e:  # ValueError: a head refusing recorded params
        out.problem = f"could not refit the best configuration: {e}"
        return out
    y_val = cache.labels[split.val]
    labels = list(range(len(cache.classes)))
    out.classes = [str(c) for c in cache.classes]
    out.split_agrees = split.hash == record.get("split_hash")
    out.refit_acc = float(np.mean(pred == y_val)) if len(y_val) else None
    out.n_val = len(y_val)
    out.confusion = confusion_matrix(y_val, pred, labels=labels)
    p, r, f1, n = precision_recall_fscore_support(y_val, pred, labels=labels, zero_division=0)
    out.per_class = [dict(name=out.classes[i], precision=float(p[i]), recall=float(r[i]),
                          f1=float(f1[i]), support=int(n[i])) for i in labels]
    wrong = np.flatnonzero(pred != y_val)
    out.n_wrong = len(wrong)
    if prob is not None:  # most confident mistakes first: the ones worth a look
        wrong = wrong[np.argsort(-prob[wrong], kind="stable")]
    root = image_root(cache.meta, images)
    out.image_root = str(root) if root is not None else None
    for i in wrong[:max_thumbnails]:
        row = int(split.val[i])
        uri = thumbnail(root / cache.ids[row]) if root is not None else None
        out.missing_images += uri is None
        out.wrong.append(dict(id=cache.ids[row], true=out.classes[int(y_val[i])],
                              pred=out.classes[int(pred[i])],
                              probability=None if prob is None else float(prob[i]), uri=uri))
    if out.missing_images:
        where = f"under {root}" if root is not None else "(the cache records no image folder)"
        log.warning(f"warning: {out.missing_images} misclassified image(s) not found {where} "
                    "(moved since extraction? pass --images DIR): placeholders shown")
    return out
