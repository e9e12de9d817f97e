"""The report's pictures, drawn with matplotlib on its SVG canvas (pyplot untouched) and
returned as inline ``<svg>`` text: the accuracy chart, the few-shot curves and the confusion
matrix. Text stays text (``svg.fonttype = none``), so the page stays small and searchable."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

PROBE, TIED, BASELINE, MAJORITY = "#4c72b0", "#1f4e99", "#dd8452", "#666666"
NO_MATPLOTLIB = "pictures need matplotlib: pip install 'featprobe[plot]'"


def draw(picture, *args) -> str:
    """``picture(*args)``, or a note saying why there is no picture (matplotlib is optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f'<p class="problem">{NO_MATPLOTLIB}</p>'
    return picture(*args)


def _svg(fig, salt: str) -> str:
    """The figure as ``<svg ...>...</svg>`` (no XML prologue), ids salted per figure so that
    several figures in one page never share an id."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.patch.set_alpha(0.0)
    FigureCanvasSVG(fig)
    return fig


def row_label(r: pd.Series) -> str:
    """A configuration in one short line: ``backbone/layer head [params]``."""
    if r.get("kind") == "baseline" or r.get("backbone") == "cnn":
        label = "CNN baseline"
    else:
        label = f"{r.get('backbone')}/{r.get('layer')} {r.get('head')}"
        if r.get("weights") == "none":
            label += " (random init)"
    if r.get("params"):
        label += f" [{r['params']}]"
    return label if len(label) <= 60 else label[:57] + "..."


def _is_baseline(df: pd.DataFrame) -> np.ndarray:
    kind = df["kind"] if "kind" in df.columns else pd.Series(None, index=df.index)
    return ((kind == "baseline") | (df["backbone"] == "cnn")).to_numpy()


def interval(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (low, high) val accuracy: the 95% interval when compare gives one, else mean
    ± std, else the mean itself."""
    mean = df["val_acc"].to_numpy(dtype=float)
    if {"val_acc_ci_low", "val_acc_ci_high"} <= set(df.columns):
        low = df["val_acc_ci_low"].to_numpy(dtype=float)
        high = df["val_acc_ci_high"].to_numpy(dtype=float)
    else:
        std = np.nan_to_num(df.get("val_acc_std", pd.Series(math.nan, index=df.index))
                            .to_numpy(dtype=float))
        low, high = mean - std, mean + std
    return np.where(np.isnan(low), mean, low), np.where(np.isnan(high), mean, high)


def accuracy_chart(df: pd.DataFrame, limit: int = 40) -> str:
    """Horizontal bars of mean val accuracy (best on top) with interval whiskers; tied-with-best
    rows darker, the CNN baseline orange and as a vertical line, the majority-class rate dashed.
    Only the ``limit`` best rows are drawn (the table has them all)."""
    shown = df.head(limit)
    n = len(shown)
    acc = 100 * shown["val_acc"].to_numpy(dtype=float)
    low, high = (100 * a for a in interval(shown))
    base = _is_baseline(shown)
    tied = shown["tied_best"].fillna(False).to_numpy(dtype=bool) if "tied_best" in shown else (
        np.zeros(n, dtype=bool))
    colors = np.where(base, BASELINE, np.where(tied, TIED, PROBE))

    fig = _figure(9, 1.3 + 0.3 * n)
    ax = fig.add_subplot()
    y = np.arange(n)
    err = np.vstack([np.clip(acc - low, 0, None), np.clip(high - acc, 0, None)])
    ax.barh(y, np.nan_to_num(acc), xerr=np.nan_to_num(err), color=colors, capsize=3,
            ecolor="#333333")
    ax.set_yticks(y, [row_label(r) for _, r in shown.iterrows()], fontsize=8)
    ax.invert_yaxis()
    for yi, a, h in zip(y, acc, high):
        if not math.isnan(a):
            ax.text(max(a, h) + 0.5, yi, f"{a:.1f}", va="center", fontsize=7)
    whole = 100 * df["val_acc"].to_numpy(dtype=float)
    all_base = _is_baseline(df)
    if all_base.any() and np.isfinite(whole[all_base]).any():
        b = float(np.nanmax(whole[all_base]))
        ax.axvline(b, color=BASELINE, linewidth=1.2, label=f"CNN baseline ({b:.1f}%)")
    rates = df["majority_rate"] if "majority_rate" in df.columns else pd.Series(dtype=float)
    if "dataset" not in df.columns and rates.notna().any():
        m = 100 * float(rates.mean())
        ax.axvline(m, color=MAJORITY, linestyle="--", linewidth=1,
                   label=f"majority class ({m:.1f}%)")
    top = np.nanmax(np.append(high, 0.0)) if np.isfinite(high).any() else 100.0
    ax.set_xlim(0, min(105.0, top + 8))
    ax.set_xlabel("validation accuracy (%)")
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return _svg(fig, "accuracy")


def _x_positions(points: list[dict], top: float) -> list[float]:
    return [float(p["n_per_class"]) if p.get("n_per_class") else top for p in points]


def curves_chart(curves: list[dict]) -> str:
    """One line per curve: mean val accuracy against labelled images per class (log scale,
    ``all`` at the right end), the 95% interval shaded."""
    numeric = [p["n_per_class"] for c in curves for p in c["points"] if p.get("n_per_class")]
    top = 2.0 * max(numeric) if numeric else 1.0
    fig = _figure(9, 4.2)
    ax = fig.add_subplot()
    for c in curves:
        pts = sorted(c["points"], key=lambda p: p.get("n_per_class") or math.inf)
        x = _x_positions(pts, top)
        mean = [100 * float(p["mean"]) for p in pts]
        ax.plot(x, mean, marker="o", markersize=3, label=c["label"])
        low = [100 * float(p.get("ci_low", p["mean"])) for p in pts]
        high = [100 * float(p.get("ci_high", p["mean"])) for p in pts]
        ax.fill_between(x, low, high, alpha=0.2)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(numeric))
    ax.set_xticks([*ticks, top] if any(not p.get("n_per_class") for c in curves
                                       for p in c["points"]) else ticks)
    ax.set_xticklabels([str(int(t)) for t in ticks] + (["all"] if len(ax.get_xticks()) >
                                                        len(ticks) else []))
    ax.minorticks_off()
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return _svg(fig, "curves")


def confusion_chart(matrix: np.ndarray, classes: list[str]) -> str:
    """The confusion matrix (rows true, columns predicted), coloured by each true class's share
    so that small classes show, with the counts written in (up to 20 classes)."""
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    side = min(8.0, 2.2 + 0.45 * k)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [str(c) if len(str(c)) <= 14 else str(c)[:13] + "…" for c in classes]
    ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center",
                  fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _svg(fig, "confusion")
