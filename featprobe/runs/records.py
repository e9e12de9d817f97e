"""Run records and the append-only runs log (``runs.jsonl``, schema in docs/runs.md): one JSON line
per run, appended under an exclusive file lock, never rewritten or truncated."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import platform
import sys
import uuid
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from featprobe.errors import FeatprobeError
from featprobe.plain import to_plain

__all__ = ["RUNS_FILE", "RECORD_FIELDS", "append_run", "compute_metrics", "make_record",
           "read_runs", "recorded_run", "recorded_val_outputs", "correct_mask", "val_outputs"]

RUNS_FILE = "runs.jsonl"
log = logging.getLogger("featprobe")

# Every record carries all of these keys (None where not applicable); see docs/runs.md.
RECORD_FIELDS = ("run_id", "time", "kind", "cache", "cache_path", "dataset_fingerprint",
                 "backbone", "weights", "layer", "head", "params", "standardize", "seed",
                 "val_fraction", "split_hash", "n_train", "n_val", "n_invalid", "classes",
                 "train", "val", "fit_seconds", "sweep", "versions")
KINDS = ("probe", "baseline", "curve")
_BASELINE_DEFAULTS = {"backbone": "cnn", "weights": "none", "layer": "pixels", "head": "cnn"}


def compute_metrics(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> dict:
    """Accuracy, balanced accuracy, macro F1 and the confusion matrix (rows true, columns
    predicted, in ``labels`` order), as plain Python. ``macro_f1`` averages over the classes
    present in either (an absent class says nothing). Empty input gives None metrics."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    y_true, y_pred, labels = np.asarray(y_true), np.asarray(y_pred), list(labels)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "macro_f1": None,
                "confusion_matrix": [[0] * len(labels) for _ in labels]}
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected
        warnings.simplefilter("ignore", UserWarning)
        bal = balanced_accuracy_score(y_true, y_pred)
    return {"n": int(y_true.size), "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(bal),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


def majority_rate(y_train: np.ndarray, y_val: np.ndarray) -> float:
    """Val accuracy of always answering the most common training class: the floor to beat."""
    if len(y_val) == 0:
        return float("nan")
    return float(np.mean(y_val == np.bincount(y_train).argmax()))


def val_outputs(y_pred: np.ndarray, confidence: np.ndarray | None) -> dict:
    """A run's val predictions (class indices, one byte) and the probability of each predicted
    class (quantised to 1/65535, two bytes), as hex in split order: what ``featprobe report``
    shows of the run without refitting it (6 hex characters per val image; not kept past 256
    classes)."""
    pred = np.asarray(y_pred)
    if pred.size == 0 or pred.min() < 0 or pred.max() > 255:
        return {}
    out = {"val_predictions": pred.astype(np.uint8).tobytes().hex()}
    if confidence is not None:
        q = np.rint(np.clip(np.asarray(confidence, dtype=float), 0, 1) * 65535)
        out["val_confidence"] = q.astype("<u2").tobytes().hex()
    return out


def recorded_val_outputs(record: dict, n_val: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What :func:`val_outputs` wrote: the val predictions (class indices) and probabilities,
    or None where the record has none or they do not fit a split of ``n_val`` val rows."""
    try:
        pred = np.frombuffer(bytes.fromhex(record["val_predictions"]), dtype=np.uint8)
        conf = record.get("val_confidence")
        prob = (np.frombuffer(bytes.fromhex(conf), dtype="<u2") / 65535.0
                if isinstance(conf, str) else None)
    except (KeyError, TypeError, ValueError):
        return None, None
    if len(pred) != n_val or (prob is not None and len(prob) != n_val):
        return None, None
    return pred.astype(np.int64), prob


def correct_mask(y_true: np.ndarray, y_pred: np.ndarray) -> str:
    """Which val rows were right, in split order, as hex of packed bits: the per-image outcome
    that pairs two runs on the same split (McNemar's test in ``featprobe compare``)."""
    return np.packbits(np.asarray(y_true) == np.asarray(y_pred)).tobytes().hex()


def _dist_version(module: str, dist: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is not None and isinstance(getattr(mod, "__version__", None), str):
        return mod.__version__
    try:  # no import: asking for torch's version must not cost a second of start-up
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    from featprobe import __version__

    return {"featprobe": __version__, "torch": _dist_version("torch", "torch"),
            "torchvision": _dist_version("torchvision", "torchvision"),
            "sklearn": _dist_version("sklearn", "scikit-learn"), "numpy": np.__version__,
            "python": platform.python_version()}


def make_record(**fields: Any) -> dict:
    """A run record: every schema field (None if not given) plus any extras, with ``run_id``,
    ``time`` and ``versions`` filled, baseline defaults for ``kind="baseline"``, and values as
    plain JSON types (numpy unwrapped, NaN -> None)."""
    kind = fields.get("kind")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(run_id=uuid.uuid4().hex,
                  time=datetime.now(timezone.utc).isoformat(timespec="seconds"), params={},
                  versions=dict(_versions()))
    if kind == "baseline":
        record.update(_BASELINE_DEFAULTS)
    record.update(fields)
    return to_plain(record)


def _runs_path(directory_or_file: str | os.PathLike) -> Path:
    path = Path(directory_or_file)
    return path if path.suffix == ".jsonl" else path / RUNS_FILE


def append_run(directory: str | os.PathLike, record: dict) -> Path:
    """Append ``record`` as one JSON line to ``<directory>/runs.jsonl`` under its lock, fsynced;
    return that path. A write that fails part-way (a full disk) is cut off again, and a torn
    last line left by a killed writer (writers hold the lock, so its writer is gone) is cut off
    first: the log keeps whole lines only."""
    path = _runs_path(directory)
    data = (json.dumps(to_plain(record), ensure_ascii=False, allow_nan=False) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path), open(path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            if start:
                start = _next_line_start(f, path, start)
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except OSError:
                os.ftruncate(f.fileno(), start)
                raise
    except OSError as exc:
        raise FeatprobeError(f"cannot append to {path}: {exc.strerror or exc}") from exc
    return path


def _lock(path: Path) -> FileLock:
    """The runs log's lock: a file beside it, held for one append or one read."""
    return FileLock(path.with_name(path.name + ".lock"))


# The types compare relies on (None is always allowed: older records lack fields).
_TYPES = {**dict.fromkeys(("run_id", "kind", "backbone", "weights", "layer", "head",
                           "dataset_fingerprint", "split_hash"), str),
          **dict.fromkeys(("params", "params_set", "train", "val", "sweep"), dict),
          **dict.fromkeys(("config_key", "run_key", "val_correct", "val_predictions",
                           "val_confidence"), str),
          "seed": int, "standardize": bool, "l2_normalize": bool, "val_fraction": float,
          "fit_seconds": float, "n_train": int, "n_val": int}
_METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "majority_rate")


def _check_types(obj: dict, where: str) -> None:
    """Refuse a record whose fields have types no featprobe writes (a hand-edited line)."""
    fields = [(k, obj.get(k), t) for k, t in _TYPES.items()]
    fields += [(f"{part}.{m}", obj[part].get(m), float) for part in ("train", "val")
               if isinstance(obj.get(part), dict) for m in _METRIC_KEYS]
    fields.append(("majority_rate", obj.get("majority_rate"), float))
    for key, value, kind in fields:
        ok = (value is None or (isinstance(value, (int, float) if kind is float else kind)
                                and not (kind is not bool and isinstance(value, bool))))
        if not ok:
            raise FeatprobeError(f"{where}: corrupted run record: {key} is {value!r:.40}, not "
                                 f"{'a number' if kind is float else kind.__name__}; fix or "
                                 "delete that line by hand")


def _next_line_start(f, path: Path, end: int) -> int:
    """Where the next record starts in a log of ``end`` bytes. After a newline: ``end``. After
    a whole record that lacks only its newline, or a last line longer than the 1 MiB looked at:
    the newline is written. Else the last line is torn (its writer is gone: writers hold the
    lock) and is cut off."""
    with open(path, "rb") as r:
        r.seek(max(0, end - (1 << 20)))
        tail = r.read(end - r.tell())
    if tail.endswith(b"\n"):
        return end
    last = tail[tail.rfind(b"\n") + 1:]
    try:
        json.loads(last.decode("utf-8"))
        whole = True
    except (UnicodeDecodeError, ValueError):
        whole = len(last) == len(tail) < end  # not all of it was read: keep it, never guess
    if whole:
        f.write(b"\n")
        return end + 1
    log.warning(f"warning: {path}: removed an incomplete last line left by a stopped writer")
    os.ftruncate(f.fileno(), end - len(last))
    return f.seek(end - len(last))


def read_runs(directory_or_file: str | os.PathLike) -> list[dict]:
    """All records in a runs log (a directory holding runs.jsonl, or the file); a missing file is an
    empty log. A line that is not a JSON object raises FeatprobeError naming file and line."""
    path = _runs_path(directory_or_file)
    if not path.exists():
        return []
    try:
        lock = _lock(path)
        lock.acquire()  # never see a line half-written by append_run
    except OSError:
        lock = None  # a folder we cannot write to: nobody appends there through featprobe
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FeatprobeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        if lock is not None:
            lock.release()
    lines = raw.split(b"\n")
    unterminated = lines[-1] != b""  # the last line has no trailing newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            if unterminated and number == len(lines):  # a writer killed mid-line
                log.warning(f"warning: {where}: skipped an incomplete last line ({why}), "
                            "left by a writer that was stopped; every other run is kept")
                break
            raise FeatprobeError(f"{where}: corrupted run record: {why}; fix or delete that line "
                                 "by hand") from exc
        if not isinstance(obj, dict):
            raise FeatprobeError(
                f"{where}: corrupted run record: a JSON {type(obj).__name__}, not an object; "
                "fix or delete that line by hand")
        _check_types(obj, where)
        records.append(obj)
    return records


def recorded_run(directory_or_file: str | os.PathLike, run_key: str) -> dict | None:
    """The last record in the runs log with this ``run_key`` (the same configuration and seed),
    or None. Lines that do not parse are passed over here (``compare`` reports them): a damaged
    log never stops a fit from being recorded."""
    path = _runs_path(directory_or_file)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    needle = json.dumps(run_key).encode()
    for line in reversed(raw.split(b"\n")):
        if needle in line:
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(obj, dict) and obj.get("run_key") == run_key:
                return obj
    return None
