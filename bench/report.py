"""How long `featprobe report` takes and how big the page is: on the demo's runs (if made) and on
a large directory: 200 recorded configurations over a 100,000-row cache whose ids point at real
ELPV images (symlinks), so thumbnails are made from real files.

    python bench/report.py [--demo demo/cache] [--rows 100000] [--dim 512] [--runs 200]

Prints one line per case: seconds (the whole report: with the best run's saved head, refitting
it, and without the best head's section) and megabytes."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(directory: Path, out: Path, refit: bool = True) -> tuple[float, float]:
    from featprobe.reporting import report

    t = time.perf_counter()
    report(directory, out, refit=refit)
    return time.perf_counter() - t, out.stat().st_size / 1e6


def large(root: Path, rows: int, dim: int, runs: int, head: str) -> Path:
    """A cache of ``rows`` × ``dim`` (10 classes), one real fit and ``runs - 1`` more records of
    other configurations with lower made-up accuracies."""
    import featprobe as fp
    from featprobe.cache import write_arrays
    from featprobe.demo import elpv_labels
    from featprobe.runs import append_run

    images = root / "images"
    images.mkdir(parents=True)
    sources = [p for p, _, _ in elpv_labels()]
    ids = [f"img{i:06d}.png" for i in range(rows)]
    for i, name in enumerate(ids):
        os.symlink(sources[i % len(sources)], images / name)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, rows)
    centres = rng.normal(size=(10, dim))
    X = (rng.normal(size=(rows, dim)) + 0.35 * centres[y]).astype(np.float16)
    cache = write_arrays(root / "cache" / "big.h5", ids, y, [f"c{k}" for k in range(10)],
                         {"feat": X}, meta={"source": str(root / "train.csv"),
                                            "backbone": "synthetic"})
    best = fp.fit(cache, head=head, save=root / "best-head.npz")
    for k in range(runs - 1):  # other values of C (never the best run's C = 1)
        C = float(10 ** (-4 + 6 * (k + 0.5) / (runs - 1)))
        append_run(cache.directory, {**best, "run_id": f"{k:032x}", "params_set": {"C": C},
                                     "params": {**best["params"], "C": C},
                                     "val": {**best["val"], "accuracy": float(
                                         best["val"]["accuracy"] - rng.uniform(0.01, 0.2))}})
    return cache.directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("demo/cache"))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--head", default="logreg")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (args.demo / "runs.jsonl").is_file():
            s, mb = timed(args.demo, tmp / "demo.html")
            s0, _ = timed(args.demo, tmp / "demo0.html", refit=False)
            print(f"demo ({args.demo}): {s:.1f} s ({s0:.1f} s without the refit), {mb:.2f} MB")
        t = time.perf_counter()
        directory = large(tmp / "large", args.rows, args.dim, args.runs, args.head)
        print(f"made {args.runs} runs over {args.rows:,} x {args.dim} in "
              f"{time.perf_counter() - t:.0f} s")
        saved, mb = timed(directory, tmp / "large.html")
        s0, _ = timed(directory, tmp / "large0.html", refit=False)
        (tmp / "large" / "best-head.npz").unlink()
        s, _ = timed(directory, tmp / "large1.html")
        print(f"{args.runs} runs, {args.rows:,}-row cache ({args.head} best): {saved:.1f} s with "
              f"its saved head, {s:.1f} s refitting it, {s0:.1f} s without ({mb:.2f} MB)")


if __name__ == "__main__":
    main()
