"""Plug-in backbones (issue 16): timm and open_clip models, random-init and tiny, through extract
→ fit → predict; their features against the libraries' own calls; weights files; crop modes.

Tolerance: features computed by featprobe (channels-last, batched through the DataLoader) and by
the library's own calls on its own transform's tensors agree within 1e-4 (absolute and relative,
float32 on CPU); the preprocessed pixels agree exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featprobe.cli import main
from featprobe.extraction import extract
from featprobe.extraction.pixels import normalize, pixel_transform
from featprobe.probe.headfile import load_head

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
TOL = dict(rtol=1e-4, atol=1e-4)
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 4, "width": 64,
                                              "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 1}}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[Path]]:
    """12 images of two separable classes, landscape and portrait (crops matter), in a CSV."""
    root = tmp_path_factory.mktemp("photos")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows, files = [], []
    for i in range(12):
        label = i % 2
        h, w = (40, 64) if i % 3 else (64, 40)
        base = np.array([60, 20, 20] if label == 0 else [190, 200, 240])
        arr = np.clip(base + rng.integers(-40, 41, size=(h, w, 3)), 0, 255).astype(np.uint8)
        arr[:, : w // 5] = 255 - arr[:, : w // 5]  # an edge a centre crop cuts away
        f = root / "images" / f"p{i:02d}.png"
        Image.fromarray(arr).save(f)
        rows.append(f"{f.name},{label}")
        files.append(f)
    csv = root / "photos.csv"
    csv.write_text("image_names,label\n" + "\n".join(rows) + "\n")
    return csv, files


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("oc") / "featprobe-tiny-ViT.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "featprobe-tiny-ViT"


def _seeded(build):
    torch.manual_seed(0)
    return build()


def _library_batch(transform, files) -> torch.Tensor:
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def _run(args, ok=True):
    r = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + r.stderr
    return r


def _features(path, layer) -> np.ndarray:
    with h5py.File(path) as f:
        return f["features"][layer][:].astype(np.float32)


def test_timm_vit_extract_fit_predict_equal_library(photos, tmp_path):
    csv, files = photos
    layers = "pooled,cls,avg,cls+avg,last4"
    r = _run(["extract", csv, "--backbone", "timm:test_vit", "--weights", "none", "--layers",
              layers, "--dtype", "float32", "--cache-dir", tmp_path / "c", "-q"])
    assert r.stdout.count("\n") == 1  # stdout: the cache path only
    path = Path(r.stdout.strip())
    ref = _seeded(lambda: timm.create_model("test_vit", pretrained=False)).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref))
    with h5py.File(path) as f:
        a = dict(f.attrs)
    assert (a["library"], a["model_name"], a["weights"]) == ("timm", "test_vit", "none")
    assert a["library_version"] == timm.__version__
    assert json.loads(a["preprocessing"]) == {
        "resize_size": [168], "crop_size": [160], "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bicubic", "antialias": True}  # timm's data config for test_vit

    x = _library_batch(transform, files)
    pre = json.loads(a["preprocessing"])  # featprobe's pixels: exactly timm's transform
    ours = torch.stack([pixel_transform(pre)(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(normalize(ours, pre), x)
    with torch.inference_mode():
        tokens = ref.forward_features(x)
        blocks = ref.get_intermediate_layers(x, n=4, return_prefix_tokens=True, norm=True)
        want = {"pooled": ref.forward_head(tokens, pre_logits=True), "cls": tokens[:, 0],
                "avg": tokens[:, 1:].mean(1),
                "last4": torch.cat([torch.cat([p[:, 0], s.mean(1)], 1) for s, p in blocks], 1)}
    want["cls+avg"] = torch.cat([want["cls"], want["avg"]], 1)
    for layer, value in want.items():
        np.testing.assert_allclose(_features(path, layer), value.numpy(), **TOL, err_msg=layer)
    assert _features(path, "last4").shape == (12, 4 * 2 * 64)

    head = tmp_path / "h.npz"
    _run(["fit", path, "--layer", "cls+avg", "--head", "logreg", "--save", head,
          "--runs-dir", tmp_path / "runs"])
    out = tmp_path / "pred.csv"
    _run(["predict", head, csv, "--out", out])
    est, _ = load_head(head)

    df = pd.read_csv(out)
    proba = est.predict_proba(_features(path, "cls+avg")).max(1)
    np.testing.assert_allclose(df["probability"].to_numpy(), proba, rtol=1e-4, atol=1e-5)


def test_timm_cnn_stages_and_weights_file_round_trip(photos, tmp_path):
    csv, files = photos
    torch.manual_seed(7)  # weights that are not featprobe's seeded random init
    src = timm.create_model("test_resnet", pretrained=False).eval()
    from safetensors.torch import save_file
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=src))
    x = _library_batch(transform, files)
    stages = {}
    for name in ("layer2", "layer4"):
        src.get_submodule(name).register_forward_hook(
            lambda m, a, out, k=name: stages.__setitem__(k, out.mean((2, 3))))
    with torch.inference_mode():
        pooled = src.forward_head(src.forward_features(x), pre_logits=True)
    paths = []
    for w in ("w.safetensors", "w.pth"):
        cache = extract(csv, backbone="timm:test_resnet", weights=tmp_path / w,
                        layers="pooled,layer2,layer4", dtype="float32", workers=0,
                        cache_dir=tmp_path / "c", progress=False)
        assert cache.meta["weights"] == "file"
        from featprobe.extraction.weights import sha256_file
        assert cache.meta["weights_sha256"] == sha256_file(tmp_path / w)
        assert cache.meta["weights_id"] == "sha256:" + sha256_file(tmp_path / w)
        np.testing.assert_allclose(cache.features("pooled"), pooled.numpy(), **TOL)
        for name, value in stages.items():
            np.testing.assert_allclose(cache.features(name), value.numpy(), **TOL)
        paths.append(cache.path)
    assert paths[0] != paths[1]  # the weights' identity is the file's SHA-256
    # a file of another model: one error line, exit 2, nothing written
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "other.pth")
    r = _run(["extract", csv, "--backbone", "timm:test_resnet", "--weights",
              tmp_path / "other.pth", "--cache-dir", tmp_path / "d"], ok=False)
    assert r.exit_code == 2 and "does not match timm:test_resnet" in r.stderr
    assert r.stdout == "" and not (tmp_path / "d").exists()


def test_open_clip_extract_fit_predict_equal_encode_image(photos, tiny_clip, tmp_path):
    csv, files = photos
    cache = extract(csv, backbone=f"open_clip:{tiny_clip}", weights="none",
                    layers=["embed", "cls", "cls+avg", "last4"], dtype="float32", workers=0,
                    cache_dir=tmp_path / "c", progress=False)
    model, _, preprocess = _seeded(lambda: open_clip.create_model_and_transforms(
        tiny_clip, pretrained=None))
    model.eval()
    x = _library_batch(preprocess, files)
    v, kept = model.visual, []
    for block in v.transformer.resblocks[-4:]:
        block.register_forward_hook(lambda m, a, out: kept.append(v.ln_post(out)))
    with torch.inference_mode():
        embed = model.encode_image(x)
    last4 = torch.cat([torch.cat([t[:, 0], t[:, 1:].mean(1)], 1) for t in kept], 1)
    np.testing.assert_allclose(cache.features("embed"), embed.numpy(), **TOL)
    np.testing.assert_allclose(cache.features("cls") @ v.proj.detach().numpy(), embed.numpy(),
                               **TOL)  # CLIP's embedding is the class token, projected
    np.testing.assert_allclose(cache.features("last4"), last4.numpy(), **TOL)
    np.testing.assert_allclose(cache.features("cls+avg"), last4[:, -128:].numpy(), **TOL)
    assert (cache.meta["library"], cache.meta["model_name"]) == ("open_clip", tiny_clip)

    head = tmp_path / "h.npz"
    _run(["fit", cache.path, "--layer", "embed", "--save", head, "--runs-dir", tmp_path / "r"])
    _run(["predict", head, csv, "--out", tmp_path / "p.csv"])
    est, _ = load_head(head)

    got = pd.read_csv(tmp_path / "p.csv")["label"].to_numpy()
    np.testing.assert_array_equal(got, np.array(cache.classes)[est.predict(
        cache.features("embed"))])


def test_crop_modes_against_reference_and_in_key(photos, tmp_path):
    csv, files = photos
    pre = {"resize_size": [232], "crop_size": [24], "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "interpolation": "bilinear", "antialias": True}
    for f in files[:3]:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        squash = pixel_transform({**pre, "crop": "squash"})(im)
        want = np.asarray(im.resize((24, 24), Image.BILINEAR)).transpose(2, 0, 1)
        np.testing.assert_array_equal(squash.numpy(), want)
        box = pixel_transform({**pre, "crop": "letterbox"})(im)
        s = 24 / max(w, h)
        nw, nh = round(w * s), round(h * s)
        canvas = Image.new("RGB", (24, 24), (124, 116, 104))  # the mean colour
        canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((24 - nw) // 2, (24 - nh) // 2))
        np.testing.assert_array_equal(box.numpy(), np.asarray(canvas).transpose(2, 0, 1))

    names, caches = set(), {}
    for crop in ("center", "squash", "letterbox"):
        c = extract(csv, backbone="timm:test_resnet", weights="none", crop=crop, workers=0,
                    dtype="float32", cache_dir=tmp_path / "c", progress=False)
        recorded = json.loads(c.meta["preprocessing"]) if isinstance(
            c.meta["preprocessing"], str) else c.meta["preprocessing"]
        assert recorded.get("crop", "center") == crop and ("crop" in recorded) == (crop != "center")
        names.add(c.path.name)
        caches[crop] = c
    assert len(names) == 3  # the crop is in the content-addressed key
    head = tmp_path / "h.npz"
    _run(["fit", caches["letterbox"].path, "--save", head, "--runs-dir", tmp_path / "r"])
    _run(["predict", head, csv, "--out", tmp_path / "p.csv"])

    est, meta = load_head(head)
    assert meta["preprocessing"]["crop"] == "letterbox"
    proba = est.predict_proba(caches["letterbox"].features("pooled")).max(1)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")["probability"], proba,
                               rtol=1e-4, atol=1e-5)  # predict letterboxes too


def test_missing_extra_is_one_line_naming_the_install(photos, tmp_path, monkeypatch):
    csv, _ = photos
    for lib, extra in (("timm", "timm"), ("open_clip", "clip")):
        monkeypatch.setitem(sys.modules, lib, None)  # import fails as if not installed
        r = _run(["extract", csv, "--backbone", f"{lib}:x", "--cache-dir", tmp_path / "c"],
                 ok=False)
        assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.output
        assert r.stderr.strip().splitlines() == [
            f"error: --backbone {lib}:... needs the {lib} package: "
            f"pip install \"featprobe[{extra}]\""]
    assert not (tmp_path / "c").exists()


def test_backbones_lists_plugins_and_a_models_layers(tiny_clip):
    r = _run(["backbones"])
    assert "timm:<model name>" in r.stdout and "open_clip:<architecture>" in r.stdout
    r = _run(["backbones", "timm:test_vit"])
    assert "pooled (64), cls (64), avg (64), cls+avg (128), last4 (512)" in r.stdout
    r = _run(["backbones", f"open_clip:{tiny_clip}"])
    assert "embed (32), cls (64)" in r.stdout
    r = _run(["backbones", "timm:no_such_model"], ok=False)
    assert r.exit_code == 2 and "timm has no model 'no_such_model'" in r.stderr


def test_offline_pretrained_tag_fails_before_writing(photos, tmp_path, monkeypatch):
    csv, _ = photos
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    r = _run(["extract", csv, "--backbone", "timm:test_vit", "--cache-dir", tmp_path / "c"],
             ok=False)
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.startswith("error: timm:test_vit weights 'DEFAULT' are not on this machine")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "c").exists()
