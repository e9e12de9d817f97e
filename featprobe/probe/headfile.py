"""Save and load fitted heads as plain arrays plus JSON: one ``.npz`` file, no pickle.

``__meta__`` (JSON) holds featprobe's keys and the caller's; ``__state__`` (JSON) says how to
rebuild the estimator: per step its class, ``get_params()`` and every fitted attribute, inline
or as an array of the archive. Only classes in :data:`ALLOWED_CLASSES` are ever constructed (a
name read from a file is looked up, never imported). docs/heads.md specifies the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.validation import check_is_fitted

from featprobe import __version__
from featprobe.errors import FeatprobeError
from featprobe.files import atomic_write
from featprobe.plain import is_plain, to_plain
from featprobe.probe.knn import KNNHead
from featprobe.probe.registry import L2Normalizer, head_name, head_params, is_l2_normalized
from featprobe.probe.torch_heads import LinearHead, MLPHead

__all__ = ["ALLOWED_CLASSES", "FORMAT_VERSION", "load_head", "save_head"]

FORMAT_VERSION = 1

# The names a head file gives classes: a stable part of the format (0.1.0's module names), not
# where the classes live today.
ALLOWED_CLASSES: dict[str, type] = {
    "featprobe.heads.LinearHead": LinearHead, "featprobe.heads.MLPHead": MLPHead,
    "sklearn.linear_model.LogisticRegression": LogisticRegression,
    "sklearn.linear_model.SGDClassifier": SGDClassifier,  # the out-of-core stand-in for logreg/svm
    "sklearn.svm.LinearSVC": LinearSVC, "sklearn.svm.SVC": SVC,
    "sklearn.preprocessing.StandardScaler": StandardScaler, "sklearn.pipeline.Pipeline": Pipeline,
    "featprobe.heads.KNNHead": KNNHead, "featprobe.heads.L2Normalizer": L2Normalizer,
}
_CLASS_NAMES = {cls: name for name, cls in ALLOWED_CLASSES.items()}
_RESERVED = ("format_version", "featprobe_version", "head", "estimator_class", "standardize",
             "l2_normalize",
             "params", "library_versions")
_JSON_SCALARS = (bool, int, float, str, type(None))
# Fitted state that prediction never reads and that is not plain data: not saved.
# (SGDClassifier's Cython loss object is needed only to continue partial_fit.)
_UNSAVED = ("_loss_function_",)


def _class_name(est: Any) -> str:
    name = _CLASS_NAMES.get(type(est))
    if name is None:
        raise FeatprobeError(f"cannot save a {type(est).__name__}: not a known head class")
    return name


def _encode_params(est: BaseEstimator, skip: tuple[str, ...] = ()) -> dict:
    params = {}
    for k, v in est.get_params(deep=False).items():
        if k in skip:
            continue
        v = v.item() if isinstance(v, np.generic) else v
        if not is_plain(v):
            raise FeatprobeError(f"cannot save {type(est).__name__}: parameter {k}={v!r} is not "
                                 "plain JSON")
        params[k] = v
    return params


def _encode_value(name: str, v: Any, key: str, arrays: dict) -> dict:
    """One fitted attribute → a JSON record; arrays go to ``arrays`` under ``key``."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "O":
            if not all(isinstance(x, str) for x in v.flat):
                raise FeatprobeError(f"cannot save attribute {name}: object array of non-strings")
            arrays[key] = v.astype(str)
            return {"array": key, "object": True}
        if v.dtype.kind not in "biufcUS":
            raise FeatprobeError(f"cannot save attribute {name}: dtype {v.dtype}")
        arrays[key] = v
        return {"array": key}
    if isinstance(v, np.generic):  # keep the exact dtype (e.g. float64 _gamma of SVC)
        arrays[key] = np.asarray(v)
        return {"scalar": key}
    if isinstance(v, _JSON_SCALARS):
        return {"json": v}
    if isinstance(v, (list, tuple)):
        tup = isinstance(v, tuple)
        if all(isinstance(x, _JSON_SCALARS) for x in v):
            return {"json": list(v), "tuple": tup}
        items = [_encode_value(name, x, f"{key}.{i}", arrays) for i, x in enumerate(v)]
        return {"list": items, "tuple": tup}
    raise FeatprobeError(f"cannot save attribute {name}: unsupported type {type(v).__name__}")


def _encode_estimator(est: BaseEstimator, index: int, arrays: dict) -> dict:
    params = _encode_params(est)
    attrs = {k: _encode_value(k, v, f"s{index}.{k}", arrays) for k, v in vars(est).items()
             if k not in params and k not in _UNSAVED}
    return {"class": _class_name(est), "params": params, "attrs": attrs}


def save_head(path: str | os.PathLike, estimator: BaseEstimator, meta: dict) -> Path:
    """Write a fitted head (or ``Pipeline(StandardScaler, head)``) to one ``.npz`` at ``path``.

    ``meta``: JSON-able facts kept with the head (it may not contradict featprobe's own keys).
    Written under a temporary name and renamed, so a crash never leaves a partial file at ``path``.
    """
    path = Path(path)
    try:
        check_is_fitted(estimator)
    except NotFittedError as e:
        raise FeatprobeError(f"cannot save an unfitted {type(estimator).__name__}") from e
    except TypeError as e:
        raise FeatprobeError(f"cannot save a {type(estimator).__name__}: not an estimator") from e

    name = head_name(estimator)  # refuses anything that is not a registered head
    arrays: dict[str, np.ndarray] = {}
    if isinstance(estimator, Pipeline):
        steps = [s for _, s in estimator.steps]
        state = {"pipeline": {"names": [n for n, _ in estimator.steps],
                              "params": _encode_params(estimator, skip=("steps",))}}
    else:
        steps, state = [estimator], {"pipeline": None}
    state["steps"] = [_encode_estimator(s, i, arrays) for i, s in enumerate(steps)]

    own = {"format_version": FORMAT_VERSION, "featprobe_version": __version__, "head": name,
           "estimator_class": _class_name(estimator),
           "standardize": any(isinstance(s, StandardScaler) for s in steps[:-1]),
           "l2_normalize": is_l2_normalized(estimator),
           "params": head_params(estimator),
           "library_versions": {"scikit-learn": sklearn.__version__, "torch": torch.__version__,
                                "numpy": np.__version__}}
    try:
        theirs = to_plain(dict(meta))
    except TypeError as e:
        raise FeatprobeError(f"head metadata is not JSON-serialisable: {e}") from e
    for k in _RESERVED:
        if k in theirs and theirs[k] != own[k]:
            raise FeatprobeError(f"head metadata key {k!r} is reserved (featprobe sets it)")
    arrays["__meta__"] = np.array(json.dumps({**theirs, **own}))
    arrays["__state__"] = np.array(json.dumps(state))
    arrays["__sha256__"] = np.array(_digest(arrays))

    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise FeatprobeError(f"cannot write head file {path}: {e.strerror or e}") from e
    return path


def _digest(arrays) -> str:
    """SHA-256 of every member but itself: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != "__sha256__"):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, a.shape]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check_fitted(est, where: str) -> None:
    """What no fit produces: non-finite learned numbers, classes out of order, a zero scale."""
    for k, v in vars(est).items():
        for a in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.isfinite(a).all():
                raise FeatprobeError(f"{where}: {k} holds NaN or inf; the file was edited")
    classes = getattr(est, "classes_", None)
    if classes is not None and (len(classes) < 2 or (classes[1:] <= classes[:-1]).any()):
        raise FeatprobeError(f"{where}: classes_ are not distinct and sorted; the file was edited")
    if isinstance(est, StandardScaler) and not (np.asarray(est.scale_) > 0).all():
        raise FeatprobeError(f"{where}: the scaler divides by zero; the file was edited")
    labels = getattr(est, "train_labels_", None)  # KNNHead: class indices of its rows
    if labels is not None and (np.asarray(est.train_).shape[0] != len(labels) or len(labels) and (
            labels.min() < 0 or labels.max() >= len(classes))):
        raise FeatprobeError(f"{where}: train_labels_ do not index classes_; the file was edited")


def _decode_value(rec: dict, members: dict, where: str) -> Any:
    def array(key):
        if key not in members:
            raise FeatprobeError(f"{where}: array {key!r} is missing")
        return members[key]

    if "array" in rec:
        a = array(rec["array"])
        return a.astype(object) if rec.get("object") else a
    if "scalar" in rec:
        return array(rec["scalar"])[()]
    if "list" in rec:
        out = [_decode_value(r, members, where) for r in rec["list"]]
        return tuple(out) if rec.get("tuple") else out
    if "json" in rec:
        v = rec["json"]
        return tuple(v) if rec.get("tuple") else v
    raise FeatprobeError(f"{where}: unrecognised attribute record {sorted(rec)}")


def _build(cls_name: str, params: dict, where: str):
    cls = ALLOWED_CLASSES.get(cls_name)
    if cls is None:
        raise FeatprobeError(f"{where}: class {cls_name!r} is not one featprobe loads")
    try:
        return cls(**params)
    except TypeError as e:
        raise FeatprobeError(f"{where}: cannot rebuild {cls_name}: {e}") from e


def load_head(path: str | os.PathLike) -> tuple[BaseEstimator, dict]:
    """Read a head written by :func:`save_head`: ``(estimator, meta)``.

    Raises FeatprobeError for a missing file, a file that is not a head file or is written by a
    newer format, or that names a class outside :data:`ALLOWED_CLASSES`.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FeatprobeError(f"no head file at {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile, numpy format and pickle refusals all land here
        raise FeatprobeError(f"{where} is not a featprobe head file (unreadable: {e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise FeatprobeError(f"{where} is not a featprobe head file (a .npy, not an .npz)")
    with npz:
        for key in ("__meta__", "__state__"):
            if key not in npz.files:
                raise FeatprobeError(f"{where} is not a featprobe head file (missing {key!r})")
        try:  # every member read once: the digest and the estimator use the same arrays
            members = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError) as e:  # a pickled or damaged member
            raise FeatprobeError(f"{where} is not a featprobe head file (a member cannot be "
                                 f"read as plain data: {str(e).splitlines()[0]})") from e
        # files saved before 0.2 carry no digest; their contents are still checked below
        if "__sha256__" in members and str(members["__sha256__"][()]) != _digest(members):
            raise FeatprobeError(f"{where} was edited or damaged: its arrays and metadata do not "
                                 "match the SHA-256 saved with them")
        try:
            meta = json.loads(str(members["__meta__"][()]))
            state = json.loads(str(members["__state__"][()]))
            version = meta["format_version"]
            steps = state["steps"]
            pipeline = state["pipeline"]
        except KeyError as e:
            raise FeatprobeError(f"{where} is not a featprobe head file (missing {e})") from e
        except (ValueError, TypeError) as e:
            raise FeatprobeError(f"{where} is not a featprobe head file (bad metadata)") from e
        if not isinstance(version, int) or version < 1:
            raise FeatprobeError(f"{where}: bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise FeatprobeError(f"{where} has head format_version {version}; this featprobe "
                                 f"reads up to {FORMAT_VERSION}: upgrade featprobe")
        try:
            built = []
            for rec in steps:
                est = _build(rec["class"], rec["params"], where)
                for k, attr in rec["attrs"].items():
                    setattr(est, k, _decode_value(attr, members, where))
                _check_fitted(est, where)
                built.append(est)
            if pipeline is None:
                if len(built) != 1:
                    raise FeatprobeError(f"{where}: expected one estimator, found {len(built)}")
                estimator = built[0]
            else:
                steps = list(zip(pipeline["names"], built, strict=True))
                estimator = _build("sklearn.pipeline.Pipeline",
                                   {**pipeline["params"], "steps": steps}, where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FeatprobeError(f"{where}: corrupt head state ({type(e).__name__}: {e})") from e

    saved = meta.get("library_versions", {}).get("scikit-learn")
    if saved and saved != sklearn.__version__:
        warnings.warn(f"{where} was saved with scikit-learn {saved}, loading with "
                      f"{sklearn.__version__}; predictions of scikit-learn heads may differ",
                      UserWarning, stacklevel=2)
    return estimator, meta
