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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def squash(size: int) -> dict:
    """Preprocessing facts that resize a whole image to ``size`` × ``size`` (no crop)."""
    return {"resize_size": [size, size], "crop_size": [size], "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "interpolation": "bilinear", "antialias": True}


def pixel_transform(pre: dict) -> transforms.Compose:
    """PIL image → ``uint8 [3, h, w]``: the preset's resize and centre crop, nothing after."""
    steps = []
    size = pre.get("resize_size")
    if size:
        steps.append(transforms.Resize(size[0] if len(size) == 1 else list(size),
                                       interpolation=InterpolationMode(pre["interpolation"]),
                                       antialias=pre["antialias"]))
    steps += [transforms.CenterCrop(pre["crop_size"][0]), transforms.PILToTensor()]
    return transforms.Compose(steps)


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
    if len(pre["mean"]) != 3 or len(pre["std"]) != 3 or min(pre["std"]) <= 0:
        raise ValueError("mean and std need 3 values, std > 0")
    if pre["crop_size"][0] < 1:
        raise ValueError("crop_size must be positive")
