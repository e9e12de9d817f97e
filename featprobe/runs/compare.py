"""Gather run records into one comparison table: DataFrame, text formats and a bar chart. One row
per configuration, mean and std over its seeds; runs on different datasets or val fractions are
never pooled (docs/runs.md)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featprobe.cache.format import default_cache_dir
from featprobe.errors import FeatprobeError, some
from featprobe.files import output_path
from featprobe.plain import to_plain
from featprobe.runs.records import read_runs

log = logging.getLogger("featprobe")

__all__ = ["FORMATS", "compare", "format_table", "plot"]

FORMATS = ("table", "markdown", "csv", "json")
# Params that change a run but not the configuration it measures.
_NOT_CONFIG = frozenset({"seed", "random_state", "device"})
# Keys of a sweep's "best" entry that describe its score rather than its params.
_SCORE_KEYS = frozenset({"score", "val_acc", "train_acc", "val", "train", "accuracy"})
_METRICS = {"train_acc": ("train", "accuracy"), "val_acc": ("val", "accuracy"),  # (section, key)
            "val_bal_acc": ("val", "balanced_accuracy"), "val_f1": ("val", "macro_f1")}
_PERCENT = (*_METRICS, "majority_rate")
_GROUP = ("dataset", "backbone", "weights", "layer", "head", "params_key", "standardize",
          "val_fraction")


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _config_params(record: dict) -> dict:
    """The params that identify the configuration: a sweep's winner, minus seed/device."""
    params = dict(record.get("params") or {})
    best = (record.get("sweep") or {}).get("best")
    if isinstance(best, dict):
        won = best["params"] if isinstance(best.get("params"), dict) else {
            k: v for k, v in best.items() if k not in _SCORE_KEYS}
        params.update(won)
    if record.get("sweep"):
        params["sweep"] = True  # chosen on val: never pooled with a plain run of same params
    return {k: v for k, v in params.items() if k not in _NOT_CONFIG}


def _shown_params(record: dict, params: dict) -> dict:
    """What the table shows: only what differs from the head's defaults, when recorded."""
    if isinstance(record.get("params_set"), dict):
        shown = dict(record["params_set"])
        if params.get("sweep"):
            shown["sweep"] = True
        return {k: v for k, v in shown.items() if k not in _NOT_CONFIG}
    return params


def _short(params: dict) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, str):
            return v
        return json.dumps(v, separators=(",", ":"))

    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


def _majority_rate(record: dict) -> float:
    """Val accuracy of always predicting the train majority class, from the record."""
    for where in (record, record.get("val") or {}):
        if where.get("majority_rate") is not None:
            return _num(where["majority_rate"])
    try:
        val = np.asarray(record["val"]["confusion_matrix"], dtype=float).sum(axis=1)
        train_cm = (record.get("train") or {}).get("confusion_matrix")
        train = np.asarray(train_cm, dtype=float).sum(axis=1) if train_cm else val
        return float(val[int(np.argmax(train))] / val.sum()) if val.sum() else math.nan
    except (KeyError, TypeError, ValueError, IndexError):
        return math.nan


def _run_row(record: dict) -> dict:
    params = _config_params(record)
    row = {k: record.get(k) for k in ("backbone", "weights", "layer", "head", "standardize",
                                      "val_fraction", "seed", "run_id", "kind")}
    row.update(dataset=record.get("dataset_fingerprint"), majority_rate=_majority_rate(record),
               fit_seconds=_num(record.get("fit_seconds")),
               params=_short(_shown_params(record, params)),
               params_key=json.dumps(params, sort_keys=True, default=str))
    for column, (section, metric) in _METRICS.items():
        row[column] = _num((record.get(section) or {}).get(metric))
    return row


def _records(source: str | os.PathLike | Iterable[dict] | None) -> list[dict]:
    source = default_cache_dir() if source is None else source
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).exists():
            raise FeatprobeError(f"{source}: no such cache directory or runs file")
        return read_runs(source)
    return [r for r in source if isinstance(r, dict)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _warn_degenerate(records: list[dict]) -> None:
    """One line when runs were fitted on features that carry nothing (see probe.fit)."""
    bad = sorted({f"{r.get('cache')} {r.get('layer')} ({r['degenerate']})" for r in records
                  if r.get("degenerate")})
    if bad:
        log.warning(f"warning: runs on degenerate features score only the majority rate: "
                    f"{some(bad, 3, '; ')}")


def compare(source: str | os.PathLike | Iterable[dict] | None = None, *,
            group_seeds: bool = True) -> pd.DataFrame:
    """One row per configuration, sorted by val accuracy, best first. ``source``: a cache directory,
    a runs.jsonl file or records (default: $FEATPROBE_CACHE, else ``cache``). With ``group_seeds`` a
    configuration's runs become one row of means, sample stds (``*_std``) and ``n_runs``;
    ``dataset`` and ``val_fraction`` columns appear when the runs span several."""
    records = _records(source)
    _warn_degenerate(records)
    runs = [_run_row(r) for r in records]
    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(runs):
        key = tuple(json.dumps(row[k], default=str) for k in _GROUP) if group_seeds else (i,)
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        row = {k: members[0][k] for k in (*_GROUP, "params", "kind")}
        row["n_runs"] = len(members)
        seeds = [m["seed"] for m in members if m["seed"] is not None]
        row["seeds"] = ",".join(str(s) for s in sorted(set(seeds), key=str))
        for column in (*_METRICS, "fit_seconds", "majority_rate"):
            mean, std = _mean_std([m[column] for m in members])
            row[column] = mean
            if column in _METRICS:
                row[f"{column}_std"] = std
        if not group_seeds:
            row["run_id"] = members[0]["run_id"]
        out.append(row)

    columns = ["dataset", "backbone", "weights", "layer", "head", "params", "standardize",
               "val_fraction", "n_runs", "seeds", *(x for c in _METRICS for x in (c, c + "_std")),
               "fit_seconds", "majority_rate", "kind"]
    if not group_seeds:
        columns.append("run_id")
    df = pd.DataFrame(out, columns=columns)
    for column, width in (("dataset", 12), ("val_fraction", None)):
        if df[column].nunique(dropna=False) <= 1:
            df = df.drop(columns=column)
        elif width:
            df[column] = df[column].map(lambda v, w=width: v[:w] if isinstance(v, str) else v)
    df = df.sort_values("val_acc", ascending=False, kind="mergesort", na_position="last")
    return df.reset_index(drop=True)


def _display(df: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """Human-readable strings: percentages with one decimal, ``± std`` when n_runs > 1."""
    show = [c for c in ("dataset", "backbone", "weights", "layer", "head", "params",
                        "standardize", "val_fraction", "n_runs", "train_acc", "val_acc",
                        "val_bal_acc", "val_f1", "fit_seconds", "kind", "run_id")
            if c in df.columns]
    if "run_id" in show:  # one row per run: say which seed it was
        show.insert(show.index("n_runs") + 1, "seeds")
    numeric = {"val_fraction", "n_runs", *_METRICS, "fit_seconds"}
    rows = []
    for _, r in df.iterrows():
        cells = {}
        for c in show:
            v = r[c]
            if c in _PERCENT:
                std = r.get(f"{c}_std", math.nan)
                if pd.isna(v):
                    cells[c] = "-"
                elif r["n_runs"] > 1 and not pd.isna(std):
                    cells[c] = f"{100 * v:.1f} ± {100 * std:.1f}"
                else:
                    cells[c] = f"{100 * v:.1f}"
            elif c == "fit_seconds":
                cells[c] = "-" if pd.isna(v) else f"{v:.2f}"
            elif c == "standardize":
                cells[c] = {True: "yes", False: "no"}.get(v, "-")
            else:
                cells[c] = "-" if v is None or v == "" or (isinstance(v, float) and
                                                           math.isnan(v)) else str(v)
        rows.append(cells)
    return pd.DataFrame(rows, columns=show), numeric & set(show)


def format_table(df: pd.DataFrame, fmt: str = "table") -> str:
    """``df`` (from :func:`compare`) as ``table``, ``markdown`` (for people: percentages, mean ±
    std), ``csv`` or ``json`` text (every column at full precision)."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        records = [to_plain(row) for row in df.to_dict("records")]
        return json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    if fmt not in FORMATS:
        raise FeatprobeError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    shown, numeric = _display(df)
    if fmt == "markdown":
        def line(cells: Iterable[str]) -> str:
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        rule = ["---:" if c in numeric else "---" for c in shown.columns]
        body = [line(shown.columns), line(rule)]
        body += [line(row) for row in shown.itertuples(index=False)]
        return "\n".join(body) + "\n"
    if shown.empty:
        return "no runs\n"
    formatters = {}
    for c in shown.columns:
        width = max(len(c), *(len(v) for v in shown[c]))
        align = str.rjust if c in numeric else str.ljust
        formatters[c] = lambda v, w=width, a=align: a(v, w)
    text = shown.to_string(index=False, formatters=formatters, justify="left")
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _bar_label(r: pd.Series) -> str:
    if r.get("kind") == "baseline" or r.get("backbone") == "cnn":
        label = "CNN baseline"
    else:
        label = f"{r['backbone']}/{r['layer']} {r['head']}"
        weights = r.get("weights")
        if weights == "none":
            label += " (random init)"
        elif weights not in (None, "DEFAULT", "IMAGENET1K_V1"):
            label += f" ({weights})"
    if r.get("params"):
        label += f" [{r['params']}]"
    if r.get("standardize") is True:
        label += " (standardized)"
    if isinstance(r.get("dataset"), str):
        label = f"{r['dataset'][:8]}: {label}"
    return label if len(label) <= 70 else label[:67] + "..."


def plot(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Horizontal bar chart of val accuracy (± std) saved as PNG; the baseline is orange, a dashed
    line marks the majority-class rate (one dataset only). Needs matplotlib; never opens a window.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise FeatprobeError("plotting needs matplotlib: pip install 'featprobe[plot]'") from exc
    if df.empty:
        raise FeatprobeError("nothing to plot: no runs")
    path = output_path(path)
    n = len(df)
    acc = 100 * df["val_acc"].to_numpy(dtype=float)
    std = 100 * df.get("val_acc_std", pd.Series(math.nan, index=df.index)).to_numpy(dtype=float)
    std = np.nan_to_num(std, nan=0.0)
    baseline = (df.get("kind") == "baseline").to_numpy() | (df["backbone"] == "cnn").to_numpy()
    colors = np.where(baseline, "tab:orange", "tab:blue")

    fig = Figure(figsize=(9, 1.2 + 0.35 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(n)
    ax.barh(y, np.nan_to_num(acc), xerr=std, color=colors, capsize=3, ecolor="0.3")
    ax.set_yticks(y, [_bar_label(r) for _, r in df.iterrows()], fontsize=8)
    ax.invert_yaxis()  # best (first row) on top
    for yi, a, s in zip(y, acc, std, strict=True):
        if not math.isnan(a):
            ax.text(a + s + 0.5, yi, f"{a:.1f}", va="center", fontsize=7)
    top = np.nanmax(acc + std) if np.isfinite(acc).any() else 100.0
    ax.set_xlim(0, min(105.0, top + 8))
    ax.set_xlabel("validation accuracy (%)")
    handles = [Patch(color="tab:blue", label="probe")]
    if baseline.any():
        handles.append(Patch(color="tab:orange", label="CNN baseline"))
    rates = df.get("majority_rate")
    if rates is not None and "dataset" not in df.columns and rates.notna().any():
        rate = 100 * float(rates.mean())
        handles.append(ax.axvline(rate, color="0.4", linestyle="--", linewidth=1,
                                  label=f"majority class ({rate:.1f}%)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    multi = bool((df.get("n_runs", pd.Series(1, index=df.index)) > 1).any())
    ax.set_title("Validation accuracy" + (" (mean ± std over seeds)" if multi else ""))
    fig.savefig(path, format="png", dpi=120)
    return path
