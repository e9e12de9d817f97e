"""Extraction throughput: model-only vs featprobe's end-to-end extract, in one process.

    .venv/bin/python bench/extract_speed.py --backbone vgg16 --n 64 [--device cpu] [--batch-size 32]

(a) model-only: the same backbone, batch size, precision and memory format on tensors already
    on the device; (b) end-to-end: `featprobe.extract` over real JPEG files (500×375, quality
    90, made here in a temp dir) into a fresh cache. Prints both, where the time goes (decode +
    preprocess measured alone, forward, part writes), peak RSS, and last the ratio line
    `end-to-end/model-only: 0.NN`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe import backbones  # noqa: E402
from featprobe.extraction import extract  # noqa: E402
from featprobe.images import load_rgb  # noqa: E402
from featprobe.stream import _AUTOCAST, resolve_device, resolve_precision  # noqa: E402


def make_jpegs(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    lines = ["image_names,label"]
    for i in range(n):  # smooth photo-like content (JPEG-friendly), plus a little noise
        base = np.stack([np.sin(xx / (20 + i % 7)) , np.cos(yy / (15 + i % 5)),
                         np.sin((xx + yy) / 30)], -1)
        a = ((base + 1) * 110 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i:05d}.jpg", quality=90)
        lines.append(f"{i:05d}.jpg,{i % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def model_only(backbone: str, layers, dev, prec: str, batch: int, seconds: float) -> float:
    choice = backbones.resolve_weights(backbone, "none")
    model = backbones.build_model(backbone, choice)
    ext = backbones.FeatureExtractor(model, backbones.layer_sources(backbone, model, layers))
    ext = ext.to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(dev.type, dtype=_AUTOCAST[prec]) if prec in _AUTOCAST else None
    n, t = 0, None
    with torch.inference_mode():
        if ctx:
            ctx.__enter__()
        for i in range(10_000):
            out = ext(x)
            _ = {k: v.float().cpu() for k, v in out.items()}  # features leave the device
            if i == 0:  # warm-up batch not timed
                t = time.perf_counter()
                continue
            n += batch
            if time.perf_counter() - t > seconds:
                break
        if ctx:
            ctx.__exit__(None, None, None)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=20.0, help="model-only timing budget")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    prec = resolve_precision(args.precision, dev)
    batch = args.batch_size or (256 if dev.type == "cuda" else 32)
    layers = backbones.resolve_layers(args.backbone, args.layers.split(",") if args.layers
                                      else None)
    print(f"{args.backbone} layers={','.join(layers)} device={dev} precision={prec} "
          f"batch={batch} n={args.n} torch={torch.__version__} threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        csv = make_jpegs(Path(tmp), args.n)
        t = time.perf_counter()
        pre = backbones.preprocessing(args.backbone, backbones.resolve_weights(args.backbone,
                                                                              "none"))
        transform = backbones.make_transform(pre)
        files = sorted((Path(tmp) / "images").glob("*.jpg"))[: min(args.n, 64)]
        for f in files:
            transform(load_rgb(f))
        decode = len(files) / (time.perf_counter() - t)
        mo = model_only(args.backbone, layers, dev, prec, batch, args.seconds)
        t = time.perf_counter()
        extract(csv, backbone=args.backbone, weights="none", layers=layers,
                cache_dir=Path(tmp) / "cache", device=str(dev), precision=prec,
                batch_size=batch, workers=args.workers, progress=False)
        e2e = args.n / (time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"decode+preprocess, 1 process: {decode:8.1f} img/s")
    print(f"model-only:                   {mo:8.1f} img/s")
    print(f"end-to-end extract:           {e2e:8.1f} img/s  (incl. model build and "
          "consolidation)")
    print(f"peak RSS: {rss:.0f} MiB")
    print(f"end-to-end/model-only: {e2e / mo:.2f}")


if __name__ == "__main__":
    main()
