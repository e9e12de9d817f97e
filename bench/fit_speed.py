"""Fit-stage speed: seconds per head on float16 caches made here, through `featprobe.fit`.

    .venv/bin/python bench/fit_speed.py [--sizes 1500x25088 1500x4096] [--heads ...]

For each size, writes a real cache (featprobe.cache.write_arrays: the extract code path) of
two-class features in float16, then times `featprobe.fit` for each head (fit seconds as
recorded in the run, i.e. training only), the 12-head linear sweep, and — for logreg/svm —
scikit-learn called directly on the same arrays, to show featprobe adds no hidden copies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe.cache import write_arrays  # noqa: E402
from featprobe.fitting import fit  # noqa: E402
from featprobe.splits import split  # noqa: E402


def make_cache(directory: Path, n: int, d: int):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    X = rng.normal(0, 1, (n, d)).astype(np.float32)
    X[:, :32] += y[:, None] * 0.5  # learnable signal in a few dimensions
    X = np.maximum(X, 0)  # ReLU-like features, as VGG's
    return write_arrays(directory / f"bench-{n}x{d}.h5", [f"{i}.jpg" for i in range(n)], y,
                        [0, 1], {"f": X}, meta={"backbone": "bench"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1500x25088", "1500x4096"])
    ap.add_argument("--heads", nargs="+", default=["linear", "logreg", "svm", "mlp"])
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    args = ap.parse_args()
    print(f"{'cache':>12} {'head':>14} {'fit s':>8} {'direct s':>9} {'val acc':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n, d = (int(v) for v in size.split("x"))
            cache = make_cache(Path(tmp), n, d)
            s = split(cache.ids, cache.labels)
            X, y = cache.features(), cache.labels
            one_linear = None
            for head in [*args.heads, "linear --sweep"]:
                name, sweep = head.split()[0], head.endswith("--sweep")
                if name == "mlp" and d > 8192 and len(args.heads) > 1:
                    # 4096 hidden units on 25,088 inputs: ~25 TFLOP for 30 epochs, minutes here
                    print(f"{size:>12} {head:>14}  skipped (use --sizes {size} --heads mlp)")
                    continue
                best, acc = float("inf"), None
                for _ in range(args.repeat if name != "mlp" else 1):
                    rec = fit(cache, head=name, sweep=sweep, runs_dir=tmp)
                    best, acc = min(best, rec["fit_seconds"]), rec["val"]["accuracy"]
                direct = ""
                if name in ("logreg", "svm"):
                    times = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        direct_est = (LogisticRegression(max_iter=1000) if name == "logreg"
                                      else LinearSVC(random_state=0))
                        direct_est.fit(X[s.train], y[s.train])
                        times.append(time.perf_counter() - t)
                    direct = f"{min(times):.2f}"
                if head == "linear":
                    one_linear = best
                print(f"{size:>12} {head:>14} {best:>8.2f} {direct:>9} {100 * acc:>7.1f}%")
            if one_linear:
                print(f"{size:>12} sweep/one-linear: {best / one_linear:.2f}")


if __name__ == "__main__":
    main()
