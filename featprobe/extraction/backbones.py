"""The one registry of backbones: the layers each can emit, its preprocessing, the model.

Registered backbones state their layers (name → module path and dimension). Any other
torchvision classification model works by name too, its default layer ``penultimate`` (the input
of its last ``nn.Linear``). A layer may also be a module path (``features.28``), flattened.
"""

from __future__ import annotations

import pickle
import urllib.error
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from featprobe.errors import FeatprobeError
from featprobe.extraction.pixels import IMAGENET_MEAN, IMAGENET_STD
from featprobe.extraction.weights import (
    WeightsChoice,
    checkpoint_path,
    load_state_dict,
    resolve_weights,
    safe_unpickling,
    unsafe_reason,
    weights_enum,
)

PENULTIMATE = "penultimate"


@dataclass(frozen=True)
class Layer:
    """Where a layer's features come from: a module's output (or its input) flattened per image."""

    module: str
    dim: int | None = None
    use_input: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """Facts about a registered backbone: its layers (in forward order) and the default ones."""

    name: str
    layers: dict[str, Layer]
    default_layers: tuple[str, ...]
    description: str = ""


_VGG_LAYERS = {"pool5": Layer("avgpool", 25088), "fc6": Layer("classifier.1", 4096),
               "fc7": Layer("classifier.4", 4096)}

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec for spec in [
        BackboneSpec("vgg16", _VGG_LAYERS, ("pool5", "fc7"), "VGG16 (the tutorial's backbone)"),
        BackboneSpec("vgg16_bn", _VGG_LAYERS, ("pool5", "fc7"), "VGG16 with batch norm"),
        BackboneSpec("resnet18", {"avgpool": Layer("avgpool", 512)}, ("avgpool",), "ResNet-18"),
        BackboneSpec("resnet50", {"avgpool": Layer("avgpool", 2048)}, ("avgpool",), "ResNet-50"),
        BackboneSpec("mobilenet_v2", {"avgpool": Layer("classifier.1", 1280, use_input=True)},
                     ("avgpool",), "MobileNetV2 (pooled 1280-d features)"),
    ]
}


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> None:
    if name not in BACKBONES and name not in classification_models():
        raise FeatprobeError(f"unknown backbone {name!r}: use one of {', '.join(BACKBONES)} or "
                             "any torchvision classification model name (see `featprobe "
                             "backbones`)")


def resolve_layers(name: str, layers: list[str] | tuple[str, ...] | None) -> list[str]:
    """The layers to emit: those asked for (validated) or the backbone's defaults."""
    _check_name(name)
    spec = BACKBONES.get(name)
    if not layers:
        return list(spec.default_layers) if spec else [PENULTIMATE]
    out = []
    for layer in layers:
        if layer in out:
            raise FeatprobeError(f"layer {layer!r} given twice")
        out.append(layer)
    known = set(spec.layers) if spec else {PENULTIMATE}
    paths = None
    for layer in out:
        if layer in known:
            continue
        if paths is None:  # the architecture on the meta device: no memory, no weights
            with torch.device("meta"):
                paths = {n for n, _ in torchvision.models.get_model(name).named_modules() if n}
        if layer not in paths:
            raise FeatprobeError(f"unknown layer {layer!r} for {name}: use "
                                 f"{', '.join(sorted(known))} or a module path such as "
                                 "features.28 (see `featprobe backbones`)")
    return out


@dataclass(frozen=True, eq=False)
class FeatureModel:
    """A frozen feature extractor, resolved and checked before any image is read: what the
    features depend on (apart from the device and precision they are computed with)."""

    backbone: str
    weights: WeightsChoice
    layers: tuple[str, ...]
    preprocessing: dict


def resolve_model(backbone: str, weights=None, layers=None,
                  image_size: int | None = None) -> FeatureModel:
    """Check the backbone name, the layers and the weights; work out the preprocessing."""
    layers = tuple(resolve_layers(backbone, layers))
    choice = resolve_weights(backbone, weights)
    return FeatureModel(backbone, choice, layers, preprocessing(backbone, choice, image_size))


def preprocessing(backbone: str, choice: WeightsChoice, image_size: int | None = None) -> dict:
    """The preprocessing, as JSON-able facts: from the weights' own ``transforms()``.

    Random-init and local-file weights use the DEFAULT weights' transforms (they see what the
    pretrained model sees), or ImageNet 256/224 when there are none. ``image_size`` overrides
    the crop (the resize keeps its ratio to the crop).
    """
    enum = choice.enum
    if enum is None:
        enum_cls = weights_enum(backbone)
        enum = enum_cls.DEFAULT if enum_cls is not None else None
    if enum is not None:
        t = enum.transforms()
        pre = {"resize_size": list(t.resize_size) if t.resize_size else None,
               "crop_size": list(t.crop_size), "mean": list(t.mean), "std": list(t.std),
               "interpolation": t.interpolation.value, "antialias": bool(t.antialias)}
    else:
        pre = {"resize_size": [256], "crop_size": [224], "mean": list(IMAGENET_MEAN),
               "std": list(IMAGENET_STD), "interpolation": "bilinear", "antialias": True}
    if image_size is not None:
        if image_size < 16:
            raise FeatprobeError(f"--image-size must be at least 16, got {image_size}")
        crop, resize = pre["crop_size"][0], (pre["resize_size"] or pre["crop_size"])[0]
        pre["crop_size"] = [image_size]
        pre["resize_size"] = [round(image_size * resize / crop)]
    return pre


def build_model(backbone: str, choice: WeightsChoice) -> nn.Module:
    """The frozen model in eval mode, weights loaded as ``choice`` says.

    Models with loaded weights are built on the meta device and assigned the loaded tensors,
    skipping a costly random initialisation that would only be overwritten. Where the state
    dict leaves something on meta (a non-persistent buffer), the ordinary build runs.
    """
    if choice.kind == "torchvision":
        path = checkpoint_path(choice.enum)
        try:
            with safe_unpickling():  # torchvision's loader asks torch.load for weights_only=False
                model = _weights_on_meta(backbone, choice.enum, lambda: choice.enum.get_state_dict(
                    progress=True, check_hash=True))
                if model is None:
                    model = torchvision.models.get_model(backbone, weights=choice.enum)
        except pickle.UnpicklingError as e:
            raise FeatprobeError(f"refusing {path}: {unsafe_reason(e)}; it is not the file "
                                 f"torchvision publishes ({choice.enum.url}): delete it") from None
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            if path.is_file() and not isinstance(e, urllib.error.URLError):
                raise FeatprobeError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
            raise FeatprobeError(f"weights {choice.identity} are not on this machine and could not "
                                 f"be downloaded ({type(e).__name__}); put {path.name} "
                                 f"({choice.enum.url}) in {path.parent} (`featprobe weights add "
                                 "FILE` checks and copies it), or pass --weights PATH to a local "
                                 "state dict") from None
    elif choice.kind == "file":
        state = load_state_dict(choice.name)
        model = _matching(lambda: _weights_on_meta(backbone, None, lambda: state), choice.name,
                          backbone)
        if model is None:
            model = _seeded(backbone)
            _matching(lambda: model.load_state_dict(state, strict=True), choice.name, backbone)
    else:
        model = _seeded(backbone)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _seeded(backbone: str) -> nn.Module:
    # seeded, so the random-features control and any resumed run see the same weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.get_model(backbone, weights=None)


def _weights_on_meta(backbone: str, enum, state_fn) -> nn.Module | None:
    """The model built on the meta device (``get_model(weights=enum)``: the enum's constructor
    arguments apply, its load into meta tensors is a no-op), then ``state_fn()``'s tensors
    assigned in the dtypes the model declares. None where something is left on meta."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        model = torchvision.models.get_model(backbone, weights=enum)
    declared = model.state_dict()
    state = state_fn()
    state = {k: v.to(declared[k].dtype) if k in declared and v.dtype != declared[k].dtype
             else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


def _matching(load, path: str, backbone: str):
    """``load()``, with a state dict that does not fit the model reported in one line."""
    try:
        return load()
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise FeatprobeError(f"weights file {path} does not match {backbone}: {detail[:300]}"
                             ) from None


def _find_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FeatprobeError(f"{type(model).__name__} has no module {path!r}; see `featprobe "
                             "backbones`") from None


def layer_sources(backbone: str, model: nn.Module, layers: list[str]) -> dict[str, Layer]:
    spec = BACKBONES.get(backbone)
    out = {}
    for layer in layers:
        if spec is not None and layer in spec.layers:
            out[layer] = spec.layers[layer]
        elif layer == PENULTIMATE:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise FeatprobeError(f"{backbone} has no final nn.Linear to take penultimate "
                                     "features from; name a module path with --layers")
            last = linears[-1]
            out[layer] = Layer(last, _find_module(model, last).in_features, use_input=True)
        else:
            _find_module(model, layer)
            out[layer] = Layer(layer)
    return out


class FeatureExtractor(nn.Module):
    """Runs the backbone once per batch and returns the requested layers, flattened. Forward
    hooks (not FX tracing), so any torchvision model works."""

    def __init__(self, model: nn.Module, sources: dict[str, Layer]):
        super().__init__()
        self.model = model
        self.sources = sources
        self._out: dict[str, torch.Tensor] = {}
        for name, src in sources.items():
            module = _find_module(model, src.module)
            if src.use_input:
                module.register_forward_pre_hook(lambda m, args, k=name: self._keep(k, args[0]))
            else:
                module.register_forward_hook(lambda m, args, out, k=name: self._keep(k, out))

    def _keep(self, name: str, t: torch.Tensor) -> None:  # None: a pre-hook leaves the input be
        self._out[name] = t.flatten(1).clone()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._out = {}
        self.model(x)
        return {name: self._out[name] for name in self.sources}


def describe() -> list[dict]:
    """Registered backbones with their layers, for ``featprobe backbones``."""
    return [{"name": s.name, "layers": {k: v.dim for k, v in s.layers.items()},
             "default_layers": list(s.default_layers), "description": s.description}
            for s in BACKBONES.values()]


__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "Layer", "WeightsChoice",
           "build_model", "preprocessing", "resolve_layers", "FeatureModel", "resolve_model"]
