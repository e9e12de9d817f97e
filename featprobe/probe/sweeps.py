"""Sweeps: a head's registered parameter grid, trained and scored, the best point kept.

A torch head's grid over ``lr`` × ``weight_decay`` trains in one pass (every grid point a head
of the same loop) and linear heads are scored in one matmul. Other heads fit once per point.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, clone

from featprobe.errors import FeatprobeError
from featprobe.probe.registry import HEADS, make_head
from featprobe.probe.rows import ArrayRows
from featprobe.probe.torch_heads import LinearHead, _seed, _TorchHead

__all__ = ["SweepResult", "grid_points", "sweep_head", "sweep_linear", "sweep_logreg"]

SCORES = ("train_accuracy", "val_accuracy")


@dataclass
class SweepResult:
    """Outcome of a sweep: ``grid`` (per point, in grid order: its parameters,
    ``train_accuracy``, ``val_accuracy``), ``best`` (the best val accuracy, ties to the earlier),
    ``best_estimator_`` (fitted, the winner's) and ``estimators_`` (every point's)."""

    grid: list[dict]
    best: dict
    best_estimator_: BaseEstimator
    estimators_: list[BaseEstimator] = field(default_factory=list, repr=False)
    not_fitted: list[dict] = field(default_factory=list)  # points a patient walk never reached


def grid_points(grid: dict[str, Sequence]) -> list[dict]:
    """The product of a grid's values, first key slowest (``lr``-major for the linear head)."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if not points:
        raise FeatprobeError("a sweep needs at least one grid point")
    return points


def _result(points: list[dict], fitted: list, train_acc, val_acc) -> SweepResult:
    grid = [{**p, "train_accuracy": float(tr), "val_accuracy": float(va)}
            for p, tr, va in zip(points, train_acc, val_acc)]
    g = max(range(len(grid)), key=lambda i: (grid[i]["val_accuracy"], -i))
    return SweepResult(grid=grid, best=grid[g], best_estimator_=fitted[g], estimators_=fitted)


def train_stacked(proto: _TorchHead, points: list[dict], rows) -> list[_TorchHead]:
    """Every grid point of ``lr``/``weight_decay`` as one head of one training loop over
    ``rows``; ``proto`` has ``classes_`` and ``n_features_in_`` set. Returns fitted heads."""
    unknown = {k for p in points for k in p} - {"lr", "weight_decay"}
    if unknown:
        raise FeatprobeError(f"a torch sweep varies lr and weight_decay, not {sorted(unknown)}")
    full = [{"lr": proto.lr, "weight_decay": proto.weight_decay, **p} for p in points]
    try:
        for p in full:
            clone(proto).set_params(**p)._check_params()
    except ValueError as e:
        raise FeatprobeError(f"sweep: {e}") from e
    params, curve = proto._train(rows, [p["lr"] for p in full], [p["weight_decay"] for p in full])
    fitted = []
    for g, p in enumerate(full):
        est = clone(proto).set_params(**p)
        for k in ("classes_", "n_features_in_", "feature_names_in_"):
            if hasattr(proto, k):
                setattr(est, k, getattr(proto, k))
        fitted.append(est._fitted(params[g], curve[:, g]))
    return fitted


def stacked_correct(heads: list[LinearHead]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``correct(X, y) -> [G]``: how many rows each linear head gets right, all heads scored in
    one pass (one linear head of ``G * C`` outputs); usable on blocks (the counts add up)."""
    first = heads[0]
    w = np.concatenate([h.coef_ for h in heads])
    b = np.concatenate([h.intercept_ for h in heads])
    stacked = clone(first)
    stacked.coef_, stacked.intercept_ = w, b
    stacked.classes_ = np.arange(len(w))
    stacked.n_features_in_ = first.n_features_in_
    n_heads, n_classes = len(heads), len(first.classes_)

    def correct(X, y) -> np.ndarray:
        if len(y) == 0:
            return np.zeros(n_heads)
        logits = stacked._logits(X).reshape(len(X), n_heads, n_classes)
        pred = first.classes_[logits.argmax(axis=2)]  # [n, G]
        return (pred == np.asarray(y).reshape(-1, 1)).sum(axis=0)

    return correct


def score_each(fitted: list, blocks: Callable[[], Iterable]) -> np.ndarray:
    """Accuracy of every fitted head over ``blocks()`` (``(X, y)`` pieces of one set of rows)."""
    if all(type(h) is LinearHead for h in fitted):
        correct = stacked_correct(fitted)
    else:
        def correct(X, y):
            return np.array([np.sum(h.predict(X) == y) for h in fitted])
    total, n = np.zeros(len(fitted)), 0
    for X, y in blocks():
        total += correct(X, y)
        n += len(y)
    return total / max(1, n)


def sweep_head(est: BaseEstimator, grid: dict[str, Sequence], X_train, y_train, X_val, y_val,
               patience: int | None = None) -> SweepResult:
    """Fit ``est`` at every point of ``grid`` on the train rows; score on train and val.

    ``patience``: walk the points in grid order (a 1-D grid, weakest model first, as ``C``
    ascending) and stop after that many points in a row score below the best so far on val;
    the points never reached are listed in ``not_fitted``. On the demo's features LinearSVC
    takes 45 s a point at C >= 1 (liblinear runs into max_iter) and those points score below
    C <= 0.01: with patience 2 svm --sweep took 13 s instead of 148 s (docs/heads.md)."""
    points = grid_points(grid)
    if isinstance(est, _TorchHead):
        proto = clone(est)
        if proto.random_state is None:  # every grid head must see the same init and batches
            proto.random_state = _seed(None)
        X, y_idx = proto._validate_fit(X_train, y_train)
        fitted = train_stacked(proto, points, ArrayRows(X, y_idx))
    else:
        # one float32 copy shared by all fits (lbfgs keeps float32; float16 would become float64)
        X_train = np.asarray(X_train, dtype=np.float32)
        X_val = np.asarray(X_val, dtype=np.float32)
        if patience is not None:
            return _patient_walk(est, points, patience, X_train, y_train, X_val, y_val)
        fitted = [clone(est).set_params(**p).fit(X_train, y_train) for p in points]
    train_acc = score_each(fitted, lambda: [(X_train, np.asarray(y_train))])
    val_acc = score_each(fitted, lambda: [(X_val, np.asarray(y_val))])
    return _result(points, fitted, train_acc, val_acc)


def _patient_walk(est, points: list[dict], patience: int, X_train, y_train, X_val, y_val,
                  ) -> SweepResult:
    if patience < 1:
        raise FeatprobeError(f"a sweep's patience must be at least 1, not {patience}")
    fitted, train_acc, val_acc, behind = [], [], [], 0
    for p in points:
        h = clone(est).set_params(**p).fit(X_train, y_train)
        fitted.append(h)
        train_acc.append(score_each([h], lambda: [(X_train, np.asarray(y_train))])[0])
        val_acc.append(score_each([h], lambda: [(X_val, np.asarray(y_val))])[0])
        behind = behind + 1 if val_acc[-1] < max(val_acc) else 0
        if behind >= patience:
            break
    result = _result(points[: len(fitted)], fitted, train_acc, val_acc)
    result.not_fitted = points[len(fitted):]
    return result


def sweep_linear(X_train: ArrayLike, y_train: ArrayLike, X_val: ArrayLike, y_val: ArrayLike,
                 lrs: Sequence[float] = HEADS["linear"].grid["lr"],
                 weight_decays: Sequence[float] = HEADS["linear"].grid["weight_decay"],
                 epochs: int = 30, batch_size: int = 128, device: str = "auto",
                 random_state: int | None = 0) -> SweepResult:
    """Train a grid of :class:`LinearHead` (lr × weight decay, lr-major) together in one pass
    over the features; pick the best on val. Point ``(lr, wd)`` ends with the weights
    ``LinearHead(lr=lr, weight_decay=wd, ...)`` gets alone, up to float32 rounding. Returns a
    :class:`SweepResult` whose ``best_estimator_`` is a fitted LinearHead.
    """
    head = LinearHead(epochs=epochs, batch_size=batch_size, device=device,
                      random_state=random_state)
    grid = {"lr": [float(v) for v in lrs], "weight_decay": [float(v) for v in weight_decays]}
    return sweep_head(head, grid, X_train, y_train, X_val, y_val)


def sweep_logreg(X_train: ArrayLike, y_train: ArrayLike, X_val: ArrayLike, y_val: ArrayLike,
                 Cs: Sequence[float] = HEADS["logreg"].grid["C"]) -> SweepResult:
    """Fit ``logreg`` for each inverse regularisation strength ``C``; pick the best on val."""
    return sweep_head(make_head("logreg"), {"C": [float(c) for c in Cs]},
                      X_train, y_train, X_val, y_val)
