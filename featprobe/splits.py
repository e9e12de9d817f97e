"""The seeded, stratified train/val(/test) split shared by every head and the CNN baseline. It
depends on the set of ``(id, label)`` pairs, the fractions and the seed, not on row order; its
``hash`` goes into every run record."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from featprobe.errors import FeatprobeError, some

__all__ = ["Split", "split"]


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices of one split, into the ORIGINAL row order, each sorted ascending. Two splits
    are the same exactly when their ``hash`` is equal (``==`` is identity)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    n_invalid: int
    hash: str
    val_fraction: float
    test_fraction: float
    seed: int


def _count(fraction: float, n: int) -> int:
    # ceil like scikit-learn, but 0.1 * 30 == 3.0000000000000004 must give 3, not 4.
    return math.ceil(round(fraction * n, 9))


def _label_keys(labels: Sequence) -> np.ndarray:
    """Labels as a 1-d array scikit-learn can stratify on (ints or strings)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise FeatprobeError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == object:  # mixed or exotic types: compare them as text
        arr = np.asarray([str(v) for v in arr])
    return arr


def _check_classes(y: np.ndarray, need: int, what: str) -> None:
    counts = Counter(y.tolist())
    label, n = min(counts.items(), key=lambda kv: (kv[1], str(kv[0])))
    if len(counts) < 2:
        raise FeatprobeError(f"every row is class {label!r} {what}: a classifier needs at least "
                             "two classes")
    if n < need:
        raise FeatprobeError(
            f"class {label!r} has only {n} image(s) {what}; a stratified split needs at least "
            f"{need}: add images, merge the class, or change the fractions")


def _stratified(idx: np.ndarray, y: np.ndarray, n_out: int, seed: int, part: str,
                fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, out) with ``n_out`` rows in ``out``, stratified on ``y``."""
    n_classes = len(np.unique(y))
    n_rest = len(idx) - n_out
    if n_out < n_classes or n_rest < n_classes:
        raise FeatprobeError(
            f"{part}_fraction={fraction} of {len(idx)} image(s) gives {n_out} {part} and "
            f"{n_rest} remaining, but a stratified split needs at least one per class in each "
            f"({n_classes} classes): change {part}_fraction or add images")
    try:
        rest, out = train_test_split(idx, test_size=n_out, stratify=y, random_state=seed)
    except ValueError as exc:  # anything our checks above did not foresee
        raise FeatprobeError(f"cannot split into {part}: {exc}") from exc
    return rest, out


def split(ids: Sequence, labels: Sequence, val_fraction: float = 0.1, seed: int = 0,
          test_fraction: float = 0.0, valid: Sequence[bool] | None = None) -> Split:
    """Deterministic stratified split of the valid rows, in canonical (id-sorted) order. Test
    (``test_fraction > 0``) is carved first, then val; both are fractions of all valid rows. Invalid
    rows are left out and counted in ``n_invalid``."""
    if not 0.0 < val_fraction < 1.0:
        raise FeatprobeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise FeatprobeError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise FeatprobeError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
    id_arr = np.asarray([str(i) for i in ids])
    y_all = _label_keys(labels)
    n = len(id_arr)
    if len(y_all) != n:
        raise FeatprobeError(f"got {n} ids but {len(y_all)} labels")
    ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if ok.shape != (n,):
        raise FeatprobeError(f"got {n} ids but {ok.size} valid flags")

    order = np.argsort(id_arr, kind="stable")  # canonical order: by id
    sorted_ids = id_arr[order]
    dup = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
    if dup.size:
        raise FeatprobeError(f"{dup.size} duplicate id(s): {some(repr(str(x)) for x in dup)}")
    rows = order[ok[order]]  # original indices of the valid rows, in id order
    n_invalid = int(n - rows.size)
    if rows.size == 0:
        raise FeatprobeError("no valid rows to split")
    y = y_all[rows]
    _check_classes(y, 3 if test_fraction > 0 else 2, "among the valid rows")
    pos = np.arange(rows.size)  # positions in canonical order
    test_pos = np.empty(0, dtype=np.int64)
    if test_fraction > 0:
        n_test = _count(test_fraction, rows.size)
        pos, test_pos = _stratified(pos, y, n_test, seed, "test", test_fraction)
        _check_classes(y[pos], 2, "left after carving the test part")
    n_val = _count(val_fraction, rows.size)
    train_pos, val_pos = _stratified(pos, y[pos], n_val, seed, "val", val_fraction)

    def original(p: np.ndarray) -> np.ndarray:
        out = np.sort(rows[p]).astype(np.int64)
        out.setflags(write=False)
        return out

    train, val, test = original(train_pos), original(val_pos), original(test_pos)
    payload = json.dumps({name: sorted(id_arr[part].tolist()) for name, part in
                          (("train", train), ("val", val), ("test", test))}, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    return Split(train=train, val=val, test=test, n_invalid=n_invalid, hash=digest,
                 val_fraction=float(val_fraction), test_fraction=float(test_fraction),
                 seed=int(seed))
