"""``featprobe report``: one self-contained HTML page of a cache directory's runs (docs/report.md).

The page carries everything inside itself: inline CSS and a few lines of JS (table sorting; the
page reads the same without it), figures as inline SVG, thumbnails as ``data:`` URIs. It is
rendered from a Jinja2 template shipped with the package and written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from featprobe import __version__
from featprobe.cache import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.files import atomic_write
from featprobe.reporting import figures
from featprobe.reporting.best import BestHead, best_record, examine

log = logging.getLogger("featprobe")

CHART_ROWS = 40  # bars in the accuracy chart; the table keeps every row
_CACHE_FACTS = ("backbone", "weights", "weights_sha256", "layers", "dtype", "precision",
                "source", "dataset_fingerprint", "n_valid", "created_at", "featprobe_version",
                "torch_version", "torchvision_version", "device")


def report(directory: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
           images: str | os.PathLike | None = None, refit: bool = True,
           max_thumbnails: int = 24) -> Path:
    """Write the HTML report of the runs in ``directory`` (a cache directory holding runs.jsonl;
    default: $FEATPROBE_CACHE, else ``cache``) to ``out`` (default: ``report.html`` in it) and
    return its path. ``images``: where the cached image ids are now, when moved since
    extraction. ``refit=False`` skips refitting the best head (no per-class figures)."""
    from featprobe.cache.format import default_cache_dir
    from featprobe.runs.compare import compare
    from featprobe.runs.records import read_runs

    t0 = time.perf_counter()
    directory = Path(default_cache_dir() if directory is None else directory)
    if not directory.is_dir():
        raise FeatprobeError(f"{directory}: no such cache directory")
    if max_thumbnails < 0:
        raise FeatprobeError("--max-thumbnails must be 0 or more")
    out = directory / "report.html" if out is None else Path(out)
    if out.is_dir():
        raise FeatprobeError(f"{out} is a folder: --out takes a file name, e.g. report.html")
    records = read_runs(directory)
    curves = read_curves(directory)
    if not records and not curves:
        raise FeatprobeError(f"{directory}: no runs to report (runs.jsonl is missing or empty); "
                             "fit a head first")
    df = compare(records)
    best = None
    found = best_record(records, df)
    if found is not None:
        rec, row = found
        best = examine(rec, figures.row_label(row), directory, images, max_thumbnails, refit)
    page = dict(
        title=f"featprobe report: {directory.resolve().name}", directory=str(directory.resolve()),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"), version=__version__,
        summary=_summary(df, best), table=_table(df), has_intervals=_has_intervals(df),
        has_ties="tied_best" in df.columns,
        chart=figures.draw(figures.accuracy_chart, df, CHART_ROWS) if len(df) else None,
        chart_rows=min(CHART_ROWS, len(df)), n_rows=len(df),
        curves=_curves(curves), best=_best(best), provenance=_provenance(records, curves))
    html = render(page)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w", newline="\n") as f:
        f.write(html)
    log.info(f"report: {len(records)} runs, {len(df)} rows, {len(html) / 1e6:.2f} MB, "
             f"{time.perf_counter() - t0:.1f}s")
    return out


def render(page: dict) -> str:
    """The page dict through the packaged template (autoescaped; figures are trusted SVG)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("featprobe.reporting", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = _pct
    return env.get_template("report.html.j2").render(**page)


def read_curves(directory: Path) -> list[dict]:
    """Few-shot curve records (``featprobe curve``) that have points to draw."""
    from featprobe.runs.curves import read_curves as read

    records = read(directory)
    return [r for r in records if isinstance(r, dict) and r.get("kind", "curve") == "curve"
            and isinstance(r.get("points"), list) and r["points"]]


def _pct(value, digits: int = 1) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(v) else f"{100 * v:.{digits}f}"


def _has_intervals(df: pd.DataFrame) -> bool:
    return {"val_acc_ci_low", "val_acc_ci_high"} <= set(df.columns)


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _table(df: pd.DataFrame) -> dict:
    """The comparison table: headings (name, numeric?) and rows of (text, sort key) cells."""
    ci = _has_intervals(df)
    low, high = figures.interval(df) if len(df) else ([], [])
    extra = [c for c in ("dataset", "val_fraction") if c in df.columns]
    heads = [(c.replace("_", " "), False) for c in extra]
    heads += [(c, False) for c in ("backbone", "weights", "layer", "head", "params", "std.")]
    n_name = "n seeds" if "n_seeds" in df.columns else "n runs"
    heads += [(c, True) for c in (n_name, "val acc", "95% interval" if ci else "± std", "bal. acc",
                                  "macro F1", "train acc", "fit s")]
    heads.append(("mark", False))
    rows = []
    for i, (_, r) in enumerate(df.iterrows()):
        if ci:
            spread = ("–" if math.isnan(_num(r.get("val_acc_ci_low")))
                      else f"{_pct(low[i])} – {_pct(high[i])}")
        else:
            std = _num(r.get("val_acc_std"))
            spread = "–" if math.isnan(std) else f"± {100 * std:.1f}"
        tied = r.get("tied_best")
        mark = "best" if i == 0 else ("≈ best" if isinstance(tied, (bool, np.bool_)) and tied
                                      else "")
        n = _num(r.get("n_seeds", r.get("n_runs")))
        cells = [(_text(r.get(c)), _text(r.get(c), "")) for c in
                 (*extra, "backbone", "weights", "layer", "head", "params")]
        cells.append(({True: "yes", False: "no"}.get(r.get("standardize"), "–"),
                      str(r.get("standardize"))))
        cells += [("–" if math.isnan(n) else str(int(n)), n),
                  (_pct(r["val_acc"]), _num(r["val_acc"])),
                  (spread, _num(low[i]) if ci else _num(r.get("val_acc_std")))]
        cells += [(f(r.get(c)), _num(r.get(c))) for f, c in (
            (_pct, "val_bal_acc"), (_pct, "val_f1"), (_pct, "train_acc"),
            (_fmt_seconds, "fit_seconds"))]
        cells.append((mark, {"best": 2, "≈ best": 1}.get(mark, 0)))
        rows.append(dict(cells=[(t, "" if isinstance(k, float) and math.isnan(k) else k)
                                for t, k in cells],
                         baseline=r.get("kind") == "baseline" or r.get("backbone") == "cnn",
                         tied=bool(mark)))
    return dict(heads=heads, rows=rows)


def _text(value, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return missing
    return str(value)


def _fmt_seconds(v) -> str:
    v = _num(v)
    return "–" if math.isnan(v) else f"{v:.2f}"


def _summary(df: pd.DataFrame, best: BestHead | None) -> dict:
    """The headline: the best row, the CNN baseline and the majority-class rate."""
    out = {"best": None, "baseline": None, "majority": None, "n_rows": len(df)}
    if len(df):
        low, high = figures.interval(df.head(1))
        top = df.iloc[0]
        out["best"] = dict(label=figures.row_label(top), acc=top["val_acc"], low=low[0],
                           high=high[0], n=top.get("n_seeds", top.get("n_runs")))
        base = df[(df.get("kind", "probe") == "baseline") | (df["backbone"] == "cnn")]
        if len(base):
            out["baseline"] = base.iloc[0]["val_acc"]
        if "majority_rate" in df.columns and "dataset" not in df.columns:
            out["majority"] = df["majority_rate"].mean()
    return out


def _curves(curves: list[dict]) -> dict | None:
    """The latest curve per configuration, as one chart and one small table each."""
    if not curves:
        return None
    latest: dict[str, dict] = {}
    for c in sorted(curves, key=lambda c: str(c.get("created", ""))):
        label = f"{c.get('backbone')}/{c.get('layer')} {c.get('head')}"
        if c.get("params"):
            label += " [" + " ".join(f"{k}={v}" for k, v in sorted(c["params"].items())) + "]"
        if c.get("l2_normalize"):
            label += " (L2)"
        latest[label] = c | {"label": label}
    shown = list(latest.values())
    tables = [dict(label=c["label"], tries=c.get("tries"), seed=c.get("seed"),
                   points=sorted(c["points"], key=lambda p: p.get("n_per_class") or math.inf))
              for c in shown]
    return dict(chart=figures.draw(figures.curves_chart, shown), tables=tables)


def _best(best: BestHead | None) -> dict | None:
    if best is None:
        return None
    page = dict(b=best, seed=best.record.get("seed"), confusion=None)
    if best.confusion is not None and len(best.classes):
        page["confusion"] = figures.draw(figures.confusion_chart, best.confusion, best.classes)
    return page


def _provenance(records: list[dict], curves: list[dict]) -> dict:
    """What was compared: caches (dataset, backbone, weights, layers, preprocessing), the split,
    versions and dates, from the records and the caches' own attributes."""
    paths = {}
    for r in [*records, *curves]:
        if r.get("cache_path"):
            paths.setdefault(str(r["cache_path"]), r.get("cache"))
    caches = []
    for path in sorted(paths):
        entry = {"path": path, "facts": [], "preprocessing": None, "problem": None}
        try:
            meta = FeatureCache(path).meta
        except FeatprobeError as e:
            entry["problem"] = str(e)
        else:
            entry["facts"] = [(k, _short(meta[k])) for k in _CACHE_FACTS if k in meta]
            pre = meta.get("preprocessing")
            entry["preprocessing"] = json.dumps(pre, sort_keys=True) if pre else None
        caches.append(entry)
    baselines = [r for r in records if r.get("kind") == "baseline"]
    times = sorted(str(r["time"]) for r in records if r.get("time"))
    versions = sorted({" · ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {})
                                                                 .items())) for r in records}
                      - {""})
    facts = [("runs", f"{len(records)} ({len(records) - len(baselines)} probe, "
                      f"{len(baselines)} CNN baseline)"),
             ("datasets", ", ".join(sorted({str(r.get("dataset_fingerprint"))[:12]
                                            for r in records})) or "–"),
             ("val fraction", ", ".join(sorted({str(r.get("val_fraction")) for r in records}))),
             ("seeds", _ranges(sorted({r["seed"] for r in records
                                       if isinstance(r.get("seed"), int)}))),
             ("splits", f"{len({r.get('split_hash') for r in records})} distinct split hash(es); "
                        "stratified by class, seeded (docs/runs.md)"),
             ("train / val rows", ", ".join(sorted({f"{r.get('n_train')} / {r.get('n_val')}"
                                                     for r in records}))),
             ("first run", times[0] if times else "–"), ("last run", times[-1] if times else "–")]
    for b in baselines[:1]:
        facts.append(("CNN baseline params", _short(b.get("params"))))
    return dict(caches=caches, facts=facts, versions=versions)


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _ranges(values: list[int]) -> str:
    """``0,1,2,3,7`` → ``0-3, 7``."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ", ".join(out) or "–"
