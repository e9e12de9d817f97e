"""The model input split at the crop (uint8 crops, normalised on the device) is the preset's,
bit for bit; and the storage cast done with torch is numpy's ``astype``, bit for bit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchvision_preset as make_transform

from featprobe.extraction.backbones import preprocessing
from featprobe.extraction.images import load_rgb
from featprobe.extraction.pixels import normalize, pixel_transform
from featprobe.extraction.stream import StorageCast
from featprobe.extraction.weights import resolve_weights

FOOLBOX = importlib.util.find_spec("foolbox")


def _photos() -> list[Path]:
    if FOOLBOX is None:
        pytest.skip("needs foolbox's photos")
    data = Path(FOOLBOX.submodule_search_locations[0]) / "data"
    return sorted(data.glob("imagenet_*.jpg"))[:8] + sorted(data.glob("cifar100_*.png"))[:4]


@pytest.mark.parametrize("backbone,size", [("mobilenet_v2", None), ("resnet18", 64),
                                           ("vgg16", 96)])
def test_uint8_crops_normalised_on_the_device_equal_the_preset(backbone, size):
    pre = preprocessing(backbone, resolve_weights(backbone, "none"), size)
    images = [load_rgb(f) for f in _photos()]  # real photos: JPEG and PNG, several sizes
    ref = torch.stack([make_transform(pre)(im) for im in images])
    crops = torch.stack([pixel_transform(pre)(im) for im in images])
    assert crops.dtype == torch.uint8 and crops.shape == ref.shape
    for layout in (torch.contiguous_format, torch.channels_last):
        x = normalize(crops.contiguous(memory_format=layout), pre)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=layout)
        assert torch.equal(x, ref)  # bit for bit, not within a tolerance


def test_normalize_takes_only_uint8():
    pre = preprocessing("resnet18", resolve_weights("resnet18", "none"))
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 8, 8), pre)


def _features() -> np.ndarray:
    rng = np.random.default_rng(0)
    f = np.maximum(rng.standard_normal((6, 500), dtype=np.float32), 0) * 3
    # around float16's edges: below half its smallest subnormal (→ 0), subnormals, its max,
    # past it (→ inf), negative zero
    f[0, :9] = [1e-8, 2.9e-8, 3e-8, 6e-8, 1e-5, 6.1e-5, 65504, 65519, 65520]
    f[1, :3] = [1e9, -1e-9, -0.0]
    return f


def test_storage_cast_is_numpys_astype_and_counts_what_float16_loses():
    f = _features()
    cast = StorageCast("float16")
    with np.errstate(over="ignore"):
        ref = f.astype(np.float16)
    out = cast(torch.from_numpy(f), [""] * 6).numpy()
    assert out.dtype == np.float16
    assert np.array_equal(out.view(np.uint16), ref.view(np.uint16))
    kept = np.count_nonzero(f)
    lost = kept - np.count_nonzero(np.isfinite(ref) & (ref != 0))
    assert lost == 5  # 1e-8 and 2.9e-8 → 0; 65520 and 1e9 → inf; -1e-9 → -0
    assert cast.lost_fraction() == pytest.approx(lost / kept)


def test_storage_cast_zeroes_bad_rows_and_leaves_them_out_of_the_counts():
    f = _features()
    reasons = ["", "cannot decode", "", "", "file not found", ""]
    for dtype in ("float16", "float32"):
        cast = StorageCast(dtype)
        out = cast(torch.from_numpy(f.copy()), reasons).numpy()
        assert out.dtype == np.dtype(dtype)
        assert not out[[1, 4]].any()
        good = [0, 2, 3, 5]
        with np.errstate(over="ignore"):
            assert np.array_equal(out[good], f[good].astype(dtype))
    lost = 3  # row 0's 1e-8, 2.9e-8 (→ 0) and 65520 (→ inf); row 1 is a bad row, not counted
    assert cast.lost_fraction() == 0.0  # float32 loses nothing
    cast16 = StorageCast("float16")
    cast16(torch.from_numpy(f), reasons)
    assert cast16.lost_fraction() == pytest.approx(lost / np.count_nonzero(f[[0, 2, 3, 5]]))
