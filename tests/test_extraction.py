"""featprobe extract: cache contents, content addressing, reuse, bad images, weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import torchvision_preset as make_transform
from PIL import Image

import featprobe
from featprobe.cache import FeatureCache, H5Builder, PartialCache
from featprobe.errors import FeatprobeError
from featprobe.extraction import backbones, extract
from featprobe.extraction.backbones import preprocessing
from featprobe.extraction.images import load_rgb
from featprobe.extraction.weights import resolve_weights, sha256_file

FAST = dict(backbone="resnet18", weights="none", image_size=32, progress=False, workers=0)


def write_set(root: Path, n: int = 12, size=(40, 30)) -> Path:
    """A tutorial-format set: train.csv (image_names,emergency_or_no) and images/."""
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    lines = ["image_names,emergency_or_no"]
    for i in range(n):
        a = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        a[..., i % 2] = 220
        Image.fromarray(a).save(img / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg,{i % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


@pytest.fixture
def data(tmp_path):
    return write_set(tmp_path / "data")


def direct_features(csv: Path, backbone: str, weights: str, layer_module: str, image_size=None,
                    use_input=False):
    """The reference: torchvision model + its transform, images one batch, no featprobe loop."""
    choice = resolve_weights(backbone, weights)
    model = backbones.build_model(backbone, choice)
    t = make_transform(preprocessing(backbone, choice, image_size))
    rows = [line.split(",")[0] for line in csv.read_text().splitlines()[1:]]
    x = torch.stack([t(load_rgb(csv.parent / "images" / r)) for r in rows])
    out = {}
    mod = model.get_submodule(layer_module)
    if use_input:
        mod.register_forward_pre_hook(lambda m, a: out.__setitem__("f", a[0].flatten(1)))
    else:
        mod.register_forward_hook(lambda m, a, o: out.__setitem__("f", o.flatten(1)))
    with torch.inference_mode():
        logits = model(x)
    return out["f"].numpy(), logits.numpy()


def test_cache_layout_and_values(data, tmp_path):
    cache = extract(data, cache_dir=tmp_path / "c", dtype="float32", batch_size=5, **FAST)
    assert cache.path.parent == tmp_path / "c" and cache.path.name.startswith("resnet18-")
    assert cache.layers == ["avgpool"] and cache.shapes["avgpool"] == (12, 512)
    assert cache.ids == [f"{i}.jpg" for i in range(12)]
    assert cache.classes == [0, 1] and list(cache.labels) == [i % 2 for i in range(12)]
    assert cache.valid.all() and cache.bad == []
    ref, _ = direct_features(data, "resnet18", "none", "avgpool", image_size=32)
    # channels-last convolutions sum in another order: fp32 agreement to ~1e-6 absolute
    np.testing.assert_allclose(cache.features("avgpool"), ref, rtol=1e-4, atol=1e-5)
    # readable with plain h5py, nothing pickled, everything the format spec promises
    with h5py.File(cache.path, "r") as f:
        assert set(f) >= {"ids", "labels", "valid", "features", "bad"}
        assert json.loads(f["labels"].attrs["classes"]) == [0, 1]
        a = f.attrs
        assert a["complete"] and a["format_version"] == 1 and a["n_valid"] == 12
        for key in ("backbone", "weights", "weights_sha256", "layers", "preprocessing", "dtype",
                    "torch_version", "torchvision_version", "device", "dataset_fingerprint",
                    "created_at", "featprobe_version", "precision"):
            assert key in a, key
        assert json.loads(a["preprocessing"])["crop_size"] == [32]
        assert f["features/avgpool"].dtype == np.float32
        assert f["features/avgpool"].attrs["sha256"]
    assert not list((tmp_path / "c").glob("*.partial"))


def test_float16_and_rows(data, tmp_path):
    c16 = extract(data, cache_dir=tmp_path / "c", dtype="float16", **FAST)
    c32 = extract(data, cache_dir=tmp_path / "c", dtype="float32", **FAST)
    assert c16.path != c32.path
    assert c16.features().dtype == np.float16
    np.testing.assert_allclose(c16.features().astype(np.float32), c32.features(), rtol=2e-3,
                               atol=1e-3)
    rows = np.array([7, 2, 2, 11])
    np.testing.assert_array_equal(c32.features(rows=rows), c32.features()[rows])


def test_vgg16_layers_in_one_pass(data, tmp_path):
    """pool5/fc6/fc7 of one forward pass match the model's own classifier applied in steps."""
    cache = extract(data, cache_dir=tmp_path / "c", backbone="vgg16", weights="none",
                    layers="pool5,fc6,fc7", image_size=32, dtype="float32", progress=False,
                    workers=0)
    assert cache.layers == ["pool5", "fc6", "fc7"]
    assert [cache.shapes[k][1] for k in cache.layers] == [25088, 4096, 4096]
    model = backbones.build_model("vgg16", resolve_weights("vgg16", "none"))
    pool5 = torch.from_numpy(cache.features("pool5"))
    with torch.inference_mode():
        fc6 = torch.relu(model.classifier[0](pool5))
        fc7 = torch.relu(model.classifier[3](fc6))
    np.testing.assert_allclose(cache.features("fc6"), fc6.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cache.features("fc7"), fc7.numpy(), rtol=1e-4, atol=1e-5)


def test_any_torchvision_model_penultimate_and_module_path(data, tmp_path):
    cache = extract(data, cache_dir=tmp_path / "c", backbone="squeezenet1_0", weights="none",
                    layers="features.12", image_size=32, progress=False, workers=0)
    assert cache.shapes["features.12"][0] == 12
    cache = extract(data, cache_dir=tmp_path / "c", backbone="efficientnet_b0", weights="none",
                    image_size=32, progress=False, workers=0)
    assert cache.layers == ["penultimate"] and cache.shapes["penultimate"] == (12, 1280)


def test_rerun_reuses_without_building_model(data, tmp_path, monkeypatch):
    first = extract(data, cache_dir=tmp_path / "c", **FAST)

    def boom(*a, **k):
        raise AssertionError("model built on an identical rerun")

    monkeypatch.setattr(backbones, "build_model", boom)
    again = extract(data, cache_dir=tmp_path / "c", **FAST)
    assert again.path == first.path
    # the request index is only a shortcut: without it the same cache is found by its key
    for p in (tmp_path / "c" / ".requests").iterdir():
        p.unlink()
    assert extract(data, cache_dir=tmp_path / "c", **FAST).path == first.path


def test_rerun_does_not_import_torch(data, tmp_path):
    """An identical rerun answers from the request index: no torch import, well under 1 s."""
    extract(data, cache_dir=tmp_path / "c", **FAST)
    code = (
        "import sys, time; t=time.perf_counter(); from featprobe.extraction import extract; "
        f"c = extract({str(data)!r}, cache_dir={str(tmp_path / 'c')!r}, backbone='resnet18', "
        "weights='none', image_size=32, progress=False, workers=0); "
        "print(c.path.name, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    name, torch_imported = out.stdout.split()
    assert name.startswith("resnet18-") and torch_imported == "False"


@pytest.mark.parametrize(
    "change",
    ["touch_image", "relabel", "layers", "weights_file", "image_size", "dtype", "backbone"],
)
def test_changed_inputs_give_a_new_cache(data, tmp_path, change):
    base = dict(FAST, cache_dir=tmp_path / "c")
    first = extract(data, **base)
    kw = dict(base)
    if change == "touch_image":
        os.utime(data.parent / "images" / "3.jpg", ns=(1, 1))
    elif change == "relabel":
        lines = data.read_text().splitlines()
        lines[1] = "0.jpg,1"
        data.write_text("\n".join(lines) + "\n")
    elif change == "layers":
        kw["layers"] = "layer4"
    elif change == "weights_file":
        model = backbones.build_model("resnet18", resolve_weights("resnet18", "none"))
        torch.save(model.state_dict(), tmp_path / "w.pth")
        kw["weights"] = str(tmp_path / "w.pth")
    elif change == "image_size":
        kw["image_size"] = 48
    elif change == "dtype":
        kw["dtype"] = "float16"  # the random-init default is float32
    elif change == "backbone":
        kw["backbone"] = "resnet34"
    second = extract(data, **kw)
    assert second.path != first.path
    assert FeatureCache(first.path).path.exists()  # the old one is untouched


def test_weights_file_state_dict(data, tmp_path):
    model = backbones.build_model("resnet18", resolve_weights("resnet18", "none"))
    torch.nn.init.normal_(model.fc.weight)  # a different file than the random control
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    cache = extract(data, cache_dir=tmp_path / "c", weights=str(tmp_path / "w.pth"),
                    dtype="float32", **{k: v for k, v in FAST.items() if k != "weights"})
    assert cache.meta["weights"] == "file"
    assert cache.meta["weights_sha256"] == sha256_file(tmp_path / "w.pth")
    random = extract(data, cache_dir=tmp_path / "c", dtype="float32", **FAST)
    assert not np.allclose(cache.features(), random.features())
    # strict: a resnet50 state dict does not load into resnet18
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(FeatprobeError, match="does not match"):
        extract(data, cache_dir=tmp_path / "c", weights=str(tmp_path / "r50.pth"),
                **{k: v for k, v in FAST.items() if k != "weights"})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_weights_refused_not_executed(data, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(FeatprobeError, match="safely"):
        extract(data, cache_dir=tmp_path / "c", weights=str(tmp_path / "evil.pth"),
                **{k: v for k, v in FAST.items() if k != "weights"})
    assert not marker.exists()


def test_missing_pretrained_weights_offline_message(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(FeatprobeError) as e:
        extract(data, cache_dir=tmp_path / "c", backbone="resnet18", weights="IMAGENET1K_V1",
                image_size=32, progress=False, workers=0)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "--weights PATH" in msg and "\n" not in msg
    assert not list((tmp_path / "c").glob("*.h5"))


def write_bad(data: Path, kind: str) -> str:
    p = data.parent / "images" / "5.jpg"
    if kind == "truncated":
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "empty":
        p.write_bytes(b"")
    else:
        p.write_text("this is not an image\n")
    return "5.jpg"


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_bad_image_fail_then_skip_resumes(data, tmp_path, kind):
    bad = write_bad(data, kind)
    with pytest.raises(FeatprobeError, match=f"cannot read image {bad}"):
        extract(data, cache_dir=tmp_path / "c", batch_size=4, dtype="float32", **FAST)
    assert not list((tmp_path / "c").glob("*.h5"))  # nothing that looks complete
    partial = next((tmp_path / "c").glob("*.partial"))
    assert {p.name for p in partial.glob("part-*.npz")} == {"part-000000.npz"}  # rows 0-3 kept
    cache = extract(data, cache_dir=tmp_path / "c", batch_size=4, dtype="float32",
                    on_error="skip", **FAST)
    assert cache.bad[0][0] == bad and cache.bad[0][1]
    assert list(np.flatnonzero(~cache.valid)) == [5] and cache.n_valid == 11
    assert not cache.features()[5].any()
    with h5py.File(cache.path, "r") as f:
        assert f["bad"].shape == (1, 2) and f.attrs["n_valid"] == 11
    # the same extract with --on-error fail does not hand out a cache with skipped rows
    with pytest.raises(FeatprobeError, match="--on-error skip"):
        extract(data, cache_dir=tmp_path / "c", batch_size=4, dtype="float32", **FAST)


def test_incomplete_cache_never_read_as_complete(data, tmp_path, monkeypatch):
    """A crash while consolidating leaves no .h5 and the next run finishes from the parts.

    The HDF5 copy of the last part fails (it runs on the writer thread, right after that part
    was written), so every part is on disk but the final file is not."""
    real = H5Builder._copy

    def crash_on_last(self, k, part):
        if k == self.n_parts - 1:
            raise OSError(28, "No space left on device")
        return real(self, k, part)

    monkeypatch.setattr(H5Builder, "_copy", crash_on_last)
    with pytest.raises(FeatprobeError, match="No space left"):
        extract(data, cache_dir=tmp_path / "c", batch_size=3, **FAST)
    c = tmp_path / "c"
    assert not list(c.glob("*.h5"))
    [entry] = featprobe.cache.list_caches(c)
    assert entry["complete"] is False and "4/4 parts" in entry["error"]
    with pytest.raises(FeatprobeError, match="incomplete"):
        FeatureCache(Path(entry["path"]))
    assert not list(c.glob("*.tmp-*"))  # the half-built file was deleted at once
    monkeypatch.setattr(H5Builder, "_copy", real)
    writes = {"n": 0}
    real_write = PartialCache.write_part
    monkeypatch.setattr(PartialCache, "write_part",
                        lambda self, k, a: (writes.__setitem__("n", writes["n"] + 1),
                                            real_write(self, k, a)))
    cache = extract(data, cache_dir=c, batch_size=3, **FAST)
    assert writes["n"] == 0  # nothing recomputed: all parts were whole
    assert cache.path.exists() and not list(c.glob("*.tmp-*")) and not list(c.glob("*.partial"))


def test_a_file_without_complete_flag_is_refused(data, tmp_path):
    cache = extract(data, cache_dir=tmp_path / "c", **FAST)
    with h5py.File(cache.path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(FeatprobeError, match="incomplete"):
        FeatureCache(cache.path)
    with h5py.File(cache.path, "a") as f:
        f.attrs["complete"] = True
        f.attrs["format_version"] = 99
    with pytest.raises(FeatprobeError, match="newer"):
        FeatureCache(cache.path)
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(cache.path.read_bytes()[:1000])
    with pytest.raises(FeatprobeError, match="not a readable"):
        FeatureCache(trunc)


def test_class_folder_tree(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (20, 20), 40 * i).save(tmp_path / "tree" / cls / f"{i}.png")
    cache = extract(tmp_path / "tree", cache_dir=tmp_path / "c", **FAST)
    assert cache.classes == ["cat", "dog"] and list(cache.labels) == [0, 0, 0, 1, 1, 1]
    assert cache.ids[0] == os.path.join("cat", "0.png")


def test_api_is_lazy_and_mirrors_cli(data, tmp_path):
    code = "import featprobe, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    cache = featprobe.extract(data, cache_dir=tmp_path / "c", **FAST)
    assert isinstance(cache, featprobe.FeatureCache)


def test_float16_underflow_is_reported(data, tmp_path, caplog):
    """Random-init MobileNetV2 features (~1e-9) vanish in float16: say so, suggest float32,
    which --dtype auto (the default) picks for random init."""
    extract(data, cache_dir=tmp_path / "c", backbone="mobilenet_v2", weights="none",
            image_size=32, progress=False, workers=0, dtype="float16")
    assert "with --dtype float32" in caplog.text
    caplog.clear()
    c32 = extract(data, cache_dir=tmp_path / "c", backbone="mobilenet_v2", weights="none",
                  image_size=32, progress=False, workers=0)
    assert "--dtype float32" not in caplog.text and c32.meta["dtype"] == "float32"
    assert np.count_nonzero(c32.features()) > 0


def test_verify_detects_tampering(data, tmp_path):
    from click.testing import CliRunner

    from featprobe.cache import verify
    from featprobe.cli import main

    cache = extract(data, cache_dir=tmp_path / "c", **FAST)
    report = verify(cache.path)
    assert report["rows"] == 12 and report["checksums"] == {"rows": True, "avgpool": True}
    r = CliRunner().invoke(main, ["verify", str(cache.path)])
    assert r.exit_code == 0 and "avgpool sha256 ok" in r.output
    with h5py.File(cache.path, "a") as f:  # one flipped value: the checksum catches it
        f["features/avgpool"][3, 7] = f["features/avgpool"][3, 7] + 1
    with pytest.raises(FeatprobeError, match="does not match its recorded SHA-256"):
        verify(cache.path)
    assert verify(cache.path, checksums=False)["checksums"] == {}
    with h5py.File(cache.path, "a") as f:  # counts that disagree with /valid
        f.attrs["n_valid"] = 5
    r = CliRunner().invoke(main, ["verify", str(cache.path), "--no-checksums"])
    assert r.exit_code == 2 and "n_valid says 5" in r.output


def test_incremental_consolidation_with_periodic_fsync(data, tmp_path, monkeypatch):
    """The writer thread copies parts into the .h5 as it goes and fsyncs it every SYNC_EVERY
    bytes; fsyncing after every part changes nothing in the result."""
    monkeypatch.setattr(featprobe.cache.writer, "SYNC_EVERY", 1)  # fsync after every part
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(featprobe.cache.writer.os, "fsync",
                        lambda fd: (syncs.append(fd), real_fsync(fd)))
    a = extract(data, cache_dir=tmp_path / "a", batch_size=3, **FAST)
    assert len(syncs) >= 4
    monkeypatch.setattr(featprobe.cache.writer.os, "fsync", real_fsync)
    monkeypatch.setattr(featprobe.cache.writer, "SYNC_EVERY", 256 << 20)
    ref = extract(data, cache_dir=tmp_path / "c", batch_size=3, **FAST)
    assert ref.path.name == a.path.name
    for layer in a.layers:
        np.testing.assert_array_equal(a.features(layer), ref.features(layer))


def test_features_rows_read_in_chunk_ranges(tmp_path, monkeypatch):
    """features(rows=...) returns the rows in the order asked (repeats too) and reads the layer
    in bounded chunk-aligned ranges, never the whole dataset at once."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64)).astype(np.float16)
    cache = featprobe.cache.write_arrays(tmp_path / "x.h5", [f"{i}" for i in range(3000)],
                                         np.arange(3000) % 2, [0, 1], {"f": x})
    rows = np.concatenate([rng.integers(0, 3000, 700), [2999, 0, 0, 1500]])
    reads = []
    real = h5py.Dataset.read_direct

    def spy(self, dest, source_sel=None, dest_sel=None):
        reads.append(source_sel)
        return real(self, dest, source_sel, dest_sel)

    monkeypatch.setattr(h5py.Dataset, "read_direct", spy)
    monkeypatch.setattr(featprobe.cache.reader, "span_rows", lambda ds, nbytes: 256)
    np.testing.assert_array_equal(cache.features("f", rows=rows), x[rows])
    assert reads and all(s.stop - s.start <= 256 for s in reads)
    assert cache.features("f", rows=[]).shape == (0, 64)


@pytest.mark.parametrize("edit", ["id", "label", "valid"])
def test_verify_catches_edited_rows(tmp_path, edit):
    """ids, labels and valid flags carry a SHA-256 recorded at consolidation, like features."""
    cache = featprobe.cache.write_arrays(tmp_path / "x.h5", ["a.jpg", "b.jpg", "c.jpg"],
                                         np.array([0, 1, 0]), ["no", "yes"],
                                         {"f": np.ones((3, 4), np.float32)})
    assert featprobe.cache.verify(cache.path)["checksums"]["rows"] is True
    with h5py.File(cache.path, "r+") as f:
        if edit == "id":
            f["ids"][1] = "B.jpg"
        elif edit == "label":
            f["labels"][0] = 1
        else:  # a row marked invalid, with /bad and n_valid edited to agree
            f["valid"][2] = False
            f.attrs["n_valid"] = 2
            del f["bad"]
            f.create_dataset("bad", data=np.array([["c.jpg", "x"]], dtype=object),
                             dtype=h5py.string_dtype())
    with pytest.raises(FeatprobeError, match="ids/labels/valid/classes do not match"):
        featprobe.cache.verify(cache.path)
    with pytest.raises(FeatprobeError, match="ids/labels/valid/classes do not match"):
        featprobe.fit(cache.path, head="logreg", record=False)  # every reader, not just verify


def test_loaded_weights_are_built_on_meta_and_assigned(tmp_path, monkeypatch):
    """A weights file is loaded into a model built on the meta device: the parameters are the
    file's (bit for bit, float16 files converted to the model's float32), nothing is left on
    meta, and the fallback (ordinary build + copy) gives the same model."""
    source = backbones.build_model("resnet18", resolve_weights("resnet18", "none"))
    with torch.no_grad():
        source.fc.weight.mul_(3.0)
    state = source.state_dict()
    torch.save(state, tmp_path / "w.pth")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "w16.pth")
    choice = resolve_weights("resnet18", str(tmp_path / "w.pth"))
    model = backbones.build_model("resnet18", choice)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert not any(t.is_meta for t in tensors.values())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    half = backbones.build_model("resnet18", resolve_weights("resnet18", str(tmp_path / "w16.pth")))
    assert half.fc.weight.dtype == torch.float32
    assert torch.equal(half.fc.weight, state["fc.weight"].half().float())
    monkeypatch.setattr(backbones, "_weights_on_meta", lambda *a: None)  # force the fallback
    fallback = backbones.build_model("resnet18", choice)
    for k, v in state.items():
        assert torch.equal(fallback.state_dict()[k], v), k
