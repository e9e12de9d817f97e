"""Shared fixtures: small real image files on disk (PNG/JPEG), in the formats featprobe reads.

Images are tiny (16×16 by default) so every test stays fast on two CPU cores. The two classes
are trivially separable: class 0 is dark and reddish, class 1 is bright and bluish, each with a
little noise so no two files are byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification


def torchvision_preset(pre: dict) -> ImageClassification:
    """torchvision's own classification preset for recorded preprocessing facts: the reference
    the package's split transform (featprobe.extraction.pixels) is tested against. (A private
    torchvision class, used here only, as an independent reference; the package uses public
    APIs alone.)"""
    return ImageClassification(
        crop_size=pre["crop_size"][0],
        resize_size=pre["resize_size"][0] if pre["resize_size"] else None,
        mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        interpolation=InterpolationMode(pre["interpolation"]), antialias=pre["antialias"])


def make_images(
    directory: str | Path,
    n: int,
    ext: str = "png",
    size: int = 16,
    labels: list | None = None,
    prefix: str = "img",
    seed: int = 0,
) -> list[tuple[str, int]]:
    """Write ``n`` small RGB images of two separable classes into ``directory``.

    Returns ``[(file_name, label), ...]`` with labels alternating 0, 1, 0, ... unless ``labels``
    (one 0/1 per image) is given. ``ext`` is ``png`` or ``jpg``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)] if labels is None else list(labels)
    assert len(labels) == n
    out = []
    for i, label in enumerate(labels):
        base = np.array([60, 20, 20] if label == 0 else [190, 200, 240], dtype=np.int16)
        noise = rng.integers(-15, 16, size=(size, size, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        name = f"{prefix}{i:03d}.{ext}"
        Image.fromarray(arr, "RGB").save(directory / name)
        out.append((name, label))
    return out


def write_csv(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` verbatim (no newline translation) and return the path."""
    path = Path(path)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture
def tutorial_csv(tmp_path) -> Path:
    """``train.csv`` (``image_names,emergency_or_no``, 8 rows) with ``images/`` beside it."""
    rows = make_images(tmp_path / "images", 8, ext="jpg")
    lines = ["image_names,emergency_or_no"] + [f"{name},{label}" for name, label in rows]
    return write_csv(tmp_path / "train.csv", "\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """``python tests/forkserver.py``: torch imported once, a forked `featprobe` per job
    (tests/reliability.py)."""
    from reliability import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("featprobe-logs"))
    yield server
    server.close()


@pytest.fixture
def class_tree(tmp_path) -> Path:
    """``tree/<class>/<image>``: classes ``cat`` (3 PNGs) and ``dog`` (2 PNGs)."""
    root = tmp_path / "tree"
    make_images(root / "cat", 3, labels=[0, 0, 0])
    make_images(root / "dog", 2, labels=[1, 1])
    return root
