"""Tensor (GPU) decode vs PIL, and bf16 vs fp32 autocast: how far apart the features are.

    python3 bench/decode_check.py --device cuda --n 256 --weights path/to/mobilenet_v2-b0353104.pth

Makes ``--n`` photo-like JPEGs in memory (mixed sizes, baseline and progressive, 4:2:0 and 4:4:4),
preprocesses them through the PIL path (`load_rgb` + the weights' transform, on CPU) and through the
tensor path (`featprobe.extraction.gpu_decode.decode_batch` on ``--device``: nvjpeg on CUDA), and
prints the normalised-pixel max/mean abs difference, the per-image relative error of the features
(``|f_tensor - f_pil| / |f_pil|``, fp32), and top-1 agreement of the model's own classifier. Then
the same images in bf16 autocast vs fp32 (PIL inputs): relative error and top-1 agreement.
``--photos DIR`` adds real JPEGs (e.g. foolbox's ``imagenet_*.jpg``; with ImageNet weights the label
in the name is checked too). ``--backbones`` lists the models: MobileNetV2 uses ``--weights`` (a
state-dict path, e.g. torchvision's ImageNet file; random init without it), the others random init.
``--summary FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featprobe.extraction import backbones, pixels  # noqa: E402
from featprobe.extraction.gpu_decode import decode_batch, sniff  # noqa: E402
from featprobe.extraction.images import load_rgb  # noqa: E402
from featprobe.policy import resolve_device  # noqa: E402

SIZES = [(500, 375), (375, 500), (640, 480), (320, 240), (512, 512), (800, 533)]


def photos(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (9 + i % 23)), np.cos(yy / (7 + i % 17)),
                         np.sin((xx * (i % 3 + 1) + yy) / (25 + i % 13))], -1)
        a = ((base + 1) * 110 + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
        b = io.BytesIO()
        Image.fromarray(a).save(b, "JPEG", quality=75 + i % 20, progressive=i % 4 == 3,
                                subsampling=0 if i % 5 == 4 else 2)
        out.append(b.getvalue())
    return out


def _model(backbone: str, weights: str | None, dev):
    choice = backbones.resolve_weights(backbone, weights or "none")
    model = backbones.build_model(backbone, choice)
    layer = backbones.resolve_layers(backbone, None)[-1]
    ext = backbones.FeatureExtractor(model, backbones.layer_sources(backbone, model, [layer]))
    return ext.to(dev).to(memory_format=torch.channels_last), layer, choice


def _run(ext, layer, x, dev, dtype, batch):
    feats, logits = [], []
    ctx = torch.autocast(dev.type, dtype=dtype) if dtype else torch.autocast(dev.type,
                                                                               enabled=False)
    with torch.inference_mode(), ctx:
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].to(dev).contiguous(memory_format=torch.channels_last)
            out = ext(xb)
            feats.append(out[layer].float().cpu())
            logits.append(ext.model(xb).float().argmax(1).cpu())
    return torch.cat(feats), torch.cat(logits)


def _rel(a, b):
    r = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
    return float(r.max()), float(r.median())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbones", default="mobilenet_v2,vgg16")
    ap.add_argument("--weights", default=None, help="MobileNetV2 state-dict file (else random)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--photos", help="a folder of real JPEGs (imagenet_*.jpg) to add")
    ap.add_argument("--summary", help="also write the figures to this JSON file")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    datas = photos(args.n)
    real = sorted(Path(args.photos).glob("imagenet_*.jpg")) if args.photos else []
    truth = torch.tensor([int(f.stem.split("_")[-1]) for f in real], dtype=torch.long)
    datas += [f.read_bytes() for f in real]
    assert all(sniff(d) == "" for d in datas)
    res: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "n": args.n, "models": {}}
    pixels_done = False
    for backbone in [b for b in args.backbones.split(",") if b]:
        weights = args.weights if backbone == "mobilenet_v2" else None
        ext, layer, choice = _model(backbone, weights, dev)
        pre = backbones.preprocessing(backbone, choice, args.image_size)
        if not pixels_done:  # one preprocessing for all (the same 256/224 ImageNet facts)
            transform = pixels.pixel_transform(pre)
            ref = pixels.normalize(torch.stack([transform(load_rgb(io.BytesIO(d)))
                                                for d in datas]), pre)
            t = time.perf_counter()
            xs, reasons = [], []
            for s in range(0, len(datas), args.batch_size):
                x, r = decode_batch(datas[s:s + args.batch_size], pre, dev, transform)
                xs.append(x.cpu())
                reasons += r
            tensor_s = time.perf_counter() - t
            x = torch.cat(xs)
            assert not any(reasons), reasons
            diff = (x - ref).abs()
            res["pixel_max_abs"] = float(diff.max())
            res["pixel_mean_abs"] = float(diff.mean())
            res["pixel_frac_differ"] = float((diff > 1e-4).float().mean())
            res["levels_max"] = float(diff.max() * 255 * min(pre["std"]))
            print(f"tensor decode on {dev} vs PIL, {len(datas)} JPEGs: normalised pixels max abs "
                  f"{res['pixel_max_abs']:.4f} (≈{res['levels_max']:.1f} 8-bit levels), mean "
                  f"{res['pixel_mean_abs']:.5f}, {100 * res['pixel_frac_differ']:.2f}% differ "
                  f"({args.n / tensor_s:.0f} img/s incl. first call)", flush=True)
            pixels_done = True
        name = f"{backbone}/{choice.name if choice.kind != 'file' else 'file'}"
        f_pil, top_pil = _run(ext, layer, ref, dev, None, args.batch_size)
        f_ten, top_ten = _run(ext, layer, x, dev, None, args.batch_size)
        m = res["models"][name] = {}
        m["decode_rel_max"], m["decode_rel_median"] = _rel(f_ten, f_pil)
        m["decode_top1_agree"] = float((top_ten == top_pil).float().mean())
        line = (f"{name} {layer}: tensor-vs-PIL feature rel err max {m['decode_rel_max']:.2e} "
                f"median {m['decode_rel_median']:.2e}, top-1 agree "
                f"{100 * m['decode_top1_agree']:.1f}%")
        if dev.type == "cuda" or backbone != "vgg16":
            f_bf, top_bf = _run(ext, layer, ref, dev, torch.bfloat16, args.batch_size)
            m["bf16_rel_max"], m["bf16_rel_median"] = _rel(f_bf, f_pil)
            m["bf16_top1_agree"] = float((top_bf == top_pil).float().mean())
            line += (f"; bf16-vs-fp32 rel err max {m['bf16_rel_max']:.2e} median "
                     f"{m['bf16_rel_median']:.2e}, top-1 agree {100 * m['bf16_top1_agree']:.1f}%")
        if dev.type == "cuda":  # fp16 has 3 more mantissa bits than bf16: the alternative
            f_h, top_h = _run(ext, layer, ref, dev, torch.float16, args.batch_size)
            m["fp16_rel_max"], m["fp16_rel_median"] = _rel(f_h, f_pil)
            m["fp16_top1_agree"] = float((top_h == top_pil).float().mean())
            m["fp16_nonfinite"] = int((~torch.isfinite(torch.as_tensor(f_h))).sum())
            line += (f"; fp16-vs-fp32 rel err max {m['fp16_rel_max']:.2e} median "
                     f"{m['fp16_rel_median']:.2e}, top-1 agree {100 * m['fp16_top1_agree']:.1f}%"
                     f", non-finite {m['fp16_nonfinite']}")
        if len(real) and choice.kind != "none":
            k = slice(args.n, None)
            m["photos_top1_pil"] = int((top_pil[k] == truth).sum())
            m["photos_top1_tensor"] = int((top_ten[k] == truth).sum())
            line += (f"; {len(real)} real photos top-1 right: PIL {m['photos_top1_pil']}, tensor "
                     f"{m['photos_top1_tensor']}")
            if "bf16_rel_max" in m:
                m["photos_top1_bf16"] = int((top_bf[k] == truth).sum())
                line += f", bf16 {m['photos_top1_bf16']}"
        print(line, flush=True)
        del ext
    res["seconds"] = time.perf_counter() - t0
    if args.summary:
        Path(args.summary).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
