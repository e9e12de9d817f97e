"""GPU reproducibility: how far features move between identical runs, and GPU vs CPU.

    python3 bench/gpu_repro.py --data path/train.csv [--n 256] [--backbone mobilenet_v2]
        [--weights IMAGENET1K_V1]

Extracts the first ``--n`` images of ``--data`` (float32 storage) into fresh cache directories:
CUDA fp32 twice, CUDA fp16 twice, and CPU fp32 once as the reference, each in its own process
state (new cache dir, model rebuilt). Prints, per pair, whether the arrays are bit-identical
and the largest per-image relative error ‖a − b‖ / ‖b‖. featprobe leaves
``torch.backends.cudnn.benchmark`` off and does not force deterministic algorithms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe.extraction import extract  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1),
                                                             1e-30)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="IMAGENET1K_V1")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fp-repro-"))
    lines = args.data.read_text().splitlines(keepends=True)[: args.n + 1]
    csv = args.data.with_name(f"first{args.n}.csv")
    csv.write_text("".join(lines))
    runs = {}
    for name, device, prec in (("cuda fp32 #1", "cuda", "fp32"), ("cuda fp32 #2", "cuda", "fp32"),
                               ("cuda fp16 #1", "cuda", "fp16"), ("cuda fp16 #2", "cuda", "fp16"),
                               ("cpu fp32", "cpu", "fp32")):
        c = extract(csv, backbone=args.backbone, weights=args.weights, dtype="float32",
                    device=device, precision=prec, cache_dir=tmp / name.replace(" ", "_"),
                    progress=False)
        runs[name] = c.features(c.layers[0])
    print(f"{args.backbone} {args.weights}, {args.n} images, float32 storage")
    print("| pair | bit-identical | max per-image rel. error |")
    print("|---|---|---|")
    for a, b in (("cuda fp32 #1", "cuda fp32 #2"), ("cuda fp16 #1", "cuda fp16 #2"),
                 ("cuda fp32 #1", "cpu fp32"), ("cuda fp16 #1", "cpu fp32")):
        same = np.array_equal(runs[a], runs[b])
        print(f"| {a} vs {b} | {same} | {rel(runs[a], runs[b]):.2e} |")


if __name__ == "__main__":
    main()
