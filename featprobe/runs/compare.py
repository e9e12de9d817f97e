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
from featprobe.runs.stats import LEVEL, interval, mcnemar_p, paired_p

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
          "l2_normalize", "val_fraction")


def _num(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _config_params(record: dict) -> dict:
    """The params that identify the configuration: what was asked for and ``sweep`` for a run
    that chose its own (records of 0.1.0: the sweep's winner), minus seed/device."""
    if isinstance(record.get("params_asked"), dict):
        params = dict(record["params_asked"])
        if record.get("sweep"):
            params["sweep"] = True
        return {k: v for k, v in params.items() if k not in _NOT_CONFIG}
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
    if isinstance(record.get("params_asked"), dict):
        return params
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
                                      "val_fraction", "seed", "run_id", "kind", "split_hash",
                                      "val_correct", "config_key")}
    row.update(l2_normalize=bool(record.get("l2_normalize")),
               n_train=_num(record.get("n_train")), n_val=_num(record.get("n_val")))
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
    a runs.jsonl file or records (default: $FEATPROBE_CACHE, else ``cache``).

    With ``group_seeds`` a configuration's runs become one row: a seed run twice counts once (the
    later run), ``n_seeds`` distinct seeds give the means, sample stds (``*_std``) and the 95%
    interval of the mean val accuracy (``val_acc_ci_low``/``_high``; :mod:`featprobe.runs.stats`
    says how). ``tied_best`` is True for the best row of each dataset and for rows
    indistinguishable from it at 95% on the seeds both measured (``p_vs_best``), False for rows
    below it, None where no seed is shared. ``dataset`` and ``val_fraction`` columns appear when
    the runs span several."""
    records = _records(source)
    _warn_degenerate(records)
    runs = [_run_row(r) for r in records]
    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(runs):
        if not group_seeds:
            key: tuple = (i,)
        elif row["config_key"]:
            key = (row["config_key"],)
        else:
            key = tuple(json.dumps(row[k], default=str) for k in _GROUP)
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        row = {k: members[0][k] for k in (*_GROUP, "params", "kind", "l2_normalize")}
        row["n_runs"] = len(members)
        by_seed = {m["seed"]: m for m in members}  # a rerun of a seed replaces it
        members = list(by_seed.values())
        row["n_seeds"] = len(members)
        row["seeds"] = ",".join(str(s) for s in sorted(by_seed, key=str))
        for column in (*_METRICS, "fit_seconds", "majority_rate", "n_train", "n_val"):
            mean, std = _mean_std([m[column] for m in members])
            row[column] = mean
            if column in _METRICS:
                row[f"{column}_std"] = std
        row["val_acc_ci_low"], row["val_acc_ci_high"] = interval(
            [m["val_acc"] for m in members], row["n_train"], row["n_val"])
        row["_by_seed"] = by_seed
        if not group_seeds:
            row["run_id"] = members[0]["run_id"]
        out.append(row)
    _mark_best(out)

    columns = ["dataset", "backbone", "weights", "layer", "head", "params", "standardize",
               "l2_normalize", "val_fraction", "n_runs", "n_seeds", "seeds",
               *(x for c in _METRICS for x in (c, c + "_std")), "val_acc_ci_low",
               "val_acc_ci_high", "tied_best", "p_vs_best", "fit_seconds", "majority_rate",
               "n_train", "n_val", "kind"]
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


def _mark_best(rows: list[dict]) -> None:
    """``tied_best`` and ``p_vs_best`` of each row against the best row of its dataset and val
    fraction, paired on the splits both measured (same split hash)."""
    blocks: dict[tuple, list[dict]] = {}
    for r in rows:
        blocks.setdefault((r["dataset"], r["val_fraction"]), []).append(r)
    for block in blocks.values():
        scored = [r for r in block if not math.isnan(r["val_acc"])]
        for r in block:
            r["tied_best"], r["p_vs_best"] = None, math.nan
        if not scored:
            continue
        best = max(scored, key=lambda r: r["val_acc"])
        best["tied_best"] = True
        for r in scored:
            if r is not best:
                r["p_vs_best"] = _p_against(r, best)
                if not math.isnan(r["p_vs_best"]):
                    r["tied_best"] = bool(r["p_vs_best"] >= 1 - LEVEL)
    for r in rows:
        r.pop("_by_seed")


def _p_against(row: dict, best: dict) -> float:
    shared = [(a, best["_by_seed"][s]) for s, a in row["_by_seed"].items()
              if s in best["_by_seed"] and a["split_hash"]
              and a["split_hash"] == best["_by_seed"][s]["split_hash"]]
    if len(shared) >= 2:
        return paired_p([a["val_acc"] for a, _ in shared], [b["val_acc"] for _, b in shared],
                        best["n_train"], best["n_val"])
    if len(shared) == 1:
        a, b = shared[0]
        if a["val_correct"] and b["val_correct"] and a["n_val"] == b["n_val"]:
            return mcnemar_p(a["val_correct"], b["val_correct"], int(a["n_val"]))
    return math.nan


def _display(df: pd.DataFrame) -> tuple[pd.DataFrame, set[str]]:
    """Human-readable strings: percentages with one decimal, ``± std`` over several seeds, the
    val accuracy's 95% interval, ``=`` on the best row and ``≈`` on rows indistinguishable
    from it."""
    show = [c for c in ("dataset", "backbone", "weights", "layer", "head", "params",
                        "standardize", "val_fraction", "n_seeds", "train_acc", "val_acc",
                        "val_acc_ci", "vs_best", "val_bal_acc", "val_f1", "fit_seconds", "kind",
                        "run_id")
            if c in df.columns or c in ("val_acc_ci", "vs_best")]
    if "run_id" in show:  # one row per run: say which seed it was
        show.insert(show.index("n_seeds") + 1, "seeds")
    numeric = {"val_fraction", "n_seeds", *_METRICS, "val_acc_ci", "fit_seconds"}
    rows = []
    for _, r in df.iterrows():
        cells = {}
        for c in show:
            v = r.get(c)
            if c == "val_acc_ci":
                lo, hi = r.get("val_acc_ci_low"), r.get("val_acc_ci_high")
                cells[c] = "-" if pd.isna(lo) else f"{100 * lo:.1f}-{100 * hi:.1f}"
            elif c == "vs_best":
                tied = r.get("tied_best")
                best = pd.isna(r.get("p_vs_best")) and tied is True
                cells[c] = "=" if best else {True: "≈", False: "<"}.get(tied, "?")
            elif c in _PERCENT:
                std = r.get(f"{c}_std", math.nan)
                if pd.isna(v):
                    cells[c] = "-"
                elif r["n_seeds"] > 1 and not pd.isna(std) and c != "val_acc":
                    cells[c] = f"{100 * v:.1f} ± {100 * std:.1f}"
                else:
                    cells[c] = f"{100 * v:.1f}"
            elif c == "fit_seconds":
                cells[c] = "-" if pd.isna(v) else f"{v:.2f}"
            elif c == "standardize":
                cells[c] = {True: "yes", False: "no"}.get(v, "-")
                if r.get("l2_normalize") is True:
                    cells[c] = "l2" if v is not True else "l2+yes"
            else:
                cells[c] = "-" if v is None or v == "" or (isinstance(v, float) and
                                                           math.isnan(v)) else str(v)
        rows.append(cells)
    names = {"n_seeds": "seeds", "val_acc_ci": "val 95% CI", "vs_best": "vs best"}
    shown = pd.DataFrame(rows, columns=show)
    if "run_id" in show:
        names.pop("n_seeds")
    return shown.rename(columns=names), {names.get(c, c) for c in numeric & set(show)}


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
    """Horizontal bar chart of val accuracy with its 95% interval saved as PNG; hatched bars are
    the best row and those indistinguishable from it; the baseline is orange, a dashed line
    marks the majority-class rate (one dataset only). Needs matplotlib; never opens a window."""
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
    nan = pd.Series(math.nan, index=df.index)
    if "val_acc_ci_low" in df:  # the 95% interval of the mean
        lo = acc - 100 * df["val_acc_ci_low"].to_numpy(dtype=float)
        hi = 100 * df["val_acc_ci_high"].to_numpy(dtype=float) - acc
    else:
        lo = hi = 100 * df.get("val_acc_std", nan).to_numpy(dtype=float)
    lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)
    baseline = (df.get("kind") == "baseline").to_numpy() | (df["backbone"] == "cnn").to_numpy()
    colors = np.where(baseline, "tab:orange", "tab:blue")

    fig = Figure(figsize=(9, 1.2 + 0.35 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(n)
    tied = df.get("tied_best", nan).to_numpy() == True  # noqa: E712 (None is "unknown")
    ax.barh(y, np.nan_to_num(acc), xerr=np.vstack([lo, hi]), color=colors, capsize=3,
            ecolor="0.3", hatch=[("//" if t else "") for t in tied], edgecolor="white")
    ax.set_yticks(y, [_bar_label(r) for _, r in df.iterrows()], fontsize=8)
    ax.invert_yaxis()  # best (first row) on top
    for yi, a, h in zip(y, acc, hi, strict=True):  # the value right of its interval bar
        if not math.isnan(a):
            ax.text(a + h + 0.5, yi, f"{a:.1f}", va="center", fontsize=7)
    top = np.nanmax(acc + hi) if np.isfinite(acc).any() else 100.0
    ax.set_xlim(0, min(105.0, top + 8))
    ax.set_xlabel("validation accuracy (%)")
    handles = [Patch(color="tab:blue", label="probe")]
    if tied.any():
        handles.append(Patch(facecolor="0.6", hatch="//", edgecolor="white",
                             label="best, or indistinguishable from it at 95%"))
    if baseline.any():
        handles.append(Patch(color="tab:orange", label="CNN baseline"))
    rates = df.get("majority_rate")
    if rates is not None and "dataset" not in df.columns and rates.notna().any():
        rate = 100 * float(rates.mean())
        handles.append(ax.axvline(rate, color="0.4", linestyle="--", linewidth=1,
                                  label=f"majority class ({rate:.1f}%)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    ax.set_title("Validation accuracy (mean, 95% interval)" if "val_acc_ci_low" in df else
                 "Validation accuracy (mean ± std over seeds)")
    fig.savefig(path, format="png", dpi=120)
    return path
