"""The statistics behind ``featprobe compare``: an interval on every accuracy, and whether a row
is distinguishable from the best one.

Repeated seeded splits of one dataset overlap (every image is in most training sets), so the
plain t-interval over seeds is too narrow and the plain paired t-test too eager. Both use the
corrected resampled variance of Nadeau & Bengio (2003, "Inference for the Generalization
Error"): ``(1/J + n_val/n_train) * s²`` for ``J`` splits instead of ``s²/J``. One split has one
accuracy on ``n_val`` images: its interval is Wilson's score interval for that proportion, and
two runs on the same split are paired image by image (McNemar's exact test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["LEVEL", "interval", "mcnemar_p", "paired_p"]

LEVEL = 0.95


def _corrected_se(values: np.ndarray, n_train: float, n_val: float) -> float:
    J = len(values)
    known = n_train and n_val and not (math.isnan(n_train) or math.isnan(n_val))
    ratio = n_val / n_train if known else 0.0  # sizes not recorded: the plain t
    return math.sqrt((1 / J + ratio) * float(np.var(values, ddof=1)))


def interval(accuracies: Sequence[float], n_train: float, n_val: float,
             level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` interval of the mean accuracy: corrected resampled t over several splits,
    Wilson's score interval for one. NaN where it cannot be had (no val rows)."""
    from scipy import stats

    acc = np.asarray([a for a in accuracies if a is not None and not math.isnan(a)], dtype=float)
    if acc.size == 0:
        return math.nan, math.nan
    if acc.size == 1:
        if not n_val or math.isnan(n_val):
            return math.nan, math.nan
        k = round(float(acc[0]) * n_val)
        ci = stats.binomtest(int(k), int(n_val)).proportion_ci(confidence_level=level,
                                                                method="wilson")
        return float(ci.low), float(ci.high)
    mean, se = float(acc.mean()), _corrected_se(acc, n_train, n_val)
    half = float(stats.t.ppf(0.5 + level / 2, acc.size - 1)) * se
    return max(0.0, mean - half), min(1.0, mean + half)


def paired_p(a: Sequence[float], b: Sequence[float], n_train: float, n_val: float) -> float:
    """Two-sided p of "same mean accuracy" for runs paired by split (``a[j]``, ``b[j]`` on
    split ``j``; at least two): the corrected resampled paired t-test."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.var(d, ddof=1) == 0:
        return 1.0 if d.mean() == 0 else 0.0
    t = float(d.mean()) / _corrected_se(d, n_train, n_val)
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def mcnemar_p(correct_a: str, correct_b: str, n_val: int) -> float:
    """Two-sided exact McNemar p for two runs on the same val images: ``correct_*`` are the
    records' ``val_correct`` (hex of packed right/wrong bits, in split order)."""
    from scipy import stats

    bits = [np.unpackbits(np.frombuffer(bytes.fromhex(c), dtype=np.uint8))[:n_val].astype(bool)
            for c in (correct_a, correct_b)]
    only_a, only_b = int((bits[0] & ~bits[1]).sum()), int((bits[1] & ~bits[0]).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
