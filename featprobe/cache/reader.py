"""Reading a complete cache: :class:`FeatureCache` (metadata and small arrays at open, features
on demand) and chunk-aligned row reads with bounded memory."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from featprobe.cache.format import FORMAT_VERSION, PARTIAL_SUFFIX, decode_attr, rows_digest, text
from featprobe.errors import FeatprobeError


class FeatureCache:
    """A complete feature cache, opened read-only. Small arrays (``ids``, ``labels``, ``valid``)
    are read at open; features on demand, so opening a huge cache costs nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_suffix(PARTIAL_SUFFIX)
            if partial.is_dir():
                raise FeatprobeError(
                    f"{self.path} is incomplete (an interrupted extract left {partial.name}/); "
                    "rerun the same `featprobe extract` to finish it")
            raise FeatprobeError(f"cache not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                self._check(attrs)
                self.meta = {k: decode_attr(v) for k, v in attrs.items()}
                self.ids = [text(s) for s in f["ids"][()]]
                self.labels = f["labels"][()].astype(np.int64)
                self.classes = json.loads(f["labels"].attrs["classes"])
                self.valid = f["valid"][()].astype(bool)
                self.layers = list(self.meta["layers"])
                self.shapes = {k: f["features"][k].shape for k in self.layers}
                self.dtypes = {k: f["features"][k].dtype for k in self.layers}
                # caches before per-chunk checksums (featprobe 0.1.0): see docs/reliability.md
                self.checksummed = all(f["features"][k].fletcher32 for k in self.layers)
                bad = f["bad"][()] if "bad" in f else np.empty((0, 2), dtype=object)
                self.bad = [tuple(text(x) for x in row) for row in bad]
            self._check_rows()
        except FeatprobeError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
            # AttributeError: a damaged link that names a Datatype where a Dataset should be
            raise FeatprobeError(f"{self.path} is not a readable featprobe cache: {e}") from None

    def _check(self, attrs: dict) -> None:
        version = attrs.get("format_version")
        if version is None:
            raise FeatprobeError(f"{self.path} is not a featprobe cache (no format_version)")
        if int(version) > FORMAT_VERSION:
            raise FeatprobeError(
                f"{self.path} has cache format {int(version)}, newer than this featprobe reads "
                f"({FORMAT_VERSION}); upgrade featprobe")
        complete = attrs.get("complete", False)
        if not (isinstance(complete, (bool, np.bool_)) and complete):  # not "False" (truthy)
            raise FeatprobeError(f"{self.path} is incomplete; rerun the extract that made it")

    def _check_rows(self) -> None:
        """Arrays that disagree would pair features with the wrong labels: refuse at open."""
        n, problems = len(self.ids), []
        if not isinstance(self.classes, list) or not self.classes:
            problems.append("the class list is empty or not a list")
        elif n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            problems.append("labels outside the class list")
        if self.labels.shape != (n,) or self.valid.shape != (n,):
            problems.append(f"labels/valid have {self.labels.shape}/{self.valid.shape} rows, "
                            f"ids {n}")
        for layer, shape in self.shapes.items():
            if len(shape) != 2 or shape[0] != n:
                problems.append(f"features/{layer} has shape {shape}, expected ({n}, D)")
        recorded = self.meta.get("rows_sha256")
        if not problems and recorded and rows_digest(self.ids, self.labels, self.valid,
                                                      self.classes) != recorded:
            problems.append("ids/labels/valid/classes do not match their recorded SHA-256")
        if problems:
            raise FeatprobeError(f"{self.path} is damaged: {'; '.join(problems)}")

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, backbone={self.backbone!r}, n={len(self)})"

    def _layer(self, layer: str | None) -> str:
        if layer is None:
            return self.layers[0]
        if layer not in self.layers:
            raise FeatprobeError(
                f"layer {layer!r} is not in {self.path.name}; it has {', '.join(self.layers)}")
        return layer

    def features(self, layer: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``layer`` (default: the first) as stored, all rows or the given ones."""
        layer = self._layer(layer)
        with read_errors(self.path, f"features/{layer}"), h5py.File(self.path, "r") as f:
            ds = f["features"][layer]  # rows: chunk-aligned ranges, memory = result + 32 MiB
            return ds[()] if rows is None else read_rows(ds, rows)


def chunk_rows(ds) -> int:
    return ds.chunks[0] if ds.chunks else max(1, (1 << 20) // (ds.shape[1] * ds.dtype.itemsize))


def row_ranges(sorted_rows: np.ndarray, span: int, n_total: int):
    """``(lo, hi, a, b)``: aligned row ranges ``[lo, hi)`` of ``span`` rows holding
    ``sorted_rows[a:b]`` (ranges without a wanted row are skipped)."""
    starts = np.arange(0, n_total, span, dtype=np.int64)
    bounds = np.searchsorted(sorted_rows, np.append(starts, n_total))
    for k in np.flatnonzero(bounds[1:] > bounds[:-1]):
        lo = int(starts[k])
        yield lo, min(lo + span, n_total), int(bounds[k]), int(bounds[k + 1])


def span_rows(ds, nbytes: int) -> int:
    """Rows per read: whole chunks, about ``nbytes`` (rows of one chunk if that is smaller)."""
    chunk = chunk_rows(ds)
    row = ds.shape[1] * ds.dtype.itemsize
    if nbytes < row * chunk:
        return min(chunk, max(64, nbytes // row))
    return nbytes // (row * chunk) * chunk


def read_rows(ds, rows, scan_bytes: int = 32 << 20) -> np.ndarray:
    """Rows ``rows`` of the 2-D h5py dataset ``ds``, in the given order (repeats allowed); memory
    is the result plus one chunk-aligned range of about ``scan_bytes``, never the whole layer."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), ds.shape[1]), dtype=ds.dtype)
    for where, block in iter_rows(ds, rows, scan_bytes):
        out[where] = block
    return out


def iter_rows(ds, rows, scan_bytes: int = 32 << 20):
    """``(where, block)`` over rows ``rows`` of ``ds``: ``block`` holds ``rows[where]`` as
    stored, read one chunk-aligned range of about ``scan_bytes`` at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return
    if rows.min() < 0 or rows.max() >= ds.shape[0]:
        raise IndexError(f"row index out of range 0..{ds.shape[0] - 1}")
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    span = span_rows(ds, scan_bytes)
    scratch = np.empty((span, ds.shape[1]), dtype=ds.dtype)
    for lo, hi, a, b in row_ranges(srt, span, ds.shape[0]):
        read_block(ds, scratch, np.s_[lo:hi], np.s_[0 : hi - lo])
        yield order[a:b], scratch[srt[a:b] - lo]  # fancy indexing: a copy, not the scratch


def read_block(ds, out: np.ndarray, rows: slice, at: slice) -> None:
    """``ds.read_direct(out, rows, at)``; an HDF5 read error (a chunk whose Fletcher-32
    checksum no longer matches among them) becomes one line naming the file."""
    try:
        ds.read_direct(out, rows, at)
    except OSError as e:
        why = str(e).splitlines()[0]
        if ds.fletcher32 and "filter" in why:
            why = "a chunk's Fletcher-32 checksum does not match its bytes"
        raise FeatprobeError(f"cannot read {ds.name} rows {rows.start}-{rows.stop - 1} of "
                             f"{ds.file.filename}: {why}; the file is damaged: re-extract it"
                             ) from None


@contextmanager
def read_errors(path: Path, what: str):
    """HDF5 errors while reading a cache that opened fine mean a damaged file: say so."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as e:
        raise FeatprobeError(f"cannot read {what} from {path}: {e} (a damaged file?)") from None

