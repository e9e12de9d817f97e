"""Accuracy benchmark: the demo's comparison over 5 seeds (5 different stratified splits).

    .venv/bin/python bench/accuracy.py [--out demo] [--seeds 0 1 2 3 4] [--n N]

Reuses the demo's data and caches (running the extraction if needed), fits every head on the
pretrained and random-init MobileNetV2 features and trains the CNN baseline once per seed,
records everything in <out>/bench/runs.jsonl (runs already there are skipped), and prints
mean ± std val accuracy per method plus the majority-class rate, as a markdown table.
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
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
    for seed in args.seeds:
        for cache in caches:
            for head in demo.HEADS:
                if not any(r["cache"] == cache.path.name and r["head"] == head
                           and r["seed"] == seed for r in done):
                    fit(cache, head=head, seed=seed, runs_dir=runs_dir,
                        standardize=demo.STANDARDIZE)
        if not any(r["kind"] == "baseline" and r["seed"] == seed for r in done):
            baseline(csv_path, cache_dir=runs_dir, seed=seed, progress=False, **demo.BASELINE)
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    runs = [r for r in read_runs(runs_dir) if r["seed"] in args.seeds]
    df = compare(runs)
    print(format_table(df, "markdown"))
    majority = [r["majority_rate"] for r in runs if r.get("majority_rate") is not None]
    n = len(caches[0])
    print(f"\nmajority-class rate (val): {100 * np.mean(majority):.1f}% · {n} images, "
          f"{len(args.seeds)} seeds, val fraction 0.1 · {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
