"""Extraction throughput: model-only vs featprobe's end-to-end extract, in one process.

    .venv/bin/python bench/extract_speed.py --backbone vgg16 --n 64 [--device cpu] [--batch-size 32]
    python3 bench/extract_speed.py --backbone vgg16 --n 4000 --device cuda --decode gpu,cpu

(a) model-only: the same backbone, batch size, precision and memory format on tensors already
    on the device; (b) end-to-end: `featprobe.extract`, loading the same (random-init) weights
    from a file as a user's pretrained weights are loaded, over real JPEG files (500×375, quality
    90, made here in a temp dir by a process pool) into a fresh cache, once per `--decode` path
    (`cpu`: PIL in DataLoader workers; `gpu`: bytes from the workers, JPEGs decoded on the
    device; on a CPU device `gpu` runs the same tensor path on CPU). Also the steady streaming
    rate (decode → forward → part writes, without model build and consolidation), and where the
    time goes, each stage measured alone: decode (+ preprocess, with the same workers), host-to-
    device copy, forward (= model-only), cast to float16 + copy back (the main process's own
    per-batch work), part write. Prints peak RSS, and last the ratio line
    `end-to-end/model-only: 0.NN` (of the path `--decode auto` picks on this device, when several
    are measured). `--summary FILE` also writes the figures as JSON.

    `--main-threads N` sets the main process's torch threads (the suspect on a 16-core GPU host:
    16 intra-op threads beside 15 decoding workers).

    `--rounds K` (default 3) alternates model-only and end-to-end K times in the same process
    and keeps the best of each: on a shared machine another tenant's load only ever slows a
    measurement down, and alternating makes both sides see the same conditions (measured here:
    single-shot ratios for one setting ranged 0.72-1.00 from run to run).

    .venv/bin/python bench/extract_speed.py --post-only [--batch-size 256] [--device ...]

prints just the main process's per-batch work after the forward pass for the backbone's layers
(VGG16: pool5 + fc7), float32 → float16 cast and loss count on the device plus the copy to the
host, next to the numpy cast the loop used before (no model, no images: seconds).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe.cache import PartialCache  # noqa: E402
from featprobe.data import load_dataset  # noqa: E402
from featprobe.extraction import (  # noqa: E402
    backbones,
    extract,  # noqa: E402
    pixels,
)
from featprobe.extraction import gpu_decode as decoding
from featprobe.extraction.stream import (  # noqa: E402
    _AUTOCAST,
    StorageCast,
    _PartWriter,
    _to_host,
    feature_batches,
    image_loader,
)
from featprobe.policy import default_workers, resolve_device, resolve_precision  # noqa: E402

W, H = 500, 375
N_BASES = 32


def _base(i: int) -> np.ndarray:
    """A smooth photo-like picture (JPEG-friendly) with a little noise."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([np.sin(xx / (20 + i % 7)), np.cos(yy / (15 + i % 5)),
                     np.sin((xx + yy) / (30 + i % 11))], -1)
    return ((base + 1) * 110 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)


def _write(job):
    """Files ``start..stop``: one of a few base pictures, shifted and tinted, re-encoded."""
    folder, start, stop = job
    bases = {}
    for i in range(start, stop):
        b = bases.setdefault(i % N_BASES, _base(i % N_BASES))
        a = np.roll(b, (i * 7) % W, axis=1)
        a = np.clip(a.astype(np.int16) + (i % 13) - 6, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(Path(folder) / f"{i:06d}.jpg", quality=90)


def make_jpegs(root: Path, n: int, jobs: int | None = None, unique: int | None = None) -> Path:
    """``n`` JPEGs in ``root/images`` and ``root/train.csv``; with ``unique``, only that many
    distinct files, the rest hard links to them (a large ``--n`` made in seconds; decoding
    still reads and decodes every file)."""
    if unique and unique < n:
        csv = make_jpegs(root, unique, jobs)
        for i in range(unique, n):
            os.link(root / "images" / f"{i % unique:06d}.jpg", root / "images" / f"{i:06d}.jpg")
        lines = ["image_names,label"] + [f"{i:06d}.jpg,{i % 2}" for i in range(n)]
        csv.write_text("\n".join(lines) + "\n")
        return csv
    (root / "images").mkdir(parents=True)
    jobs = jobs or len(os.sched_getaffinity(0))
    step = max(1, -(-n // (4 * jobs)))
    chunks = [(str(root / "images"), s, min(n, s + step)) for s in range(0, n, step)]
    if jobs > 1 and len(chunks) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            pool.map(_write, chunks)
    else:
        for c in chunks:
            _write(c)
    lines = ["image_names,label"] + [f"{i:06d}.jpg,{i % 2}" for i in range(n)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _extractor(backbone, layers, dev, save_to: Path | None = None):
    model = backbones.build_model(backbone, backbones.resolve_weights(backbone, "none"))
    if save_to is not None:  # the same weights as a file: extract loads them as users' do
        torch.save(model.state_dict(), save_to)
    ext = backbones.FeatureExtractor(model, backbones.layer_sources(backbone, model, layers))
    return ext.to(dev).to(memory_format=torch.channels_last)


def model_only(ext, layers, dev, prec: str, batch: int, size: int, seconds: float) -> float:
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(dev.type, dtype=_AUTOCAST[prec]) if prec in _AUTOCAST else None
    n, t = 0, None
    with torch.inference_mode():
        if ctx:
            ctx.__enter__()
        for i in range(100_000):
            out = ext(x)
            # features leave the device in the cache's default dtype, as extract's do
            _ = {k: v.to(torch.float16).cpu() for k, v in out.items()}
            if i == 0:  # warm-up batch not timed
                t = time.perf_counter()
                continue
            n += batch
            if time.perf_counter() - t > seconds:
                break
        if ctx:
            ctx.__exit__(None, None, None)
    return n / (time.perf_counter() - t)


def decode_stage(ds, pre, dev, mode, batch, workers, max_batches) -> float:
    """img/s of decode + preprocess alone: the DataLoader, plus the device decode for ``gpu``."""
    n = min(len(ds), batch * max_batches)
    batches = [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]
    loader, transform = image_loader(ds, pre, dev, mode, batches, workers)
    t, seen = None, 0
    with torch.inference_mode():
        for b in loader:
            if mode == "gpu":
                _, x, _ = decoding.assemble(b, pre, dev, transform)
            else:
                x = b[1].to(dev, non_blocking=True)
            x = pixels.normalize(x, pre)
            _sync(dev)
            if t is None:  # the first batch waits for worker start-up: not timed
                t = time.perf_counter()
                continue
            seen += len(x)
    return seen / (time.perf_counter() - t) if seen else float("nan")


def h2d_stage(ds, pre, dev, mode, batch, repeats=20) -> float:
    """img/s of the host-to-device copy of one pinned batch: uint8 crops (cpu) or JPEG bytes
    (gpu)."""
    if dev.type != "cuda":
        return float("nan")
    if mode == "gpu":
        nbytes = sum(os.path.getsize(ds.path(i)) for i in range(min(len(ds), batch)))
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    else:
        c = pre["crop_size"][0]
        host = torch.empty(batch, 3, c, c, dtype=torch.uint8).pin_memory()
    host.to(dev)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        host.to(dev, non_blocking=True)
    _sync(dev)
    return batch * repeats / (time.perf_counter() - t)


def post_stage(dims: dict, batch: int, dev, repeats=10) -> tuple[float, float]:
    """img/s of the main process's work on a batch's features after the forward pass: the
    float16 cast with its loss count on ``dev`` and the copy to the host (what extract does),
    and of the numpy cast + count the loop did on the host before (for comparison)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    out = {k: torch.randn(batch, d, device=dev, generator=gen).relu_() for k, d in dims.items()}
    reasons = [""] * batch

    def torch_path():
        _to_host(out, list(dims), StorageCast("float16"), reasons)
        _sync(dev)

    host = {k: v.cpu().numpy() for k, v in out.items()}
    valid = np.ones(batch, bool)

    def numpy_path():  # the loop's code before the cast moved to the device
        for f in host.values():
            x = f.astype(np.float16, copy=False)
            x[~valid] = 0
            nonzero = np.count_nonzero(f[valid])
            _ = nonzero - np.count_nonzero(np.isfinite(x[valid]) & (x[valid] != 0))

    rates = []
    for fn in (torch_path, numpy_path):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        rates.append(batch * repeats / (time.perf_counter() - t))
    return rates[0], rates[1]


def write_stage(dims: dict, batch: int, root: Path, repeats=8) -> float:
    """img/s of writing float16 feature parts (npz + fsync + rename), as the writer thread does."""
    partial = PartialCache(root / "w.h5")
    partial.dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {f"f_{k}": rng.random((batch, d), dtype=np.float32).astype(np.float16)
              for k, d in dims.items()}
    arrays.update(start=np.int64(0), valid=np.ones(batch, bool), bad_ids=np.array([], str),
                  bad_reasons=np.array([], str))
    t = time.perf_counter()
    for k in range(repeats):
        partial.write_part(k, arrays)
    return batch * repeats / (time.perf_counter() - t)


def stream_rate(ds, backbone, layers, pre, dev, prec, batch, workers, mode, root: Path) -> float:
    """Steady img/s of decode → forward → part writes (first batch, model build excluded)."""
    choice = backbones.resolve_weights(backbone, "none")
    batches = [list(range(s, min(len(ds), s + batch))) for s in range(0, len(ds), batch)]
    partial = PartialCache(root / f"s-{mode}.h5")
    partial.dir.mkdir(parents=True)
    writer = _PartWriter(partial)
    t, seen = None, 0
    try:
        for k, (rows, feats, _) in enumerate(feature_batches(
                ds, backbone, choice, layers, pre, dev, prec, batches, workers, progress=False,
                decode=mode, cast=StorageCast("float16"))):
            writer.put(k, {f"f_{x}": v for x, v in feats.items()})
            if t is None:
                t = time.perf_counter()
                continue
            seen += len(rows)
    finally:
        writer.close()
    writer.check()
    return seen / (time.perf_counter() - t) if seen else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--decode", default="auto",
                    help="auto, cpu, gpu, or a comma-separated list (e.g. gpu,cpu)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="crop size (default: 224)")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="model-only timing budget (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate model-only and end-to-end this many times; best of each")
    ap.add_argument("--stage-batches", type=int, default=8, help="batches per stage measurement")
    ap.add_argument("--jobs", type=int, default=None, help="processes making the JPEGs")
    ap.add_argument("--unique", type=int, default=None,
                    help="make only this many distinct JPEGs, the rest as hard links")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--summary", help="also write the figures to this JSON file")
    ap.add_argument("--main-threads", type=int, default=None,
                    help="torch intra-op threads of this (the main) process; default torch's")
    ap.add_argument("--post-only", action="store_true",
                    help="only the main process's per-batch cast + copy (no model, no images)")
    args = ap.parse_args()
    if args.main_threads:
        torch.set_num_threads(args.main_threads)
    dev = resolve_device(args.device)
    prec = resolve_precision(args.precision, dev)
    batch = args.batch_size or (256 if dev.type == "cuda" else 32)
    modes = [decoding.resolve_decode(m.strip(), dev) for m in args.decode.split(",")]
    primary = decoding.resolve_decode("auto", dev)
    primary = primary if primary in modes else modes[0]
    layers = backbones.resolve_layers(args.backbone, args.layers.split(",") if args.layers
                                      else None)
    pre = backbones.preprocessing(args.backbone, backbones.resolve_weights(args.backbone, "none"),
                                  args.image_size)
    size = pre["crop_size"][0]
    workers = default_workers(dev) if args.workers is None else args.workers
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    if args.post_only:
        return _post_only(args.backbone, layers, dev, name, batch, size)
    print(f"{args.backbone} layers={','.join(layers)} device={dev} ({name}) precision={prec} "
          f"batch={batch} n={args.n} workers={workers} decode={','.join(modes)} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    res: dict = {"backbone": args.backbone, "device": name, "precision": prec, "batch": batch,
                 "n": args.n, "workers": workers, "decode": {},
                 "main_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        csv = make_jpegs(Path(tmp), args.n, args.jobs, args.unique)
        print(f"made {args.n} JPEGs in {time.perf_counter() - t:.1f} s", flush=True)
        ds = load_dataset(csv)
        weights = Path(tmp) / f"{args.backbone}-random.pth"
        ext = _extractor(args.backbone, layers, dev, save_to=weights)
        dims = _dims(ext, size, dev) if not args.no_stages else {}
        mos = [model_only(ext, layers, dev, prec, batch, size, args.seconds / args.rounds)]
        print(f"model-only:                   {mos[0]:8.1f} img/s", flush=True)
        if not args.no_stages:
            res["write"] = write_stage(dims, batch, Path(tmp) / "wstage")
            res["post"], res["post_numpy"] = post_stage(dims, batch, dev)
        tiny = csv.with_name("tiny.csv")  # 2 images: what a run costs besides its images
        tiny.write_text("".join(csv.read_text().splitlines(keepends=True)[:3]))
        for mode in modes:
            r = res["decode"][mode] = {}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            seconds = {}
            for k in range(args.rounds):
                if k or mode != modes[0]:
                    mos.append(model_only(ext, layers, dev, prec, batch, size,
                                          args.seconds / args.rounds))
                for name, data in (("fixed", tiny), ("all", csv)):
                    if name == "fixed" and k:
                        continue
                    t = time.perf_counter()
                    extract(data, backbone=args.backbone, weights=str(weights), layers=layers,
                            cache_dir=Path(tmp) / f"cache-{mode}-{k}", device=str(dev),
                            precision=prec, batch_size=batch, workers=workers,
                            image_size=args.image_size, progress=False, decode=mode)
                    took = time.perf_counter() - t
                    seconds[name] = min(seconds.get(name, took), took)
                    if name == "all":
                        print(f"[decode={mode}] round {k + 1}: model-only {mos[-1]:8.1f} img/s, "
                              f"end-to-end {args.n / took:8.1f} img/s", flush=True)
            r["e2e"] = args.n / seconds["all"]
            r["fixed_s"] = seconds["fixed"]
            past = seconds["all"] - seconds["fixed"]
            r["e2e_past_fixed"] = (args.n - 2) / past if past > 0 else float("nan")
            print(f"[decode={mode}] fixed cost of a run (model build, workers, a 2-image cache): "
                  f"{seconds['fixed']:.2f} s; past it {r['e2e_past_fixed']:8.1f} img/s",
                  flush=True)
            r["stream"] = stream_rate(ds, args.backbone, layers, pre, dev, prec, batch, workers,
                                      mode, Path(tmp) / f"stream-{mode}")
            print(f"[decode={mode}] end-to-end extract: {r['e2e']:8.1f} img/s (incl. model build "
                  f"and consolidation); steady stream: {r['stream']:8.1f} img/s", flush=True)
            if not args.no_stages:
                mo = max(mos)
                r["decode_stage"] = decode_stage(ds, pre, dev, mode, batch, workers,
                                                 args.stage_batches)
                r["h2d"] = h2d_stage(ds, pre, dev, mode, batch)
                print(f"[decode={mode}] where the time goes, each stage alone "
                      f"(img/s; ms per batch of {batch}):", flush=True)
                for stage, v in (("decode+preprocess", r["decode_stage"]),
                                 ("host-to-device", r["h2d"]), ("forward", mo),
                                 ("cast+copy back", res["post"]),
                                 ("part write", res["write"])):
                    ms = 1000 * batch / v if v == v and v > 0 else float("nan")
                    print(f"    {stage:18s} {v:10.1f} img/s  {ms:8.2f} ms", flush=True)
        del ext
    mo = res["model_only"] = max(mos)
    print(f"model-only, best of {len(mos)}: {mo:8.1f} img/s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["peak_rss_mib"] = rss
    print(f"peak RSS: {rss:.0f} MiB")
    for mode in modes:
        r = res["decode"][mode]
        r["ratio"], r["stream_ratio"] = r["e2e"] / mo, r["stream"] / mo
        r["past_fixed_ratio"] = r["e2e_past_fixed"] / mo
        print(f"[decode={mode}] end-to-end/model-only: {r['ratio']:.2f} "
              f"(past the {r['fixed_s']:.1f} s fixed cost: {r['past_fixed_ratio']:.2f}; "
              f"steady stream/model-only: {r['stream_ratio']:.2f})")
    if args.summary:
        Path(args.summary).write_text(json.dumps(res, indent=1) + "\n")
    print(f"end-to-end/model-only: {res['decode'][primary]['ratio']:.2f}")


def _dims(ext, size: int, dev) -> dict:
    """Each layer's feature width, from one forward pass of a blank image."""
    with torch.inference_mode():
        x = torch.zeros(1, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
        return {k: int(v.shape[1]) for k, v in ext(x).items()}


def _post_only(backbone, layers, dev, name, batch, size) -> None:
    dims = _dims(_extractor(backbone, layers, dev), size, dev)
    new, old = post_stage(dims, batch, dev)
    ms = {k: 1000 * batch / v for k, v in (("new", new), ("old", old))}
    print(f"main-process work per batch of {batch} after the forward ({backbone}: "
          + ", ".join(f"{k} {d}" for k, d in dims.items()) + f"; {name}):")
    print(f"    cast to float16 + loss count on {dev}, copy to host: {ms['new']:7.1f} ms "
          f"({new:8.0f} img/s)")
    print(f"    numpy astype + loss count on the host (before):      {ms['old']:7.1f} ms "
          f"({old:8.0f} img/s)")
    print(f"before/after: {ms['old'] / ms['new']:.2f}")


if __name__ == "__main__":
    main()
