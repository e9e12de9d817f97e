"""Plug-in backbones in the one registry: ``timm:<model name>`` and ``open_clip:<architecture>``.

The model, its weights and its preprocessing come from the library itself: timm's
``create_model`` and ``create_transform(**resolve_data_config(model=m))``, open_clip's
``create_model_and_transforms`` and the preprocess it returns. That transform is read into
featprobe's preprocessing facts (:func:`transform_facts`), so the pixels path, the cache key and
``predict`` reproduce it exactly. Both libraries are optional extras, imported on first use.

Layers, computed in one forward pass: ViT-style models emit ``cls`` (class token after the final
norm), ``avg`` (mean of the patch tokens), ``cls+avg`` (both, the DINOv2 linear-eval feature) and
``last4`` (``cls+avg`` of each of the last four blocks, final norm applied, concatenated). timm
models also emit ``pooled`` (``forward_head(pre_logits=True)``, the default) and, for CNNs, each
stage of ``feature_info`` by module name, averaged over space. open_clip emits ``embed``
(``encode_image``, the default).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import transforms as T

from featprobe.errors import FeatprobeError
from featprobe.extraction.weights import WeightsChoice, load_state_dict, sha256_file

EXTRAS = {"timm": ("timm", "timm"), "open_clip": ("open_clip", "clip")}
TOKEN_LAYERS = ("cls", "avg", "cls+avg", "last4")
_PASS_STEPS = {"ToTensor", "MaybeToTensor", "MaybeConvertMode", "_convert_to_rgb"}


def split_name(backbone: str) -> tuple[str, str] | None:
    """``("timm", "vit_small_patch16_224")`` for ``timm:vit_small_patch16_224``; None for a
    torchvision name."""
    lib, sep, model = str(backbone).partition(":")
    if not sep:
        return None
    if lib not in EXTRAS or not model:
        raise FeatprobeError(f"unknown backbone {backbone!r}: plug-ins are timm:<model name> and "
                             "open_clip:<architecture> (see `featprobe backbones`)")
    return lib, model


def require(lib: str):
    """The plug-in's library, or one line naming the install command."""
    module, extra = EXTRAS[lib]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FeatprobeError(f"--backbone {lib}:... needs the {module} package: "
                             f"pip install \"featprobe[{extra}]\"") from None


@dataclass(frozen=True, eq=False)
class Plugin:
    """A plug-in model, built: the network, the library's own eval transform, the weights."""

    lib: str
    model: str
    net: nn.Module
    transform: object
    weights: WeightsChoice
    provenance: dict


def _seeded(build):
    # seeded, so the random-init control and any resumed run see the same weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _load_file(net: nn.Module, path: str, backbone: str) -> None:
    """A local safetensors or state-dict file (tensors only), loaded strictly."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise FeatprobeError(f"cannot read safetensors file {path}: {e}") from None
    else:
        state = load_state_dict(path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise FeatprobeError(f"weights file {path} does not match {backbone}: "
                             f"{(lines[1] if len(lines) > 1 else lines[0])[:300]}") from None


def _weights_kind(weights) -> tuple[str, str]:
    """("none" | "file" | "tag", name) for a --weights value."""
    from pathlib import Path

    arg = "DEFAULT" if weights is None else str(weights)
    if arg.lower() == "none":
        return "none", "none"
    p = Path(arg).expanduser()
    if p.is_file():
        return "file", str(p.resolve())
    if "/" in arg or arg.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise FeatprobeError(f"weights file not found: {arg}")
    return "tag", arg


def _offline_error(backbone: str, tag: str, e: Exception) -> FeatprobeError:
    return FeatprobeError(f"{backbone} weights {tag!r} are not on this machine and could not be "
                          f"downloaded ({type(e).__name__}); on a networked machine they land in "
                          "the Hugging Face cache ($HF_HOME); or pass --weights PATH to a local "
                          "safetensors/state-dict file, or --weights none")


def build(backbone: str, weights) -> Plugin:
    """Build a plug-in model as ``weights`` says (a pretrained tag, DEFAULT, none or a file)."""
    lib, name = split_name(backbone)
    mod = require(lib)
    kind, arg = _weights_kind(weights)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for results
        return (_build_timm if lib == "timm" else _build_open_clip)(mod, backbone, name, kind,
                                                                    arg)


def _build_timm(timm, backbone, name, kind, arg) -> Plugin:
    if not timm.models.is_model(name.split(".")[0]):
        raise FeatprobeError(f"timm has no model {name!r} (timm.list_models() names them)")
    if kind == "tag":
        full = name if arg == "DEFAULT" else f"{name.split('.')[0]}.{arg}"
        try:
            net = timm.create_model(full, pretrained=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise _offline_error(backbone, arg, e) from None
        cfg = net.pretrained_cfg
        ident = f"timm:{cfg.get('hf_hub_id') or full}"
        choice = WeightsChoice("timm", arg, ident)
    else:
        net = _seeded(lambda: timm.create_model(name, pretrained=False))
        if kind == "file":
            _load_file(net, arg, backbone)
        choice = _plain_choice(kind, arg)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
    return Plugin("timm", name, net.eval(), transform, choice,
                  {"library": "timm", "library_version": timm.__version__, "model_name": name})


def _build_open_clip(oc, backbone, name, kind, arg) -> Plugin:
    if name not in oc.list_models():
        raise FeatprobeError(f"open_clip has no architecture {name!r} "
                             "(open_clip.list_models() names them)")
    if kind == "tag":
        tags = oc.list_pretrained_tags_by_model(name)
        tag = tags[0] if arg == "DEFAULT" and tags else arg
        if tag not in tags:
            raise FeatprobeError(f"unknown weights {arg!r} for {backbone}: use "
                                 f"{', '.join(tags) or '(none published)'}, none, or a path")
        try:
            net, _, transform = oc.create_model_and_transforms(name, pretrained=tag)
        except (OSError, RuntimeError, ValueError) as e:
            raise _offline_error(backbone, tag, e) from None
        choice = WeightsChoice("open_clip", tag, f"open_clip:{name}/{tag}")
    else:
        net, _, transform = _seeded(lambda: oc.create_model_and_transforms(name, pretrained=None))
        if kind == "file":
            _load_file(net, arg, backbone)
        choice = _plain_choice(kind, arg)
    return Plugin("open_clip", name, net.eval(), transform, choice,
                  {"library": "open_clip", "library_version": oc.__version__, "model_name": name})


def _plain_choice(kind: str, arg: str) -> WeightsChoice:
    if kind == "none":
        return WeightsChoice("none", "none", "none")
    return WeightsChoice("file", arg, "sha256:" + sha256_file(arg))


def hub_sha256(choice: WeightsChoice, net: nn.Module) -> str | None:
    """SHA-256 of a timm Hugging Face checkpoint where the hub cache holds it (else None)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if choice.kind != "timm" or not cfg.get("hf_hub_id"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        path = try_to_load_from_cache(cfg["hf_hub_id"], filename)
        if isinstance(path, str):
            return sha256_file(path)
    return None


def transform_facts(transform, lib: str) -> dict:
    """The library's eval transform as featprobe's preprocessing facts (see :mod:`pixels`);
    a step featprobe cannot reproduce exactly is refused, not approximated."""
    pre = {"resize_size": None, "crop_size": None, "mean": None, "std": None,
           "interpolation": "bilinear", "antialias": True}
    for step in getattr(transform, "transforms", [transform]):
        kind = getattr(step, "__name__", type(step).__name__)
        if type(step) is T.Resize and not step.max_size:
            pre["resize_size"] = [step.size] if isinstance(step.size, int) else list(step.size)
            pre["interpolation"] = step.interpolation.value
            pre["antialias"] = step.antialias is not False
        elif type(step) is T.CenterCrop and step.size[0] == step.size[-1]:
            pre["crop_size"] = [int(step.size[0])]
        elif type(step) is T.Normalize:
            pre["mean"], pre["std"] = _floats(step.mean), _floats(step.std)
        elif kind not in _PASS_STEPS:
            raise FeatprobeError(f"{lib}'s preprocessing step {step!r} has no exact equivalent "
                                 "in featprobe")
    if pre["crop_size"] is None and pre["resize_size"] and len(set(pre["resize_size"])) == 1:
        pre["crop_size"] = pre["resize_size"][:1]  # a squash transform: resize to [s, s] only
    if pre["crop_size"] is None or pre["mean"] is None:
        raise FeatprobeError(f"{lib}'s preprocessing {transform!r} has no square crop or no "
                             "normalisation featprobe can reproduce")
    return pre


def _floats(v) -> list[float]:
    return [float(x) for x in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def is_token_model(plugin_lib: str, net: nn.Module) -> bool:
    if plugin_lib == "timm":
        return hasattr(net, "num_prefix_tokens") and hasattr(net, "forward_intermediates")
    v = getattr(net, "visual", None)
    return hasattr(v, "forward_intermediates") and hasattr(v, "transformer")


def _has_cls(lib: str, net: nn.Module) -> bool:
    return lib == "open_clip" or getattr(net, "num_prefix_tokens", 0) >= 1


def layer_names(lib: str, net: nn.Module) -> tuple[list[str], str]:
    """The layers a plug-in model emits, and its default one."""
    names = ["pooled"] if lib == "timm" else ["embed"]
    if is_token_model(lib, net):
        names += list(TOKEN_LAYERS) if _has_cls(lib, net) else ["avg", "last4"]
    elif lib == "timm":
        names += [f["module"] for f in getattr(net, "feature_info", [])]
    return names, names[0]


def resolve_layers(lib: str, net: nn.Module, layers) -> list[str]:
    known, default = layer_names(lib, net)
    if not layers:
        return [default]
    out = []
    for layer in layers:
        if layer in out:
            raise FeatprobeError(f"layer {layer!r} given twice")
        if layer not in known:
            raise FeatprobeError(f"unknown layer {layer!r}: this model emits {', '.join(known)}")
        out.append(layer)
    return out


def _cls_avg(tokens: torch.Tensor, n_prefix: int, want: str) -> torch.Tensor:
    parts = ([tokens[:, 0]] if want in ("cls", "cls+avg", "last4") and n_prefix else []) + \
            ([tokens[:, n_prefix:].mean(1)] if want != "cls" else [])
    return torch.cat(parts, 1)


class PluginExtractor(nn.Module):
    """Runs a plug-in model once per batch and returns the requested layers as ``[B, D]``."""

    def __init__(self, lib: str, net: nn.Module, layers: list[str]):
        super().__init__()
        self.lib, self.net, self.layers = lib, net, list(layers)
        self.tokens = is_token_model(lib, net)
        self._stages: dict[str, torch.Tensor] = {}
        for f in getattr(net, "feature_info", []) if lib == "timm" and not self.tokens else []:
            if f["module"] in self.layers:
                net.get_submodule(f["module"]).register_forward_hook(
                    lambda m, a, out, k=f["module"], c=f["num_chs"]: self._keep(k, out, c))

    def _keep(self, name: str, t: torch.Tensor, channels: int) -> None:
        dims = (2, 3) if t.shape[1] == channels else (1, 2)  # NCHW, or NHWC (Swin-style)
        self._stages[name] = t.float().mean(dims) if t.ndim == 4 else t.flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = set(self.layers)
        n = 4 if "last4" in wanted else 1
        out: dict[str, torch.Tensor] = {}
        if self.lib == "open_clip":
            if not self.tokens:
                return {"embed": self.net.encode_image(x)}
            r = self.net.visual.forward_intermediates(
                x, indices=n, normalize_intermediates=True, output_fmt="NLC",
                output_extra_tokens=True)
            blocks = [torch.cat([p, s], 1) for p, s in zip(r["image_intermediates_prefix"],
                                                            r["image_intermediates"])]
            n_prefix, final = 1, blocks[-1]
            out["embed"] = r["image_features"]
        else:
            self._stages = {}
            n_prefix = getattr(self.net, "num_prefix_tokens", 0)
            if self.tokens and "last4" in wanted:
                final, inter = self.net.forward_intermediates(
                    x, indices=4, return_prefix_tokens=n_prefix > 0, norm=True, output_fmt="NLC")
                blocks = [torch.cat([b[1], b[0]], 1) if n_prefix else b for b in inter]
            else:
                final = self.net.forward_features(x)
            out["pooled"] = self.net.forward_head(final, pre_logits=True)
            out.update(self._stages)
        if self.tokens:
            for want in ("cls", "avg", "cls+avg"):
                if want in wanted:
                    out[want] = _cls_avg(final, n_prefix, want)
            if "last4" in wanted:
                out["last4"] = torch.cat([_cls_avg(b, n_prefix, "last4") for b in blocks], 1)
        return {k: out[k].flatten(1) for k in self.layers}


def describe(backbone: str) -> dict:
    """``featprobe backbones timm:<name>``: the layers with their dims, the default, the
    preprocessing. A random-init build (no download) and one forward pass of a blank image."""
    p = build(backbone, "none")
    names, default = layer_names(p.lib, p.net)
    pre = transform_facts(p.transform, p.lib)
    size = pre["crop_size"][0]
    with torch.inference_mode():
        out = PluginExtractor(p.lib, p.net, names)(torch.zeros(1, 3, size, size))
    return {"name": backbone, "layers": {k: int(v.shape[1]) for k, v in out.items()},
            "default_layers": [default], "preprocessing": pre, **p.provenance}
