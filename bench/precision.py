"""Precision honesty: features under bf16/fp16 autocast vs fp32, and what heads make of them.

    .venv/bin/python bench/precision.py [--data demo/data/train.csv] [--precisions fp32 bf16]
        [--device cpu] [--seeds 0 1 2 3 4] [--n N]

Extracts the same images (default: the demo's 2,624 ELPV solar cells, MobileNetV2 with its real
IMAGENET1K_V1 weights) once per compute precision, all stored as float32 so storage adds no
error, then prints (1) each precision's relative error against fp32: ‖X − X₃₂‖_F / ‖X₃₂‖_F over
the whole matrix, the median per-image relative error and the worst per-image cosine
similarity; (2) val accuracy of `logreg` and `linear` (standardised) fitted on each, over the
same seeded stratified splits, with the mean paired difference to fp32 in points. This is the
check that lets `--precision auto` pick bf16 (see featprobe.extraction.stream.resolve_precision).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe import demo  # noqa: E402
from featprobe.extraction import extract  # noqa: E402
from featprobe.probe.fit import fit  # noqa: E402

HEADS = ("logreg", "linear")


def relative_errors(x: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    whole = np.linalg.norm(x - ref) / np.linalg.norm(ref)
    rows = np.linalg.norm(x - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    cos = (x * ref).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1),
                                        1e-30)
    return float(whole), float(np.median(rows)), float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="CSV or folder tree (default: the demo's ELPV set)")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="IMAGENET1K_V1")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--n", type=int, help="stratified subset of N demo images")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "fp-precision")
    args = ap.parse_args()
    if args.data is None:
        args.data = demo.prepare_data(Path("demo"), n=args.n)
        demo.ensure_weights()
    assert args.precisions[0] == "fp32", "the first precision is the reference"
    caches, seconds = {}, {}
    for prec in args.precisions:
        t = time.perf_counter()
        caches[prec] = extract(args.data, backbone=args.backbone, weights=args.weights,
                               precision=prec, dtype="float32", device=args.device,
                               batch_size=args.batch_size, cache_dir=args.cache_dir,
                               progress=False)
        seconds[prec] = time.perf_counter() - t
        print(f"{prec}: {caches[prec].path.name} ({seconds[prec]:.0f} s)", file=sys.stderr,
              flush=True)
    ref = caches["fp32"]
    layer = ref.layers[0]
    acc = {p: {h: [] for h in HEADS} for p in args.precisions}
    for seed in args.seeds:
        for prec, cache in caches.items():
            for head in HEADS:
                r = fit(cache, head=head, layer=layer, seed=seed, standardize=True, record=False)
                acc[prec][head].append(100 * r["val"]["accuracy"])
    print(f"\n{args.backbone} {args.weights}, layer {layer}, {len(ref)} images, device "
          f"{args.device}, {len(args.seeds)} seeds\n")
    print("| precision | rel. error ‖ΔX‖/‖X‖ | median per-image | min cosine | "
          + " | ".join(f"{h} val acc (Δ vs fp32)" for h in HEADS) + " |")
    print("|---|---|---|---|" + "---|" * len(HEADS))
    x32 = ref.features(layer)
    for prec, cache in caches.items():
        whole, median, cos = relative_errors(cache.features(layer), x32)
        cells = []
        for h in HEADS:
            a = np.array(acc[prec][h])
            d = a - np.array(acc["fp32"][h])
            cells.append(f"{a.mean():.2f} ± {a.std():.2f} ({d.mean():+.2f}, max |Δ| "
                         f"{np.abs(d).max():.2f})")
        print(f"| {prec} | {whole:.2e} | {median:.2e} | {cos:.6f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
