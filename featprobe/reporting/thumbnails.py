"""Small thumbnails of source images, made at report time, as ``data:`` URIs the page carries
inside itself. An image that cannot be found or read gives ``None``: the page shows a
placeholder, the report never fails for it."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image

SIZE = 96  # pixels, the longer side
QUALITY = 70  # JPEG: ~2-4 KB a thumbnail


def image_root(meta: dict, images: str | os.PathLike | None = None) -> Path | None:
    """Where a cache's image ids are relative to: ``images`` when given; else the folder the
    cache was extracted from (``source``: a class-per-folder tree itself, or ``images/`` beside
    a CSV, the CSV format's default)."""
    if images is not None:
        return Path(images)
    for key in ("image_root", "images"):  # recorded by newer caches
        if isinstance(meta.get(key), str) and meta[key]:
            return Path(meta[key])
    source = meta.get("source")
    if not isinstance(source, str) or not source:
        return None
    source = Path(source)
    return source if source.is_dir() or not source.suffix else source.parent / "images"


def thumbnail(path: Path, size: int = SIZE) -> str | None:
    """``data:image/jpeg;base64,...`` of ``path`` shrunk to ``size`` px, or None."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEGs decode at a fraction of their size
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=QUALITY, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
