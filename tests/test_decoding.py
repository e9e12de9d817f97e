"""The tensor decode path (``decode="gpu"``), run on CPU tensors: same features as the PIL path
within the stated tolerance, and every file it will not take falls back to PIL, per image."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import torchvision_preset as make_transform
from PIL import Image

from featprobe.data import Dataset
from featprobe.errors import FeatprobeError
from featprobe.extraction import gpu_decode as decoding
from featprobe.extraction.backbones import preprocessing
from featprobe.extraction.gpu_decode import decode_batch, sniff
from featprobe.extraction.images import BadImage, load_rgb
from featprobe.extraction.pixels import normalize, pixel_transform
from featprobe.extraction.weights import packaged_mobilenet_v2, resolve_weights
from featprobe.policy import resolve_decode

ORIENTATION = 0x0112
PRE = preprocessing("mobilenet_v2", resolve_weights("mobilenet_v2", "none"))  # 256 → 224
PIXEL_TOL = 1.0 / 255 / min(PRE["std"]) + 1e-5  # one 8-bit level after normalisation ≈ 0.0175


def _photo(w=500, h=375, seed=0) -> np.ndarray:
    """Smooth photo-like content with a little noise (what JPEG is made for)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (17 + seed)), np.cos(yy / 13), np.sin((xx + yy) / 29)], -1)
    return ((base + 1) * 110 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)


def _encode(im: Image.Image, fmt="JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[ORIENTATION] = orientation
    return ex.tobytes()


def _two_tone(w=300, h=200) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left red
    arr[:, w // 2:] = (0, 0, 255)  # right blue
    return Image.fromarray(arr)


def _pil_path(data: bytes, transform) -> torch.Tensor:
    return transform(load_rgb(io.BytesIO(data)))


# ----------------------------------------------------------------------------- sniffing


def test_sniff_takes_plain_jpegs_and_sends_the_rest_to_pil():
    rgb = Image.fromarray(_photo(64, 48))
    assert sniff(_encode(rgb, quality=90)) == ""
    assert sniff(_encode(rgb, quality=90, progressive=True)) == ""
    assert sniff(_encode(rgb, subsampling=0)) == ""  # 4:4:4
    assert sniff(_encode(rgb, exif=_exif(1))) == ""
    assert sniff(_encode(rgb, exif=_exif(6))) == "EXIF orientation"
    assert sniff(_encode(rgb, "PNG")) == "not a JPEG"
    assert sniff(_encode(rgb, "WEBP")) == "not a JPEG"
    assert sniff(_encode(rgb.convert("L"))) == "grayscale JPEG"
    cmyk = sniff(_encode(rgb.convert("CMYK")))  # PIL writes an Adobe marker before the frame
    assert cmyk == "Adobe colour transform" or cmyk.startswith("4-component")
    good = _encode(rgb)
    assert sniff(good[: len(good) // 2]).startswith("no end-of-image")
    assert sniff(good[:2] + b"\xff\xd9") == "malformed JPEG header"  # SOI, EOI, nothing
    assert sniff(b"") == "not a JPEG"
    assert sniff(good + b"\x00" * 7) == ""  # zero padding after EOI is common and harmless
    assert sniff(good[:20] + b"\xff\xd9") == "malformed JPEG header"  # cut inside a segment


def test_sniff_never_crashes_on_garbage():
    rng = np.random.default_rng(0)
    good = _encode(Image.fromarray(_photo(32, 24)), exif=_exif(1))
    for k in range(300):
        data = bytearray(good[:600])
        for p in rng.integers(3, len(data), size=4):
            data[p] = rng.integers(0, 256)
        assert isinstance(sniff(bytes(data) + b"\xff\xd9"), str)
        assert isinstance(sniff(bytes(rng.bytes(k)) + b"\xff\xd9"), str)


def test_resolve_decode():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_decode("auto", cpu) == "cpu"
    assert resolve_decode("auto", cuda, workers=3) == "gpu"  # too few cores to keep up
    assert resolve_decode("auto", cuda, workers=15) == "cpu"  # measured faster on H100
    assert resolve_decode("gpu", cpu) == "gpu"  # the tensor path on CPU: allowed
    with pytest.raises(FeatprobeError, match="unknown decode"):
        resolve_decode("nvjpeg", cpu)


# ----------------------------------------------------------------------------- tolerance


def test_tensor_path_matches_pil_within_one_level():
    transform = make_transform(PRE)
    datas = [_encode(Image.fromarray(_photo(w, h, seed)), quality=90)
             for seed, (w, h) in enumerate([(500, 375), (500, 375), (375, 500), (256, 256),
                                            (224, 224), (200, 150), (640, 480)])]
    x, reasons = decode_batch(datas, PRE, "cpu")
    assert reasons == [""] * len(datas) and x.shape == (len(datas), 3, 224, 224)
    ref = torch.stack([_pil_path(d, transform) for d in datas])
    diff = (x - ref).abs()
    assert diff.max() <= PIXEL_TOL, diff.max()
    assert (diff > 1e-5).float().mean() < 0.02  # only a few pixels differ at all


# ----------------------------------------------------------------------------- fallback


def test_mixed_batch_falls_back_per_image():
    transform = make_transform(PRE)
    photo = Image.fromarray(_photo(300, 200))
    jpeg = _encode(photo, quality=90)
    corrupt = jpeg[:300] + bytes(64) + b"\xff\xd9"  # header intact, scan data gone
    batch = {
        "jpeg": jpeg,
        "progressive": _encode(photo, quality=90, progressive=True),
        "png": _encode(photo, "PNG"),
        "truncated": jpeg[: len(jpeg) // 2],
        "corrupt": corrupt,
        "cmyk": _encode(photo.convert("CMYK")),
        "gray": _encode(photo.convert("L")),
        "exif6": _encode(_two_tone(), exif=_exif(6), quality=95),
        "text": b"image_names,label\n",
        "jpeg2": _encode(Image.fromarray(_photo(300, 200, seed=3))),
    }
    x, reasons = decode_batch(list(batch.values()), PRE, "cpu")
    got = dict(zip(batch, zip(x, reasons)))
    for name, data in batch.items():
        img, reason = got[name]
        try:
            ref, why = _pil_path(data, transform), ""
        except BadImage as e:
            ref, why = torch.zeros(3, 224, 224), str(e)
        assert reason == why, name  # bad files: the CPU path's reason, word for word
        assert (img - ref).abs().max() <= PIXEL_TOL, name
    assert got["truncated"][1].startswith("cannot decode") and got["text"][1].startswith("not an")
    assert got["corrupt"][1] and not got["corrupt"][0].any()
    # EXIF 6: the picture stands up (taller than wide before the crop), red on top
    top, bottom = got["exif6"][0][:, 5, 112], got["exif6"][0][:, -5, 112]
    assert top[0] > 1 > top[2] and bottom[2] > 1 > bottom[0]


def test_batched_decoder_failure_is_retried_one_by_one(monkeypatch):
    datas = [_encode(Image.fromarray(_photo(120, 90, s))) for s in range(4)]
    real = decoding.decode_jpegs
    calls = []

    def flaky(ts, device):  # the batched call fails, and image 2 fails alone too
        calls.append(len(ts))
        if len(ts) > 1 or ts[0].numel() == len(datas[2]):
            raise RuntimeError("nvjpeg says no")
        return real(ts, device)

    monkeypatch.setattr(decoding, "decode_jpegs", flaky)
    x, reasons = decode_batch(datas, PRE, "cpu")
    assert calls == [4, 1, 1, 1, 1] and reasons == [""] * 4
    ref = _pil_path(datas[2], make_transform(PRE))
    assert torch.equal(x[2], ref)  # the culprit went through PIL


def test_decode_jpegs_warns_nothing(recwarn):
    data = torch.frombuffer(bytearray(_encode(Image.fromarray(_photo(40, 30)))), dtype=torch.uint8)
    (img,) = decoding.decode_jpegs([data], "cpu")
    assert img.shape == (3, 30, 40) and img.dtype == torch.uint8
    assert not [w for w in recwarn if "deprecat" in str(w.message).lower()]


def test_encoded_rows_through_a_worker(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    photo = Image.fromarray(_photo(120, 90))
    photo.save(root / "a.jpg", quality=90)
    photo.save(root / "b.png")
    (root / "c.jpg").write_bytes(_encode(photo)[:500])
    photo.save(root / "d.jpg", quality=80)
    ids = ["a.jpg", "b.png", "c.jpg", "d.jpg", "missing.jpg"]
    ds = Dataset(root, ids, np.zeros(5, dtype=np.int64), [0])
    pre = {**PRE, "resize_size": [73], "crop_size": [64]}
    rows = decoding.EncodedRows(ds, pixel_transform(pre), 64)  # uint8 crops for the PIL rows
    loader = torch.utils.data.DataLoader(rows, batch_size=5, num_workers=1,
                                         collate_fn=decoding.collate_encoded)
    (batch,) = list(loader)
    assert batch[3].tolist() == [0, 3] and batch[5].tolist() == [1, 2, 4]  # jpeg / PIL rows
    index, crops, reasons = decoding.assemble(batch, pre, torch.device("cpu"))
    assert crops.dtype == torch.uint8 and crops.shape == (5, 3, 64, 64)
    x = normalize(crops, pre)
    assert index.tolist() == [0, 1, 2, 3, 4]
    assert reasons[:2] == ["", ""] and reasons[3] == ""
    assert reasons[2].startswith("cannot decode") and reasons[4] == "file not found"
    transform = make_transform(pre)
    for k in (0, 1, 3):
        ref = transform(load_rgb(root / ids[k]))
        assert (x[k] - ref).abs().max() <= PIXEL_TOL
    assert torch.equal(x[1], transform(load_rgb(root / ids[1])))  # PNG: the PIL path exactly
    assert not crops[2].any() and not crops[4].any()  # bad files: zero pixels


# ----------------------------------------------------------------------------- real features

CKPT = packaged_mobilenet_v2()
FOOLBOX = importlib.util.find_spec("foolbox")


@pytest.mark.skipif(CKPT is None or FOOLBOX is None, reason="needs the real weights and photos")
def test_real_features_and_top1_agree_with_the_pil_path():
    """MobileNetV2 (ImageNet weights) on foolbox's 20 ImageNet photos (progressive JPEGs)."""
    files = sorted((Path(FOOLBOX.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    w = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    pre = preprocessing("mobilenet_v2", resolve_weights("mobilenet_v2", "IMAGENET1K_V1"))
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(CKPT, weights_only=True))
    model.eval()
    datas = [f.read_bytes() for f in files]
    assert all(sniff(d) == "" for d in datas)  # all 20 take the tensor path
    x, reasons = decode_batch(datas, pre, "cpu")
    ref = torch.stack([w.transforms()(Image.open(f).convert("RGB")) for f in files])
    pixel = (x - ref).abs().max().item()
    feats = {}
    model.classifier[1].register_forward_pre_hook(lambda m, a: feats.setdefault(len(feats), a[0]))
    with torch.inference_mode():
        logits = model(torch.cat([x, ref]))
    f_tensor, f_pil = feats[0][:20], feats[0][20:]
    rel = ((f_tensor - f_pil).norm(dim=1) / f_pil.norm(dim=1)).max().item()
    agree = int((logits[:20].argmax(1) == logits[20:].argmax(1)).sum())
    print(f"\ntensor vs PIL decode (CPU, 20 photos): pixel max abs {pixel:.4f}, feature rel err "
          f"max {rel:.2e}, top-1 agreement {agree}/20")
    assert reasons == [""] * 20
    assert pixel <= PIXEL_TOL
    assert rel < 0.01
    assert agree == 20


# ----------------------------------------------------------------------------- end to end


def test_extract_through_the_tensor_path_matches_the_pil_cache(tmp_path):
    """``extract(decode="gpu", device="cpu")``: the tensor path on CPU; same key, close features."""
    from click.testing import CliRunner

    from featprobe.cache import FeatureCache
    from featprobe.cli import main
    from featprobe.extraction import extract

    root = tmp_path / "images"
    root.mkdir()
    lines = ["image_names,label"]
    for i in range(10):
        Image.fromarray(_photo(90 + 7 * i, 70, seed=i)).save(root / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg,{i % 2}")
    Image.fromarray(_photo(80, 80)).save(root / "p.png")
    Image.fromarray(_photo(80, 60)).convert("L").save(root / "g.jpg")
    (root / "t.jpg").write_bytes((root / "0.jpg").read_bytes()[:400])
    lines += ["p.png,0", "g.jpg,1", "t.jpg,0"]
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    kw = dict(images=root, backbone="resnet18", weights="none", image_size=48, dtype="float32",
              batch_size=4, on_error="skip", progress=False)
    pil = extract(csv, cache_dir=tmp_path / "a", decode="cpu", workers=0, **kw)
    r = CliRunner().invoke(main, ["extract", str(csv), "--images", str(root), "--backbone",
                                  "resnet18", "--weights", "none", "--image-size", "48",
                                  "--dtype", "float32", "--batch-size", "4", "--on-error", "skip",
                                  "--workers", "1", "--decode", "gpu", "--cache-dir",
                                  str(tmp_path / "b"), "-q"])
    assert r.exit_code == 0, r.output
    gpu = FeatureCache(r.output.strip().splitlines()[-1])
    assert pil.path.name == gpu.path.name  # decode is not in the cache key
    assert (pil.meta["decode"], gpu.meta["decode"]) == ("cpu", "gpu")
    assert pil.bad == gpu.bad and [i for i, _ in gpu.bad] == ["t.jpg"]
    a, b = pil.features(), gpu.features()
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    assert rel.max() < 0.02, rel.max()
    assert np.array_equal(a[~pil.valid], b[~gpu.valid])  # the bad row: zeros in both
    # the same request again, asking for gpu: the finished cache, whichever path made it
    again = extract(csv, cache_dir=tmp_path / "a", decode="gpu", workers=0, **kw)
    assert again.path == pil.path and again.meta["decode"] == "cpu"
    with pytest.raises(FeatprobeError, match="--decode must be"):
        extract(csv, cache_dir=tmp_path / "a", decode="nvjpeg", **kw)
