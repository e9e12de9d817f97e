"""The cache format's constants and what its reader and writer share: attribute encoding, the
rows digest and the content-address check. The format is specified in docs/cache-format.md."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"
STR = h5py.string_dtype("utf-8")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATPROBE_CACHE") or "cache")


def json_attr(value) -> str:
    return json.dumps(value, sort_keys=True)


def text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def decode_attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def attr_value(value):
    """Plain HDF5 attributes: numbers and strings as they are, anything else as JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, str):
        return str(value)  # np.str_ has no HDF5 conversion
    return json_attr(value)


# root attributes every extracted cache has (docs/cache-format.md); written by `extract`
EXTRACT_ATTRS = ("format_version", "complete", "backbone", "weights", "weights_id",
                  "weights_file", "weights_sha256", "layers", "preprocessing", "dtype",
                  "precision", "dataset_fingerprint", "source", "cache_key", "device",
                  "featprobe_version", "torch_version", "torchvision_version", "created_at",
                  "n_valid")


def check_identity(meta: dict) -> list[str]:
    """An extracted cache's metadata must still hash to its ``cache_key`` (the content address
    its name comes from), and carry every documented attribute."""
    key = meta.get("cache_key")
    if not key:
        return []  # written by write_arrays: no content address to check
    problems = []
    missing = [k for k in EXTRACT_ATTRS if k not in meta]
    if missing:
        problems.append(f"attributes missing: {', '.join(missing)}")
    config = {k: meta.get(k) for k in ("format_version", "backbone", "layers", "preprocessing",
                                        "dtype", "precision", "dataset_fingerprint")}
    config["weights"] = meta.get("weights_id")
    if hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() != key:
        problems.append("the backbone/weights/layers/preprocessing/dtype/precision/dataset "
                        "attributes do not hash to the recorded cache_key")
    return problems


def rows_digest(ids, labels, valid, classes) -> str:
    """SHA-256 of what identifies the rows: ids, labels, valid flags and the class list."""
    h = hashlib.sha256(json.dumps([list(ids), list(classes)], default=str).encode())
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(valid, dtype=bool)).tobytes())
    return h.hexdigest()

