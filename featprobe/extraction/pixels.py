"""The one image → tensor path, shared by extraction, predict and the CNN baseline.

Preprocessing is recorded as plain facts (``resize_size``, ``crop_size``, ``interpolation``,
``antialias``, ``mean``, ``std``; :func:`featprobe.extraction.backbones.preprocessing` reads
them from the weights' own ``transforms()``). torchvision's classification preset does resize →
centre crop → ``/255`` → ``-mean`` → ``/std`` on each image; featprobe splits it at the crop:
DataLoader workers (or the GPU decoder) produce ``uint8 [3, h, w]`` crops
(:func:`pixel_transform`), and the batch is normalised once it is on the model's device
(:func:`normalize`). Same operations, same order, same float32 arithmetic, so the result is
bit-identical to the preset's (tested), but what crosses process boundaries and the
host-to-device copy is a quarter of the float32 bytes (150 KB instead of 602 KB an image at
224 px).

A ``resize_size`` of one value resizes the shorter side (then the crop takes the centre); two
values ``[h, w]`` resize to exactly that size (the CNN baseline's squashed input).
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
    memory format (channels-last stays channels-last).

    Exactly ``convert_image_dtype`` (``/255``) then ``normalize`` (``-mean``, ``/std``) as the
    preset computes them, in float32.
    """
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
