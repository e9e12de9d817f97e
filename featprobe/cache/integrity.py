"""Whole-cache operations: ``merge`` (consolidate shards' parts), ``verify`` (integrity) and
``list_caches``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from featprobe.cache.format import (
    PARTIAL_SUFFIX,
    SUFFIX,
    check_identity,
    default_cache_dir,
    rows_digest,
    text,
)
from featprobe.cache.reader import FeatureCache, read_errors
from featprobe.cache.writer import PartialCache
from featprobe.errors import FeatprobeError


def merge(path: str | os.PathLike, on_wait=None) -> FeatureCache:
    """Consolidate the parts that ``extract --shard i/n`` jobs wrote into the final cache.

    ``path`` is the cache file the shards printed (``<name>.h5``) or its ``.partial`` folder.
    Merging a cache that is already complete just opens it.
    """
    p = Path(path)
    final = p.with_suffix(SUFFIX) if p.suffix == PARTIAL_SUFFIX else p
    partial = PartialCache(final)
    if final.exists():
        return FeatureCache(final)
    if not (partial.dir / "manifest.json").exists():
        raise FeatprobeError(f"nothing to merge: {partial.dir} has no extracted parts")
    if not (partial.dir / "dataset.npz").exists():
        raise FeatprobeError(f"{partial.dir} was written by an older featprobe; rerun the extract")
    with partial.locked(on_wait=on_wait):
        if not final.exists():
            partial.finish()
    return FeatureCache(final)


def list_caches(directory: str | os.PathLike | None = None) -> list[dict]:
    """Complete and incomplete caches in a directory; incomplete ones are never opened as caches."""
    d = Path(directory) if directory is not None else default_cache_dir()
    out = []
    for p in sorted(d.glob("*" + SUFFIX)):
        try:
            c = FeatureCache(p)
            out.append({"path": str(p), "complete": True, "backbone": c.backbone,
                        "weights": c.meta.get("weights"), "layers": c.layers, "n": len(c),
                        "n_valid": c.n_valid})
        except FeatprobeError as e:
            out.append({"path": str(p), "complete": False, "error": str(e)})
    for p in sorted(d.glob("*" + PARTIAL_SUFFIX)):
        if not p.with_suffix(SUFFIX).exists():
            m = p / "manifest.json"
            total = None
            if m.exists():
                man = json.loads(m.read_text())
                total = -(-man["n_rows"] // man["part_rows"])
            done = len(list(p.glob("part-*.npz")))
            out.append({"path": str(p.with_suffix(SUFFIX)), "complete": False,
                        "error": f"incomplete: {done}/{total if total else '?'} parts written"})
    return out



def verify(path: str | os.PathLike, checksums: bool = True) -> dict:
    """Check a cache's integrity; raise FeatprobeError naming the first problem found.

    Checks completeness and format version (by opening it), that every array has one row per
    id, that ``n_valid`` and ``/bad`` agree with ``/valid``, that labels index ``classes``, and
    (``checksums=True``) that each layer's bytes still match the SHA-256 recorded when the
    cache was consolidated — read in row blocks, so memory stays bounded.
    """
    cache = FeatureCache(path)
    n = len(cache)
    problems = []
    if len(cache.labels) != n or len(cache.valid) != n:
        problems.append(f"labels/valid have {len(cache.labels)}/{len(cache.valid)} rows, ids {n}")
    if n and (cache.labels.min() < 0 or cache.labels.max() >= len(cache.classes)):
        problems.append("labels outside the class list")
    if int(cache.meta.get("n_valid", -1)) != cache.n_valid:
        problems.append(f"n_valid says {cache.meta.get('n_valid')}, /valid has {cache.n_valid}")
    if len(cache.bad) != n - cache.n_valid:
        problems.append(f"/bad lists {len(cache.bad)} rows, /valid marks {n - cache.n_valid}")
    problems += check_identity(cache.meta)
    checked = {}
    recorded_rows = cache.meta.get("rows_sha256")
    if checksums and recorded_rows:  # caches made before it was recorded have none
        got = rows_digest(cache.ids, cache.labels, cache.valid, cache.classes)
        checked["rows"] = got == recorded_rows
        if not checked["rows"]:
            problems.append("ids/labels/valid/classes do not match their recorded SHA-256")
    with read_errors(cache.path, "the features"), h5py.File(cache.path, "r") as f:
        for layer in cache.layers:
            ds = f["features"][layer]
            if ds.shape[0] != n:
                problems.append(f"features/{layer} has {ds.shape[0]} rows, ids {n}")
                continue
            recorded = text(ds.attrs.get("sha256", ""))
            if not checksums or not recorded:
                continue
            h = hashlib.sha256()
            step = max(1, (64 << 20) // max(1, ds.shape[1] * ds.dtype.itemsize))
            for start in range(0, n, step):
                h.update(np.ascontiguousarray(ds[start:start + step]).tobytes())
            checked[layer] = h.hexdigest() == recorded
            if not checked[layer]:
                problems.append(f"features/{layer} does not match its recorded SHA-256")
    if problems:
        raise FeatprobeError(f"{cache.path} failed verification: " + "; ".join(problems))
    return {"path": str(cache.path), "rows": n, "valid": cache.n_valid, "layers": cache.layers,
            "checksums": checked}

