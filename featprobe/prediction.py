"""Predict: the backbone a head was trained on, then the head, over new images → CSV. The head's
metadata fixes backbone, weights (name and SHA-256), layer and preprocessing; predict refuses to run
when any of it differs here."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from featprobe.data import Dataset, image_digest, load_dataset, read_image_list
from featprobe.errors import FeatprobeError
from featprobe.files import atomic_write, output_path

log = logging.getLogger("featprobe")


def _weights_arg(meta: dict) -> str:
    if meta.get("weights") != "file" and Path(meta.get("weights_file") or "").is_file():
        return meta["weights_file"]  # a torchvision entry's own file, as extract was given it
    if meta.get("weights") == "file":
        path = meta.get("weights_file") or ""
        if not Path(path).is_file():
            raise FeatprobeError(f"the head was trained on features from the weights file {path}, "
                                 "which is not here; put it back at that path")
        return path
    return meta["weights"]


def predict(head_file: str | os.PathLike, data: str | os.PathLike,
            images: str | os.PathLike | None = None, image_col: str | None = None,
            label_col: str | None = None, out: str | os.PathLike | None = None,
            device: str = "auto", batch_size: int | None = None, workers: int | None = None,
            progress: bool = True, allow_outside_images: bool = False,
            ) -> tuple[pd.DataFrame, float | None]:
    """Predict labels for images (a folder, a CSV, or a labelled CSV). Returns the DataFrame
    ``image_names, label, probability`` (plus ``true_label`` and ``error`` when relevant) and the
    accuracy when the CSV has labels, else None. Images the head was trained on are marked in an
    ``in_training`` column, with a warning, and left out of the accuracy: it scores only images
    the head has not seen (None when there are none)."""
    from featprobe.extraction.backbones import resolve_model
    from featprobe.extraction.stream import feature_batches
    from featprobe.extraction.weights import weights_sha256
    from featprobe.policy import default_batch_size, resolve_device
    from featprobe.probe.headfile import load_head

    est, meta = load_head(head_file)
    for key in ("backbone", "weights", "layer", "preprocessing", "classes"):
        if meta.get(key) in (None, ""):
            raise FeatprobeError(f"{head_file} lacks {key!r} in its metadata; refit and --save it")
    _check_head(est, meta, head_file)
    ds = _dataset(data, images, image_col, label_col, allow_outside_images)
    if out is not None:
        output_path(out)  # its folder, before the backbone runs
    backbone, layer, classes = meta["backbone"], meta["layer"], meta["classes"]
    # the recorded preprocessing (crop mode included) is reproduced, not worked out again
    model = resolve_model(backbone, _weights_arg(meta), [layer], recorded=meta["preprocessing"],
                          build=False)
    choice = model.weights
    if choice.identity != meta.get("weights_id", choice.identity):
        raise FeatprobeError(f"weights mismatch: the head was fitted on {meta['weights_id']} "
                             f"features, but {choice.identity} resolves here")
    sha = weights_sha256(choice)
    if meta.get("weights_sha256") and sha and sha != meta["weights_sha256"]:
        raise FeatprobeError(
            f"weights file SHA-256 {sha[:12]}... differs from the {meta['weights_sha256'][:12]}... "
            "the head was fitted on: these are not the same weights")
    dev = resolve_device(device)
    prec = meta.get("precision") or "fp32"
    if dev.type == "cpu" and prec == "fp16":
        prec = "fp32"
    bs = batch_size or default_batch_size(dev)
    batches = [list(range(i, min(i + bs, len(ds)))) for i in range(0, len(ds), bs)]
    feats, reasons = None, [""] * len(ds)
    for rows, f, why in feature_batches(model, ds, dev, prec, batches, workers, progress,
                                        desc=f"predict {backbone}"):
        x = f[layer]
        if feats is None:
            if meta.get("n_features") not in (None, x.shape[1]):
                raise FeatprobeError(f"the head expects {meta['n_features']} features but "
                                     f"{backbone}/{layer} gives {x.shape[1]}")
            feats = np.empty((len(ds), x.shape[1]), dtype=np.float32)
        feats[rows] = x
        for r, w in zip(rows, why):
            reasons[r] = w
    ok = np.array([not r for r in reasons])
    pred, prob = np.full(len(ds), -1), np.full(len(ds), np.nan)
    if ok.any():
        # features go through the same storage dtype as the cache the head was trained on
        x = feats[ok].astype(meta.get("dtype") or np.float16).astype(np.float32)
        pred[ok] = est.predict(x)
        if hasattr(est, "predict_proba"):
            proba = est.predict_proba(x)
            cols = {int(c): i for i, c in enumerate(est.classes_)}
            prob[ok] = proba[np.arange(len(x)), [cols[int(p)] for p in pred[ok]]]
    df = pd.DataFrame({"image_names": ds.ids, "label": [classes[p] if p >= 0 else "" for p in pred],
                       "probability": prob})
    seen = _seen(ds, meta, df)
    accuracy = None
    if ds.labels is not None:
        truth = [ds.classes[i] for i in ds.labels]
        df["true_label"] = truth
        unknown = sorted({str(t) for t in truth} - {str(c) for c in classes})
        if unknown:
            raise FeatprobeError(f"labels {unknown[:5]} in {data} are not among the head's "
                                 f"classes {classes}")
        hit = np.array([str(a) == str(b) for a, b in zip(df["label"], truth)])
        scored = ok & ~seen
        accuracy = float(hit[scored].mean()) if scored.any() else None
    if not ok.all():
        df["error"] = reasons
    if out is not None:
        with atomic_write(out, "w", newline="") as f:
            df.to_csv(f, index=False)
    return df, accuracy


def _seen(ds: Dataset, meta: dict, df: pd.DataFrame) -> np.ndarray:
    """Which images were among the head's training rows (marked in ``df``, with a warning)."""
    trained = set(meta.get("train_images") or ())
    seen = np.array([image_digest(ds.path(i)) in trained for i in range(len(ds))], dtype=bool)
    if seen.any():
        df["in_training"] = seen
        log.warning(f"warning: {int(seen.sum())} of the {len(ds)} images were in the head's "
                    "training rows (column in_training)" + (
                        ": the accuracy leaves them out, because a head scored on its own "
                        "training images says nothing about new ones" if ds.labels is not None
                        else ""))
    return seen


def _check_head(est, meta: dict, head_file) -> None:
    """Refuse a head whose arrays and metadata do not fit together (a damaged or edited file)
    before any model is built: it would fail mid-run or, worse, mislabel rows."""
    from featprobe.extraction.pixels import check_preprocessing

    classes, n = meta["classes"], meta.get("n_features")
    problems = []
    if not isinstance(classes, list) or not classes:
        problems.append("'classes' is not a non-empty list")
    if meta.get("dtype") not in (None, "float16", "float32"):
        problems.append(f"unknown dtype {meta.get('dtype')!r}")
    try:
        check_preprocessing(meta["preprocessing"])
    except (KeyError, TypeError, ValueError, IndexError):
        problems.append("'preprocessing' is not a valid preprocessing record")
    if not isinstance(n, int) or n < 1:
        problems.append(f"'n_features' is {n!r}")
    elif not problems:
        known = np.asarray(getattr(est, "classes_", []))
        if known.dtype.kind not in "iu" or known.min(initial=0) < 0 or \
                known.max(initial=0) >= len(classes):
            problems.append(f"the estimator's classes {known.tolist()[:8]} do not index the "
                            f"{len(classes)} classes in its metadata")
        try:  # one row through the head: shapes that disagree fail here, not after extraction
            est.predict(np.zeros((1, n), dtype=np.float32))
        except (ValueError, IndexError, TypeError, AttributeError) as e:
            problems.append(f"its metadata expects {n} features, which its arrays do not take "
                            f"({type(e).__name__})")
    if problems:
        raise FeatprobeError(f"{head_file} is damaged or edited: {'; '.join(problems)}")


def _dataset(data, images, image_col, label_col, allow_outside: bool) -> Dataset:
    """A labelled CSV if it has labels, else an unlabelled CSV, folder or image file."""
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".csv":
        try:
            return load_dataset(p, images, image_col, label_col, allow_outside=allow_outside)
        except FeatprobeError:
            if label_col is not None:
                raise
            return load_dataset(p, images, image_col, None, labelled=False,
                                allow_outside=allow_outside)
    if p.is_dir() and images is None:
        return read_image_list(p)
    if p.is_file():
        return read_image_list([p])
    raise FeatprobeError(f"no such file or folder: {data}")
