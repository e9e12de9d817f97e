"""Accuracy benchmark: the demo's comparison over 10 seeds (10 stratified splits).

    .venv/bin/python bench/accuracy.py [--out demo] [--seeds 0 1 ... 9] [--n N]

Reuses the demo's data and caches (running the extraction if needed), fits every head of the
demo as the demo asks for it (linear, logreg, svm with sweeps chosen on an inner split of the
training rows; mlp; knn) on the pretrained and random-init MobileNetV2 features and trains the
CNN baseline once per seed, records everything in <out>/bench/runs.jsonl (runs already there
are skipped), and prints `featprobe compare`'s markdown table: mean, std, 95% interval and
which rows are indistinguishable from the best (paired tests, docs/runs.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe import demo  # noqa: E402
from featprobe.cnn_baseline import baseline  # noqa: E402
from featprobe.extraction import extract  # noqa: E402
from featprobe.probe.fit import fit  # noqa: E402
from featprobe.runs import read_runs  # noqa: E402
from featprobe.runs.compare import compare, format_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--n", type=int, help="stratified subset of N images")
    args = ap.parse_args()
    t0 = time.perf_counter()
    csv_path = demo.prepare_data(args.out, n=args.n)
    demo.ensure_weights()
    runs_dir = args.out / "bench"
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = read_runs(runs_dir) if (runs_dir / "runs.jsonl").exists() else []
    caches = [extract(csv_path, backbone=demo.BACKBONE, weights=w, dtype=dtype,
                      cache_dir=args.out / "cache", progress=False)
              for w, dtype in demo.WEIGHTS.items()]
    for cache in caches:
        for head, kw in demo.HEADS.items():
            fit(cache, head=head, seeds=args.seeds, runs_dir=runs_dir, skip_recorded=True,
                standardize=demo.STANDARDIZE, **kw)
            print(f"{cache.meta['weights']} {head} done ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    todo = [s for s in args.seeds
            if not any(r["kind"] == "baseline" and r["seed"] == s for r in done)]
    if todo:
        baseline(csv_path, cache_dir=runs_dir, seeds=todo, progress=False, **demo.BASELINE)
    runs = [r for r in read_runs(runs_dir) if r["seed"] in args.seeds]
    df = compare(runs)
    print(format_table(df, "markdown"))
    majority = [r["majority_rate"] for r in runs if r.get("majority_rate") is not None]
    n = len(caches[0])
    print(f"\nmajority-class rate (val): {100 * np.mean(majority):.1f}% · {n} images, "
          f"{len(args.seeds)} seeds, val fraction 0.1 · {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
