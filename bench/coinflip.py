"""Selection bias check: real features, labels replaced by fair coin flips.

    .venv/bin/python bench/coinflip.py [--cache demo/cache/mobilenet_v2-....h5] [--seeds 10]

Nothing can be learned, so every honest number is chance (50%) within sampling noise. Each
head is fitted on ``--seeds`` seeded splits; the table gives the mean val accuracy, its 95%
interval over seeds and the gap to chance in standard errors. Run it against another checkout
(``PYTHONPATH=/path/to/old python bench/coinflip.py``) to compare protocols: heads or options
that checkout lacks show as n/a. Without --cache, Gaussian features (2,624 x 1,280) stand in.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

from featprobe.cache import FeatureCache, write_arrays
from featprobe.errors import FeatprobeError
from featprobe.probe.fit import fit

RUNS = [("linear", {}), ("linear", {"sweep": True}), ("logreg", {}),
        ("logreg", {"sweep": True}), ("svm", {}), ("svm", {"sweep": True}), ("knn", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, help="take the features of this cache's first layer")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--no-svm", action="store_true",
                    help="skip svm (LinearSVC needs minutes a fit on coin flips at C >= 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    if args.cache:
        c = FeatureCache(args.cache)
        X = c.features()[c.valid]
    else:
        X = rng.normal(size=(2624, 1280)).astype(np.float16)
    y = rng.integers(0, 2, size=len(X))
    tmp = Path(tempfile.mkdtemp())
    coin = write_arrays(tmp / "coin.h5", [f"{i}.png" for i in range(len(X))], y, ["a", "b"],
                        {"features": X}, meta={"backbone": "coin", "weights": "flip",
                                               "dataset_fingerprint": "coin"})
    print(f"{len(X)} rows x {X.shape[1]} features, labels are coin flips "
          f"(majority {100 * max(y.mean(), 1 - y.mean()):.1f}%)", file=sys.stderr)
    print("| head | options | mean val acc | 95% interval over seeds | (mean - 50%) / se |")
    print("|---|---|---:|---:|---:|")
    for head, kw in RUNS:
        if args.no_svm and head == "svm":
            continue
        try:
            accs = np.array([fit(coin, head=head, seed=s, standardize=True, runs_dir=tmp,
                                 **kw)["val"]["accuracy"] for s in range(args.seeds)])
        except (FeatprobeError, TypeError) as e:
            print(f"| {head} | {kw} | n/a | {str(e)[:40]} | |")
            continue
        se = accs.std(ddof=1) / math.sqrt(len(accs))
        half = stats.t.ppf(0.975, len(accs) - 1) * se
        lo, hi = accs.mean() - half, accs.mean() + half
        print(f"| {head} | {'--sweep' if kw else ''} | {100 * accs.mean():.1f}% | "
              f"{100 * lo:.1f}-{100 * hi:.1f}% | {(accs.mean() - 0.5) / se:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
