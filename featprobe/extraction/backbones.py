"""The one registry of backbones: the layers each can emit, its preprocessing, the model.

Registered backbones state their layers (name → module path and dimension). Any other
torchvision classification model works by name too, its default layer ``penultimate`` (the input
of its last ``nn.Linear``). A layer may also be a module path (``features.28``), flattened.
Plug-ins (:mod:`featprobe.extraction.plugins`) answer ``timm:<model>`` and ``open_clip:<arch>``.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import urllib.error
import warnings
from dataclasses import dataclass, replace

import torch
import torchvision
from torch import nn

from featprobe.errors import FeatprobeError
from featprobe.extraction import plugins
from featprobe.extraction.pixels import IMAGENET_MEAN, IMAGENET_STD, with_crop
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


PLUGINS = {"timm": "timm:<model name>, e.g. timm:vit_small_patch14_dinov2.lvd142m (any "
                   "timm.list_models() name; a .tag picks its weights)",
           "open_clip": "open_clip:<architecture>, e.g. open_clip:ViT-B-32 with --weights "
                        "laion2b_s34b_b79k (open_clip.list_pretrained())"}


def _check_name(name: str) -> None:
    if plugins.split_name(name) is not None:
        return
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
    net: nn.Module | None = None  # built by resolve_model: a missing download fails before writing
    provenance: dict | None = None  # library, its version, model name, preprocess_like


def resolve_model(backbone: str, weights=None, layers=None, image_size: int | None = None,
                  crop: str = "center", like: str | None = None,
                  recorded: dict | None = None, build: bool = True) -> FeatureModel:
    """Check the backbone name, the layers and the weights; work out the preprocessing (or take
    the ``recorded`` one, as predict does); with ``build``, build the model, weights loaded or
    downloaded (:func:`with_network` later otherwise; plug-ins are always built)."""
    try:
        pre = None if recorded is not None else with_crop({}, crop)
    except ValueError as e:
        raise FeatprobeError(str(e)) from None
    if plugins.split_name(backbone) is not None:
        if like is not None:
            raise FeatprobeError("--preprocess-like is for torchvision backbones; timm and "
                                 "open_clip models use their own preprocessing config")
        p = plugins.build(backbone, weights)
        if image_size is not None and plugins.is_token_model(p.lib, p.net):
            raise FeatprobeError(f"--image-size: {backbone} is a transformer built for its own "
                                 "input size; --crop and the library's config decide it")
        layers = tuple(plugins.resolve_layers(p.lib, p.net, layers))
        pre = recorded or _sized(with_crop(plugins.transform_facts(p.transform, p.lib), crop),
                                 image_size)
        return FeatureModel(backbone, p.weights, layers, pre, p.net,
                            {**p.provenance, "weights_sha256": plugins.hub_sha256(p.weights,
                                                                                   p.net)})
    layers = tuple(resolve_layers(backbone, layers))
    choice = resolve_weights(backbone, weights)
    enum = _preprocess_enum(backbone, choice, like)
    pre = recorded or with_crop(preprocessing(backbone, choice, image_size, enum), crop)
    facts = {"library": "torchvision", "library_version": torchvision.__version__,
             "model_name": backbone,
             "preprocess_like": enum.name if enum is not choice.enum and enum else ""}
    return FeatureModel(backbone, choice, layers, pre,
                        build_model(backbone, choice) if build else None, facts)


def with_network(model: FeatureModel) -> FeatureModel:
    """``model`` with its network built: where the weights fail, before anything is written."""
    if model.net is not None:
        return model
    return replace(model, net=build_model(model.backbone, model.weights))


def _preprocess_enum(backbone: str, choice: WeightsChoice, like: str | None):
    """The weights entry whose transform the features use: the weights' own; for ``none`` and
    other files ``--preprocess-like`` or else DEFAULT (the entry the control stands in for)."""
    enum_cls = weights_enum(backbone)
    if like is None:
        return choice.enum or (enum_cls.DEFAULT if enum_cls is not None else None)
    if choice.enum is not None:
        raise FeatprobeError(f"--preprocess-like is for --weights none or a file; {choice.name} "
                             "has its own transform")
    if enum_cls is None or (like != "DEFAULT" and like not in enum_cls.__members__):
        names = ", ".join(enum_cls.__members__) if enum_cls else "(none published)"
        raise FeatprobeError(f"--preprocess-like {like!r}: {backbone} weights are {names}")
    return enum_cls[like]


def _sized(pre: dict, image_size: int | None) -> dict:
    """``image_size`` overrides the crop (the resize keeps its ratio to the crop)."""
    if image_size is None:
        return pre
    if image_size < 16:
        raise FeatprobeError(f"--image-size must be at least 16, got {image_size}")
    crop, resize = pre["crop_size"][0], (pre["resize_size"] or pre["crop_size"])[0]
    return {**pre, "crop_size": [image_size],
            "resize_size": [round(image_size * resize / crop)]}


def preprocessing(backbone: str, choice: WeightsChoice, image_size: int | None = None,
                  enum=None) -> dict:
    """The preprocessing, as JSON-able facts: from the weights' own ``transforms()``.

    Random-init and local-file weights use ``enum``'s transforms, by default the DEFAULT
    weights' (they see what the pretrained model sees), or ImageNet 256/224 when there are none.
    """
    enum = enum or choice.enum
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
    return _sized(pre, image_size)


def build_model(backbone: str, choice: WeightsChoice) -> nn.Module:
    """The frozen model in eval mode, weights loaded as ``choice`` says.

    Models with loaded weights are built on the meta device and assigned the loaded tensors,
    skipping a costly random initialisation that would only be overwritten. Where the state
    dict leaves something on meta (a non-persistent buffer), the ordinary build runs.
    """
    if choice.kind == "torchvision" and choice.path:  # torchvision's own file, found elsewhere
        state = load_state_dict(choice.path)
        model = _weights_on_meta(backbone, choice.enum, lambda: state) or \
            torchvision.models.get_model(backbone, weights=choice.enum)
    elif choice.kind == "torchvision":
        path = checkpoint_path(choice.enum)
        try:  # torch.hub prints "Downloading: ..." on stdout, which is for results
            with safe_unpickling(), contextlib.redirect_stdout(sys.stderr):
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


def feature_extractor(model: FeatureModel) -> nn.Module:
    """The module that maps a normalised batch to ``{layer: [B, D]}`` for ``model``."""
    net = model.net if model.net is not None else build_model(model.backbone, model.weights)
    name = plugins.split_name(model.backbone)
    if name is not None:
        return plugins.PluginExtractor(name[0], net, list(model.layers))
    return FeatureExtractor(net, layer_sources(model.backbone, net, list(model.layers)))


def describe(name: str | None = None) -> list[dict]:
    """Registered backbones with their layers, for ``featprobe backbones``."""
    if name is not None:
        if plugins.split_name(name) is not None:
            return [plugins.describe(name)]
        _check_name(name)
        spec = BACKBONES.get(name)
        with torch.device("meta"):
            model = torchvision.models.get_model(name)
        layers = resolve_layers(name, None)
        src = layer_sources(name, model, layers)
        return [{"name": name, "layers": {k: v.dim for k, v in src.items()},
                 "default_layers": layers, "description": spec.description if spec else ""}]
    return [{"name": s.name, "layers": {k: v.dim for k, v in s.layers.items()},
             "default_layers": list(s.default_layers), "description": s.description}
            for s in BACKBONES.values()]


__all__ = ["BACKBONES", "BackboneSpec", "FeatureExtractor", "Layer", "WeightsChoice",
           "build_model", "preprocessing", "resolve_layers", "FeatureModel", "resolve_model"]
