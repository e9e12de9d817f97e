"""Scale benchmark: featprobe on caches bigger than RAM budgets (issue 6.4).

    .venv/bin/python bench/scale.py fit [--rows 1000000] [--dim 4096] [--max-memory 2GB]
                                        [--epochs 1] [--dir DIR] [--keep]
    .venv/bin/python bench/scale.py extract [--n 512] [--ranks 2] [--backbone resnet18]

Subcommands share the helpers at the top (`peak_rss_child`, `synthetic_cache`); each one is a
function `cmd_<name>(args)` registered in `main()`.

`fit` writes a synthetic float16 cache of ``rows x dim`` (1,000,000 x 4,096 = 8.2 GB by
default) with `featprobe.cache.write_arrays` — the extract code path, fed a few thousand rows
at a time, so making it is bounded in memory too — then fits the `linear` head on it with
`--max-memory` in a child process and prints seconds per epoch, the child's peak RSS and its
growth over the post-import baseline, and val accuracy. Features are class-dependent means
plus Gaussian noise, so accuracy is meaningful (well above chance, below 100%).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import scale_extract  # noqa: E402

# --------------------------------------------------------------------------- shared helpers


class SyntheticFeatures:
    """Rows ``[start:stop]`` generated on demand: class mean + N(0, 1) noise, float32.

    Deterministic per row block, so any slice can be produced without holding the matrix.
    """

    def __init__(self, labels: np.ndarray, dim: int, sep: float, seed: int = 0):
        self.labels, self.dim = labels, dim
        self.shape = (len(labels), dim)
        rng = np.random.default_rng(seed)
        self.means = rng.standard_normal((int(labels.max()) + 1, dim), dtype=np.float32) * sep
        self.seed = seed

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        rng = np.random.default_rng([self.seed, start])
        x = rng.standard_normal((stop - start, self.dim), dtype=np.float32)
        x += self.means[self.labels[start:stop]]
        return x


def synthetic_cache(directory: Path, rows: int, dim: int, n_classes: int = 10,
                    sep: float = 0.04):
    """A float16 cache ``scale-<rows>x<dim>.h5`` in ``directory`` (reused if present)."""
    from featprobe.cache import FeatureCache, write_arrays

    path = directory / f"scale-{rows}x{dim}.h5"
    if path.exists():
        return FeatureCache(path), 0.0
    labels = np.random.default_rng(1).integers(0, n_classes, rows)
    t = time.perf_counter()
    cache = write_arrays(path, [f"{i:07d}.jpg" for i in range(rows)], labels,
                         list(range(n_classes)), {"fc7": SyntheticFeatures(labels, dim, sep)},
                         meta={"backbone": "synthetic"})
    return cache, time.perf_counter() - t


_CHILD = r"""
import json, resource, sys, time
import featprobe.probe.fit, featprobe.probe.outofcore, torch, sklearn, h5py  # noqa: F401

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
args = json.loads(sys.argv[1])
t = time.perf_counter()
rec = featprobe.probe.fit.fit(args.pop("cache"), **args)
print(json.dumps({"record": rec, "wall_s": time.perf_counter() - t, "baseline_rss": base,
                  "peak_rss": status("VmHWM")}))
"""


def peak_rss_child(**fit_args) -> dict:
    """Run ``featprobe.probe.fit.fit(**fit_args)`` in a fresh process; its record and peak RSS."""
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(fit_args)], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"fit child failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


# --------------------------------------------------------------------------- fit


def cmd_fit(args) -> None:
    from featprobe.probe.outofcore import parse_size

    tmp = None
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fp-scale-",
                                                                      dir="/tmp"))
    if not args.dir:
        tmp = directory
    directory.mkdir(parents=True, exist_ok=True)
    try:
        gb = args.rows * args.dim * 2 / 1e9
        print(f"cache: {args.rows:,} x {args.dim:,} float16 = {gb:.2f} GB in {directory}",
              flush=True)
        cache, made = synthetic_cache(directory, args.rows, args.dim)
        if made:
            print(f"  written in {made:.0f} s ({gb / made:.2f} GB/s, parts + consolidation)",
                  flush=True)
        budget = parse_size(args.max_memory)
        res = peak_rss_child(cache=str(cache.path), head="linear", epochs=args.epochs,
                             max_memory=args.max_memory, runs_dir=str(directory),
                             progress=True)
        rec = res["record"]
        ooc = rec["out_of_core"] or {}
        per_epoch = rec["fit_seconds"] / args.epochs
        rows_per_s = rec["n_train"] / per_epoch
        print(f"fit linear, {args.epochs} epoch(s), --max-memory {args.max_memory} "
              f"({'out-of-core' if ooc else 'in memory'}; shuffle buffer "
              f"{_mib(ooc.get('buffer_bytes', 0))}, blocks of {ooc.get('block_rows')} rows)")
        print(f"  train {rec['n_train']:,} rows, val {rec['n_val']:,} rows")
        print(f"  seconds per epoch: {per_epoch:.1f}  ({rows_per_s:,.0f} rows/s, "
              f"{rec['n_train'] * args.dim * 2 / per_epoch / 1e9:.2f} GB/s of features)")
        print(f"  whole fit incl. streamed train+val scoring: {res['wall_s']:.1f} s")
        print(f"  val accuracy {100 * rec['val']['accuracy']:.2f}%  "
              f"(train {100 * rec['train']['accuracy']:.2f}%, chance ~{100 / 10:.0f}%)")
        growth = res["peak_rss"] - res["baseline_rss"]
        print(f"  peak RSS {_mib(res['peak_rss'])}; growth over the post-import baseline "
              f"{_mib(growth)} (budget {_mib(budget)}; the growth also holds the cache's "
              f"ids/labels/split, {rec['n_train'] + rec['n_val']:,} rows, and torch's first-use "
              f"workspaces)")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- extract

# Sharded extraction: the same extract as 1 process and as N torchrun ranks
# (bench/scale_extract.py, which also runs on its own).


def cmd_extract(args) -> None:
    scale_extract.run_args(args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="out-of-core linear fit on a synthetic cache")
    f.add_argument("--rows", type=int, default=1_000_000)
    f.add_argument("--dim", type=int, default=4096)
    f.add_argument("--max-memory", default="2GB")
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--dir", help="where to write the cache (default: a temp dir on /tmp)")
    f.add_argument("--keep", action="store_true", help="keep the temp dir")
    f.set_defaults(func=cmd_fit)
    e = sub.add_parser("extract", help="1 process vs N torchrun ranks, same cache")
    scale_extract.add_arguments(e)
    e.set_defaults(func=cmd_extract)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
