"""Few-shot learning curves: how val accuracy grows with the labelled images per class.

For each ``n`` of ``shots``, ``tries`` seeded draws of ``n`` training images per class (from the
run's training rows) are fitted with default parameters (no selection: a few shots leave nothing
to hold out) and scored on the fixed val rows; each point carries the mean and its 95% interval.
Records go to ``curves.jsonl`` beside runs.jsonl.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from featprobe.cache import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.probe.registry import default_random_state, make_head
from featprobe.probe.rows import read_rows
from featprobe.runs.curves import CURVES_FILE
from featprobe.runs.records import append_run, make_record
from featprobe.runs.stats import interval
from featprobe.splits import split as make_split

__all__ = ["curve", "parse_shots"]


def parse_shots(text: str) -> list[int | None]:
    """``"1,2,4,8,16,all"`` → ``[1, 2, 4, 8, 16, None]`` (None: every training image)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise FeatprobeError(f"--shots takes positive whole numbers and 'all', not {part!r}")
    if not out:
        raise FeatprobeError("--shots is empty")
    return out


def _draw(y: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Positions of ``n`` rows of each class (all of a class that has fewer), sorted."""
    if n is None:
        return np.arange(len(y))
    picked = [rng.choice(np.flatnonzero(y == c), size=min(n, int((y == c).sum())), replace=False)
              for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def curve(cache: FeatureCache | str | os.PathLike, heads: Sequence[str] = ("logreg",),
          layers: Sequence[str] | None = None, shots: Sequence[int | None] = (1, 2, 4, 8, 16, None),
          tries: int = 5, seed: int = 0, val_fraction: float = 0.1, standardize: bool = False,
          l2_normalize: bool = False, runs_dir: str | os.PathLike | None = None,
          record: bool = True, progress: bool = False, **params) -> list[dict]:
    """One curve record per head and layer (see the module docstring), appended to
    ``curves.jsonl`` in ``runs_dir`` (default: the cache's directory) unless ``record=False``."""
    c = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if tries < 1:
        raise FeatprobeError(f"--tries must be at least 1, not {tries}")
    layers = [c._layer(x) for x in (layers or [None])]
    for head in heads:  # every head and parameter checked before anything is fitted
        make_head(head, standardize=standardize, l2_normalize=l2_normalize, **params)
    split = make_split(c.ids, c.labels, val_fraction=val_fraction, seed=seed, valid=c.valid)
    y_train, y_val = c.labels[split.train], c.labels[split.val]
    n_fits = len(heads) * len(layers) * len(shots) * tries
    bar = tqdm(total=n_fits, desc="curve", unit="fit", disable=not progress, leave=False)
    out = []
    with bar:
        for layer in layers:
            X = read_rows(c.path, layer, np.concatenate([split.train, split.val]))
            X_train, X_val = X[: len(split.train)], X[len(split.train):]
            for head in heads:
                points = []
                for n in shots:
                    accs, used = [], 0
                    for t in range(tries):
                        pos = _draw(y_train, n, np.random.default_rng([seed, t, n or 0]))
                        used = len(pos)
                        est = make_head(head, standardize=standardize, l2_normalize=l2_normalize,
                                        **params)
                        default_random_state(est, t, params)
                        est.fit(X_train[pos], y_train[pos])
                        accs.append(float(np.mean(est.predict(X_val) == y_val)))
                        bar.update(1)
                    # over draws (the val rows are the same for each), and never narrower than
                    # the val rows' own sampling error (Wilson's interval of the mean)
                    lo, hi = interval(accs, math.inf, len(y_val))
                    w_lo, w_hi = interval([float(np.mean(accs))], math.inf, len(y_val))
                    lo, hi = (w_lo, w_hi) if len(accs) == 1 else (min(lo, w_lo), max(hi, w_hi))
                    points.append({"n_per_class": n, "n_train": used, "mean": float(np.mean(accs)),
                                   "ci_low": lo, "ci_high": hi, "accuracies": accs})
                rec = make_record(
                    kind="curve", cache=c.path.name, cache_path=str(Path(c.path).resolve()),
                    dataset_fingerprint=c.meta.get("dataset_fingerprint"), backbone=c.backbone,
                    weights=c.meta.get("weights"), layer=layer, head=head, params=dict(params),
                    standardize=standardize, l2_normalize=l2_normalize, seed=seed,
                    val_fraction=val_fraction, split_hash=split.hash, n_train=len(split.train),
                    n_val=len(split.val), classes=c.classes, tries=tries, points=points,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                if record:
                    where = Path(runs_dir if runs_dir is not None else c.directory)
                    append_run(where / CURVES_FILE, rec)
                out.append(rec)
    return out
