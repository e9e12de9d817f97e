"""The one conversion of featprobe's values to plain JSON types (run records, head metadata,
cache attributes, tables): numpy scalars and arrays unwrapped, tuples as lists, paths as text,
NaN and infinities as None."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def to_plain(obj: Any) -> Any:
    """``obj`` as plain JSON types; raises TypeError for anything else (a model, a function)."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return to_plain(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{obj!r} of type {type(obj).__name__} is not plain JSON")


def is_plain(value: Any) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged (an estimator parameter that can
    be recorded and rebuilt from the record)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False
