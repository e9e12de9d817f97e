"""Choosing a head's parameters without scoring the choice.

A sweep (``--sweep``; ``knn``'s ``k`` always) fits its grid on an inner split carved from the
training rows, stratified and seeded with the run's seed, and picks the best on the inner val
rows; the chosen point is then refitted on all training rows and scored on the run's val rows,
which played no part in the choice. Picking on the rows that score the pick reports the
maximum of noisy estimates: on coin-flip labels it printed ~56% where chance is 50%.
"""

from __future__ import annotations

from collections.abc import Callable

from sklearn.base import clone

from featprobe.errors import FeatprobeError
from featprobe.probe.registry import HeadSpec, split_pipeline
from featprobe.probe.sweeps import SCORES, SweepResult
from featprobe.splits import Split
from featprobe.splits import split as make_split

__all__ = ["INNER_FRACTION", "capped_grid", "select"]

# The share of the training rows the grid is scored on (DINOv2 and CLIP_benchmark also hold
# out part of train; 20% keeps ~300 rows of a 1,646-image set to choose on).
INNER_FRACTION = 0.2


def capped_grid(spec: HeadSpec, n_train: int) -> dict:
    """The head's grid, with neighbour counts ``k`` above the training rows left out."""
    grid = dict(spec.grid or {})
    if "k" in grid:
        grid["k"] = tuple(k for k in grid["k"] if k <= n_train) or (min(grid["k"]),)
    return grid


def select(c, split: Split, spec: HeadSpec, est, seed: int,
           run_grid: Callable[..., SweepResult], positions: bool = False) -> tuple[object, dict]:
    """Run ``run_grid(train_rows, y_train, val_rows, y_val)`` on the inner split of
    ``split.train`` (rows as cache row numbers, or positions in ``split.train``); return an
    unfitted copy of ``est`` set to the chosen point, and the record's ``sweep`` entry."""
    y = c.labels[split.train]
    ids = [c.ids[i] for i in split.train]
    try:
        inner = make_split(ids, y, val_fraction=INNER_FRACTION, seed=seed)
    except FeatprobeError as e:
        raise FeatprobeError(f"{spec.name} chooses its parameters on {INNER_FRACTION:.0%} of the "
                             f"{len(split.train)} training rows, which cannot be split: {e}") from e
    tr, va = inner.train, inner.val
    rows = (tr, va) if positions else (split.train[tr], split.train[va])
    result = run_grid(rows[0], y[tr], rows[1], y[va])
    chosen = {k: v for k, v in result.best.items() if k not in SCORES}
    est = clone(est)
    split_pipeline(est)[0].set_params(**chosen)
    names = {"train_accuracy": "inner_train_accuracy", "val_accuracy": "inner_val_accuracy"}
    grid = [{names.get(k, k): v for k, v in point.items()} for point in result.grid]
    info = {"grid": grid, "not_fitted": result.not_fitted, "patience": spec.grid_patience,
            "best": {"params": chosen, **{names[k]: result.best[k] for k in SCORES}},
            "selected_on": {"rows": "inner split of the train rows", "fraction": INNER_FRACTION,
                            "seed": seed, "n_train": len(tr), "n_val": len(va),
                            "split_hash": inner.hash}}
    return est, info
