"""The one image → tensor path, shared by extraction, predict and the CNN baseline.

Preprocessing is recorded as plain facts (``resize_size``, ``crop_size``, ``interpolation``,
``antialias``, ``mean``, ``std``). torchvision's classification preset is split at the crop:
workers (or the GPU decoder) make ``uint8`` crops (:func:`pixel_transform`), and a batch is
normalised on the model's device (:func:`normalize`), bit-identical to the preset with a quarter
of the bytes to move. One ``resize_size`` resizes the shorter side; ``[h, w]`` resizes to that.
"""

from __future__ import annotations

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from featprobe.policy import CROPS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def squash(size: int) -> dict:
    """Preprocessing facts that resize a whole image to ``size`` × ``size`` (no crop)."""
    return {"resize_size": [size, size], "crop_size": [size], "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "interpolation": "bilinear", "antialias": True}


def with_crop(pre: dict, crop: str) -> dict:
    """``pre`` with a crop mode: ``center`` is the transform as it is (no ``crop`` recorded, so
    the keys of centre-cropped caches stay as they were)."""
    if crop not in CROPS:
        raise ValueError(f"--crop must be {', '.join(CROPS)}, got {crop!r}")
    return {**pre, "crop": crop} if crop != "center" else pre


class Letterbox:
    """Resize so the longer side is ``size`` (aspect ratio kept), then pad both sides equally
    to ``size`` x ``size`` with ``fill`` (the mean colour: 0 once normalised)."""

    def __init__(self, size: int, interpolation: InterpolationMode, antialias: bool, fill):
        self.size, self.interpolation, self.antialias, self.fill = size, interpolation, \
            antialias, fill

    def __call__(self, im):
        w, h = im.size
        s = self.size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        im = F.resize(im, [nh, nw], self.interpolation, antialias=self.antialias)
        left, top = (self.size - nw) // 2, (self.size - nh) // 2
        return F.pad(im, [left, top, self.size - nw - left, self.size - nh - top], fill=self.fill)


def pixel_transform(pre: dict) -> transforms.Compose:
    """PIL image → ``uint8 [3, h, w]``: the preset's resize and centre crop, nothing after
    (``crop``: ``squash`` resizes the whole image to the crop size, ``letterbox`` fits it in)."""
    crop, c = pre.get("crop", "center"), pre["crop_size"][0]
    interpolation = InterpolationMode(pre["interpolation"])
    if crop == "squash":
        steps = [transforms.Resize([c, c], interpolation, antialias=pre["antialias"])]
    elif crop == "letterbox":
        fill = tuple(round(255 * m) for m in pre["mean"])
        steps = [Letterbox(c, interpolation, pre["antialias"], fill)]
    elif crop == "center":
        size = pre.get("resize_size")
        steps = [transforms.Resize(size[0] if len(size) == 1 else list(size), interpolation,
                                   antialias=pre["antialias"])] if size else []
        steps.append(transforms.CenterCrop(c))
    else:
        raise ValueError(f"unknown crop {crop!r}")
    return transforms.Compose([*steps, transforms.PILToTensor()])


def normalize(x: torch.Tensor, pre: dict) -> torch.Tensor:
    """``uint8 [B, 3, h, w]`` crops → the model's float32 input, on ``x``'s device and in its
    memory format: exactly the preset's ``/255``, ``-mean``, ``/std``, in float32."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize takes uint8 crops, not {x.dtype}")
    mean = torch.tensor(pre["mean"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.float().div_(255).sub_(mean).div_(std)


def check_preprocessing(pre) -> None:
    """Raise ValueError (or KeyError/TypeError/IndexError) unless ``pre`` is a usable record."""
    if not isinstance(pre, dict):
        raise TypeError("preprocessing must be a JSON object")
    pixel_transform(pre)
    if pre.get("crop", "center") not in CROPS:
        raise ValueError("unknown crop mode")
    if len(pre["mean"]) != 3 or len(pre["std"]) != 3 or min(pre["std"]) <= 0:
        raise ValueError("mean and std need 3 values, std > 0")
    if pre["crop_size"][0] < 1:
        raise ValueError("crop_size must be positive")
