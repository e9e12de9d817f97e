"""Few-shot curve records (``curves.jsonl``, written by ``featprobe curve``): reading them, one
table row per point, and the plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from featprobe.errors import FeatprobeError
from featprobe.files import output_path
from featprobe.runs.records import read_runs

__all__ = ["CURVES_FILE", "plot_curves", "points_table", "read_curves"]

CURVES_FILE = "curves.jsonl"


def read_curves(directory: str | os.PathLike) -> list[dict]:
    """Every curve record in ``directory/curves.jsonl`` (none if the file is absent)."""
    return [r for r in read_runs(Path(directory) / CURVES_FILE) if r.get("kind") == "curve"]


def points_table(records: Sequence[dict]):
    """A DataFrame: one row per curve point (head, layer, n per class, mean, 95% interval)."""
    rows = [{"backbone": r.get("backbone"), "layer": r.get("layer"), "head": r.get("head"),
             "n_per_class": "all" if p["n_per_class"] is None else p["n_per_class"],
             "n_train": p.get("n_train"), "tries": len(p.get("accuracies") or []),
             "val_acc": p["mean"], "val_acc_ci_low": p["ci_low"], "val_acc_ci_high": p["ci_high"]}
            for r in records for p in r.get("points") or []]
    return pd.DataFrame(rows)


def plot_curves(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Val accuracy against images per class (log scale), one line per head/layer, shaded 95%
    intervals; ``all`` is drawn at the full training set's per-class size."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise FeatprobeError("plotting needs matplotlib: pip install 'featprobe[plot]'") from exc
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in records:
        n_classes = max(1, len(r.get("classes") or []))
        pts = r.get("points") or []
        x = [p["n_per_class"] or p["n_train"] / n_classes for p in pts]
        y = np.array([100 * p["mean"] for p in pts])
        lo = np.array([100 * (p["ci_low"] if p["ci_low"] is not None else math.nan) for p in pts])
        hi = np.array([100 * (p["ci_high"] if p["ci_high"] is not None else math.nan)
                       for p in pts])
        line, = ax.plot(x, y, marker="o", label=f"{r['backbone']}/{r['layer']} {r['head']}")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Few-shot learning curve (mean, 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = output_path(path)
    fig.savefig(path, format="png", dpi=120)
    return path
