"""Fit-stage speed: seconds per head on float16 caches made here, through `featprobe.fit`.

    .venv/bin/python bench/fit_speed.py [--sizes 1500x25088 100000x4096] [--heads ...]
                                        [--big-heads linear] [--big-max-memory 512MB]

For each size, writes a real cache (featprobe.cache.write_arrays: the extract code path) of
two-class features in float16, then times `featprobe.fit` for each head (fit seconds as
recorded in the run, i.e. training only; a sweep's includes scoring its grid), the 12-head
linear sweep (its ratio to one head from runs taken turn about), and — for logreg/svm —
scikit-learn called directly on the same arrays, to show featprobe adds no hidden copies.

Sizes of 10,000 rows or more run only `--big-heads` (lbfgs/liblinear on 90,000 x 4,096 take
minutes here), each in a child process so its peak RSS can be printed: once in memory and
once out of core under `--big-max-memory`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import peak_rss_child  # noqa: E402

from featprobe.cache import write_arrays  # noqa: E402
from featprobe.probe.fit import fit  # noqa: E402
from featprobe.splits import split  # noqa: E402


class _Rows:
    """Rows generated per part (write_arrays slices it), so making a big cache is bounded."""

    def __init__(self, y, d):
        self.y, self.d = y, d

    def __getitem__(self, rows: slice):
        start, stop, _ = rows.indices(len(self.y))
        rng = np.random.default_rng([0, start])
        X = rng.standard_normal((stop - start, self.d), dtype=np.float32)
        X[:, :32] += self.y[start:stop, None] * 0.5  # learnable signal in a few dimensions
        return np.maximum(X, 0)  # ReLU-like features, as VGG's


def make_cache(directory: Path, n: int, d: int):
    y = np.random.default_rng(0).integers(0, 2, n)
    return write_arrays(directory / f"bench-{n}x{d}.h5", [f"{i}.jpg" for i in range(n)], y,
                        [0, 1], {"f": _Rows(y, d)}, meta={"backbone": "bench"})


def big(cache, size, heads, max_memory, epochs, tmp) -> None:
    """Each head in a child process, in memory and out of core: seconds and peak RSS."""
    gb = cache.shapes["f"][0] * cache.shapes["f"][1] * 2 / 2**30
    print(f"{size:>12} (features {gb:.2f} GiB float16)")
    for head in heads:
        for mm in (None, max_memory):
            args = {"cache": str(cache.path), "head": head, "runs_dir": tmp}
            if head in ("linear", "mlp"):
                args["epochs"] = epochs
            if mm:
                args["max_memory"] = mm
            r = peak_rss_child(**args)
            rec, peak, base = r["record"], r["peak_rss"], r["baseline_rss"]
            where = f"out-of-core {mm}" if rec["out_of_core"] else "in memory"
            label = f"{head} x{epochs}ep" if "epochs" in args else head
            print(f"{size:>12} {label:>14} {rec['fit_seconds']:>8.2f} {'':>9} "
                  f"{100 * rec['val']['accuracy']:>7.1f}%  {where}: peak RSS "
                  f"{peak / 2**20:,.0f} MiB (+{(peak - base) / 2**20:,.0f} MiB over post-import)",
                  flush=True)


def _alternating(cache, tmp, rounds: int) -> tuple[float, float, float]:
    """Best-of-``rounds`` seconds of one linear fit and of the sweep, run turn about so that
    the machine's drift hits both alike, and the sweep's val accuracy."""
    one = swept = float("inf")
    for _ in range(rounds):
        one = min(one, fit(cache, head="linear", runs_dir=tmp)["fit_seconds"])
        rec = fit(cache, head="linear", sweep=True, runs_dir=tmp)
        swept = min(swept, rec["fit_seconds"])
    return one, swept, rec["val"]["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1500x25088", "100000x4096"])
    ap.add_argument("--heads", nargs="+", default=["linear", "logreg", "svm", "mlp"])
    ap.add_argument("--big-heads", nargs="+", default=["linear"])
    ap.add_argument("--big-max-memory", default="512MB")
    ap.add_argument("--big-epochs", type=int, default=3, help="torch heads on big sizes")
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy "
          f"{np.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"{'cache':>12} {'head':>14} {'fit s':>8} {'direct s':>9} {'val acc':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n, d = (int(v) for v in size.split("x"))
            cache = make_cache(Path(tmp), n, d)
            if n >= 10_000:
                big(cache, size, args.big_heads, args.big_max_memory, args.big_epochs, tmp)
                continue
            s = split(cache.ids, cache.labels)
            X, y = cache.features(), cache.labels
            ratios = {}
            for name in args.heads:
                if name == "mlp" and d > 8192 and len(args.heads) > 1:
                    # 4096 hidden units on 25,088 inputs: ~25 TFLOP for 30 epochs, minutes here
                    print(f"{size:>12} {name:>14}  skipped (use --sizes {size} --heads mlp)")
                    continue
                best, acc = float("inf"), None
                for _ in range(args.repeat if name != "mlp" else 1):
                    rec = fit(cache, head=name, runs_dir=tmp)
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
                    ratios[name] = best / min(times)
                print(f"{size:>12} {name:>14} {best:>8.2f} {direct:>9} {100 * acc:>7.1f}%")
            one, swept, acc = _alternating(cache, tmp, args.repeat)
            print(f"{size:>12} {'linear --sweep':>14} {swept:>8.2f} {'':>9} {100 * acc:>7.1f}%")
            print(f"{size:>12} sweep/one-linear: {swept / one:.2f} (alternating, best of "
                  f"{args.repeat}: one {one:.2f} s, sweep {swept:.2f} s)")
            for name, r in ratios.items():
                print(f"{size:>12} {name} featprobe/direct: {r:.2f}")


if __name__ == "__main__":
    main()
