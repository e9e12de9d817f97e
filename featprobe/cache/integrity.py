"""Whole-cache operations: ``merge`` (consolidate shards' parts), ``verify`` and ``list_caches``."""

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
    """Consolidate the parts that ``extract --shard i/n`` jobs wrote into the final cache; ``path``
    is the ``<name>.h5`` the shards printed or its ``.partial`` folder."""
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
            out.append({"path": str(p), "complete": True, "backbone": c.backbone, "n": len(c),
                        "weights": c.meta.get("weights"), "layers": c.layers, "n_valid": c.n_valid})
        except FeatprobeError as e:
            out.append({"path": str(p), "complete": False, "error": str(e)})
    for p in sorted(d.glob("*" + PARTIAL_SUFFIX)):
        if not p.with_suffix(SUFFIX).exists():
            partial = PartialCache(p.with_suffix(SUFFIX))
            total = partial.n_parts() if (p / "manifest.json").exists() else "?"
            out.append({"path": str(partial.final), "complete": False,
                        "error": f"incomplete: {len(partial.done_parts())}/{total} parts written"})
    return out


def verify(path: str | os.PathLike, checksums: bool = True) -> dict:
    """Check a cache's integrity; raise FeatprobeError naming the problems found. Opening it checks
    completeness, format and row counts; this adds ``n_valid`` and ``/bad`` against ``/valid``, the
    content address and (``checksums``) the rows' and layers' SHA-256."""
    cache = FeatureCache(path)
    n = len(cache)
    problems = []
    if int(cache.meta.get("n_valid", -1)) != cache.n_valid:
        problems.append(f"n_valid says {cache.meta.get('n_valid')}, /valid has {cache.n_valid}")
    if len(cache.bad) != n - cache.n_valid:
        problems.append(f"/bad lists {len(cache.bad)} rows, /valid marks {n - cache.n_valid}")
    problems += check_identity(cache.meta)
    checked = {}
    if checksums and cache.meta.get("rows_sha256"):  # FeatureCache checked it on opening
        checked["rows"] = True
    with read_errors(cache.path, "the features"), h5py.File(cache.path, "r") as f:
        for layer in cache.layers:
            ds = f["features"][layer]
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

