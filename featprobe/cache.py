"""The HDF5 feature cache: its layout, crash-safe writing, and reading.

Writing never produces a file that reads as complete but is not:

1. Features stream into ``<name>.partial/``: one ``part-NNNNNN.npz`` per batch, each written to a
   temporary name, fsynced and atomically renamed. A killed run leaves only whole parts.
2. When every part exists they are consolidated into ``<name>.h5.tmp-<pid>``, with
   ``complete=True`` written last; the file is fsynced and renamed to ``<name>.h5``.
3. Only then is the partial folder removed.

So ``<name>.h5`` exists only when complete; rerunning the same extract resumes from the parts.
The format is specified in docs/cache-format.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import h5py
import numpy as np

from featprobe.errors import FeatprobeError
from featprobe.faults import crash_point

FORMAT_VERSION = 1
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial"
_STR = h5py.string_dtype("utf-8")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATPROBE_CACHE") or "cache")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteGuard:
    """A file for h5py's ``fileobj`` driver that fails once, then discards.

    When a write fails (full disk, file-size limit), HDF5 cannot close the file: every later
    flush fails too, and the interpreter crashes at exit. So the first failure is kept in
    ``error`` (not raised into HDF5's C callbacks) and everything after it is dropped, letting
    h5py close cleanly; the caller raises ``error`` and deletes the file.
    """

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def _guard(self, op, *args, done=None):
        if self.error is None:
            try:
                return op(*args)
            except OSError as e:
                # never raise into HDF5's C callbacks (it may report a stale, unrelated Python
                # error later, seen as "FileIO has no attribute flush"); pretend it worked and
                # let the caller raise self.error (checked after each copy and at the flush)
                self.error = e
        return done

    def write(self, b) -> int:
        return self._guard(self.raw.write, b, done=memoryview(b).nbytes)

    def truncate(self, size=None):
        return self._guard(self.raw.truncate, size, done=size)

    def flush(self) -> None:
        self._guard(self.raw.flush)

    def seek(self, *args) -> int:
        return self.raw.seek(*args)

    def tell(self) -> int:
        return self.raw.tell()

    def read(self, *args) -> bytes:
        return self.raw.read(*args)

    def readinto(self, b) -> int:
        return self.raw.readinto(b)


@contextmanager
def _h5_create(path: Path):
    """``h5py.File(path, "w")`` that turns a failed write into its OSError and fsyncs on close."""
    with open(path, "w+b", buffering=0) as raw:
        guard = _WriteGuard(raw)
        try:
            with h5py.File(guard, "w") as f:
                f.write_guard = guard  # lets a long-lived writer notice a failed write early
                yield f
        except Exception:
            if guard.error is not None:
                raise guard.error from None
            raise
        if guard.error is not None:
            raise guard.error
        os.fsync(raw.fileno())


def _json_attr(value) -> str:
    return json.dumps(value, sort_keys=True)


class FeatureCache:
    """A complete feature cache, opened read-only.

    Small arrays (``ids``, ``labels``, ``valid``) are read at open; features are read on demand,
    so opening a 60 GB cache costs nothing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_suffix(PARTIAL_SUFFIX)
            if partial.is_dir():
                raise FeatprobeError(
                    f"{self.path} is incomplete (an interrupted extract left {partial.name}/); "
                    "rerun the same `featprobe extract` to finish it"
                )
            raise FeatprobeError(f"cache not found: {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                attrs = dict(f.attrs)
                self._check(attrs)
                self.meta = {k: _decode_attr(v) for k, v in attrs.items()}
                self.ids = [s.decode() if isinstance(s, bytes) else s for s in f["ids"][()]]
                self.labels = f["labels"][()].astype(np.int64)
                self.classes = json.loads(f["labels"].attrs["classes"])
                self.valid = f["valid"][()].astype(bool)
                self.layers = list(self.meta["layers"])
                self.shapes = {k: f["features"][k].shape for k in self.layers}
                self.dtypes = {k: f["features"][k].dtype for k in self.layers}
                bad = f["bad"][()] if "bad" in f else np.empty((0, 2), dtype=object)
                self.bad = [tuple(_s(x) for x in row) for row in bad]
            self._check_rows()
        except FeatprobeError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise FeatprobeError(f"{self.path} is not a readable featprobe cache: {e}") from None

    def _check(self, attrs: dict) -> None:
        version = attrs.get("format_version")
        if version is None:
            raise FeatprobeError(f"{self.path} is not a featprobe cache (no format_version)")
        if int(version) > FORMAT_VERSION:
            raise FeatprobeError(
                f"{self.path} has cache format {int(version)}, newer than this featprobe reads "
                f"({FORMAT_VERSION}); upgrade featprobe"
            )
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
                f"layer {layer!r} is not in {self.path.name}; it has {', '.join(self.layers)}"
            )
        return layer

    def features(self, layer: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of ``layer`` (default: the first) as stored, all rows or the given ones."""
        layer = self._layer(layer)
        with _read_errors(self.path, f"features/{layer}"), h5py.File(self.path, "r") as f:
            ds = f["features"][layer]
            if rows is None:
                return ds[()]
            return read_rows(ds, rows)  # chunk-aligned ranges: memory = result + 32 MiB


def _chunk_rows(ds) -> int:
    if ds.chunks:
        return ds.chunks[0]
    return max(1, (1 << 20) // (ds.shape[1] * ds.dtype.itemsize))


def _runs(sorted_rows: np.ndarray, span: int, n_total: int):
    """``(lo, hi, a, b)``: aligned row ranges ``[lo, hi)`` of ``span`` rows holding
    ``sorted_rows[a:b]`` (ranges without a wanted row are skipped)."""
    starts = np.arange(0, n_total, span, dtype=np.int64)
    bounds = np.searchsorted(sorted_rows, np.append(starts, n_total))
    for k in np.flatnonzero(bounds[1:] > bounds[:-1]):
        lo = int(starts[k])
        yield lo, min(lo + span, n_total), int(bounds[k]), int(bounds[k + 1])


def _span(ds, nbytes: int) -> int:
    """Rows per read: whole chunks, about ``nbytes`` (rows of one chunk if that is smaller)."""
    chunk = _chunk_rows(ds)
    row = ds.shape[1] * ds.dtype.itemsize
    if nbytes < row * chunk:
        return min(chunk, max(64, nbytes // row))
    return nbytes // (row * chunk) * chunk


def read_rows(ds, rows, scan_bytes: int = 32 << 20) -> np.ndarray:
    """Rows ``rows`` of the 2-D h5py dataset ``ds``, in the given order (repeats allowed).

    Reads chunk-aligned ranges of about ``scan_bytes`` and scatters the wanted rows into the
    result, so memory is the result plus one range, never a copy of the whole layer.
    """
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
    span = _span(ds, scan_bytes)
    scratch = np.empty((span, ds.shape[1]), dtype=ds.dtype)
    for lo, hi, a, b in _runs(srt, span, ds.shape[0]):
        ds.read_direct(scratch, np.s_[lo:hi], np.s_[0 : hi - lo])
        yield order[a:b], scratch[srt[a:b] - lo]  # fancy indexing: a copy, not the scratch


@contextmanager
def _read_errors(path: Path, what: str):
    """HDF5 errors while reading a cache that opened fine mean a damaged file: say so."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as e:
        raise FeatprobeError(f"cannot read {what} from {path}: {e} (a damaged file?)") from None


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _decode_attr(v):
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


# ----------------------------------------------------------------------------- writing


class PartialCache:
    """The in-progress side of a cache: a folder of whole parts, locked by one writer.

    ``manifest.json`` records the configuration and the rows per part, so a resumed run uses the
    same part boundaries even if ``--batch-size`` changed.
    """

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.with_suffix(PARTIAL_SUFFIX)

    @contextmanager
    def locked(self, on_wait=None, name: str = "lock"):
        """Hold a writer lock; a second extract of the same cache waits here.

        ``lock`` guards a whole-dataset writer and consolidation; shard ``i/n`` writes its parts
        under ``lock-shard-i-of-n``, so shards run side by side but never twice at once.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if on_wait:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            crash_point("lock.acquired")
            yield self
        finally:
            os.close(fd)

    def manifest(self, config: dict, part_rows: int, n_rows: int) -> dict:
        """The existing manifest (which must match ``config``) or a new one."""
        path = self.dir / "manifest.json"
        m = {"config": config, "part_rows": int(part_rows), "n_rows": int(n_rows)}
        # create-if-absent: shards starting together agree on the first manifest written
        _create_once(path, json.dumps(m, sort_keys=True, indent=1).encode())
        m = json.loads(path.read_text())
        if m["config"] != config or m["n_rows"] != n_rows:
            raise FeatprobeError(f"{self.dir} belongs to a different extract; remove it")
        return m

    def save_dataset(self, ids: list[str], labels: np.ndarray, classes: list,
                     attrs: dict) -> None:
        """What consolidation needs besides the parts, so ``featprobe merge`` needs nothing else.

        Written once (by whichever shard gets there first); later writers keep the first.
        """
        path = self.dir / "dataset.npz"
        if not path.exists():
            import io

            buf = io.BytesIO()
            np.savez(buf, ids=np.array(ids, dtype=str), labels=np.asarray(labels, np.int64),
                     classes=np.array(_json_attr(classes)))
            _create_once(path, buf.getvalue())
        _create_once(self.dir / "attrs.json", _json_attr(attrs).encode())

    def load_dataset(self) -> tuple[list[str], np.ndarray, list, dict]:
        with np.load(self.dir / "dataset.npz", allow_pickle=False) as z:
            ids, labels, classes = z["ids"].tolist(), z["labels"], json.loads(str(z["classes"]))
        attrs = json.loads((self.dir / "attrs.json").read_text())
        return ids, labels, classes, attrs

    def missing_parts(self, n_parts: int) -> list[int]:
        done = self.done_parts()
        return [k for k in range(n_parts) if k not in done]

    def finish(self, builder: H5Builder | None = None) -> Path:
        """Consolidate a partial folder whose parts are all written (caller holds ``lock``).

        ``builder``: the one that already copied the parts this run wrote (see ``extract``).
        """
        m = json.loads((self.dir / "manifest.json").read_text())
        n_parts = -(-m["n_rows"] // m["part_rows"])
        missing = self.missing_parts(n_parts)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise FeatprobeError(
                f"{self.final.name}: {len(missing)} of {n_parts} parts are not written yet "
                f"(parts {shown}); let every shard finish (or rerun the ones that failed), "
                "then merge"
            )
        try:
            builder = builder if builder is not None and not builder.failed else self.builder()
            return builder.finish(self.load_dataset()[3])
        except (OSError, RuntimeError) as e:  # h5py reports a failed write as RuntimeError
            code = getattr(e, "errno", None) or _h5_errno(e)
            if code is None and not isinstance(e, OSError):
                raise
            for tmp in self.final.parent.glob(self.final.name + ".tmp-*"):
                tmp.unlink(missing_ok=True)  # give the space back now, not on the next run
            raise FeatprobeError(
                f"could not write {self.final} ({os.strerror(code) if code else e}); the extracted "
                f"parts are kept in {self.dir}: free space and rerun the same command"
            ) from None

    def part_path(self, k: int) -> Path:
        return self.dir / f"part-{k:06d}.npz"

    def done_parts(self) -> set[int]:
        out = set()
        for p in self.dir.glob("part-*.npz"):
            try:
                out.add(int(p.stem.split("-")[1]))
            except ValueError:
                pass
        return out

    def write_part(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        tmp = self.dir / f".part-{k:06d}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        crash_point("part.tmp_written")
        os.replace(tmp, self.part_path(k))
        crash_point("part.renamed")

    def read_part(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self.part_path(k), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}

    def consolidate(self, layers: list[str], ids: list[str], labels: np.ndarray, classes: list,
                    attrs: dict, dtype: str, n_parts: int) -> Path:
        """Parts → ``<name>.h5`` (atomically), then remove the partial folder."""
        builder = H5Builder(self, layers, ids, labels, classes, dtype, n_parts)
        return builder.finish(attrs)

    def builder(self) -> H5Builder:
        """An :class:`H5Builder` for this folder's manifest and dataset (caller holds ``lock``)."""
        m = json.loads((self.dir / "manifest.json").read_text())
        ids, labels, classes, _ = self.load_dataset()
        return H5Builder(self, m["config"]["layers"], ids, labels, classes,
                         m["config"]["dtype"], -(-m["n_rows"] // m["part_rows"]))


SYNC_EVERY = 256 << 20  # H5Builder fsyncs the file it builds every 256 MiB of features


class H5Builder:
    """Writes ``<name>.h5.tmp-<pid>`` part by part, in row order; :meth:`finish` completes it.

    ``extract`` feeds it each part as the part is written (from memory, on the writer thread), so
    the copy into HDF5 overlaps the forward pass instead of being a second pass over every byte
    at the end; parts it did not see (done by an earlier, interrupted run) are read back from
    disk in their turn. The parts stay the source of truth until the final rename: a kill at
    any moment leaves a ``.tmp-`` file that the next run deletes and rebuilds.
    """

    def __init__(self, partial: PartialCache, layers: list[str], ids: list[str],
                 labels: np.ndarray, classes: list, dtype: str, n_parts: int):
        self.partial, self.layers, self.dtype, self.n_parts = partial, list(layers), dtype, n_parts
        final = partial.final
        for stale in final.parent.glob(final.name + ".tmp-*"):
            stale.unlink(missing_ok=True)  # left by a run killed while consolidating
        crash_point("consolidate.begin")
        self.tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self.n = n = len(ids)
        self.valid = np.ones(n, dtype=bool)
        self.bad: list[tuple[str, str]] = []
        self.digests = {layer: hashlib.sha256() for layer in layers}
        self.datasets: dict = {}
        self.next = 0  # the next part to copy
        self.failed = False  # a copy failed: finish() starts over from the parts on disk
        self._unsynced = 0  # feature bytes copied since the last fsync
        self._stack = ExitStack()
        self.f = self._stack.enter_context(_h5_create(self.tmp))
        self.ids, self.labels, self.classes = list(ids), np.asarray(labels), list(classes)
        self.f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
        lab = self.f.create_dataset("labels", data=np.asarray(labels).astype(np.int64))
        lab.attrs["classes"] = _json_attr(classes)

    def add(self, k: int, part: dict[str, np.ndarray] | None = None) -> None:
        """Copy part ``k`` (given, or read from disk), after any earlier parts not yet copied."""
        while self.next < k:
            self._copy(self.next, self.partial.read_part(self.next))
        if k == self.next:
            self._copy(k, part if part is not None else self.partial.read_part(k))

    def _copy(self, k: int, part: dict[str, np.ndarray]) -> None:
        start = int(part["start"])
        rows = slice(start, start + len(part["valid"]))
        self.valid[rows] = part["valid"]
        self.bad += list(zip(part["bad_ids"].tolist(), part["bad_reasons"].tolist()))
        for layer in self.layers:
            x = part["f_" + layer]
            if layer not in self.datasets:
                dim = x.shape[1]
                size = np.dtype(self.dtype).itemsize
                chunk = max(1, min(self.n, (1 << 20) // (dim * size)))
                self.datasets[layer] = self.f.create_dataset(
                    f"features/{layer}", shape=(self.n, dim), dtype=self.dtype,
                    chunks=(chunk, dim)
                )
            self.datasets[layer][rows] = x
            if self.f.write_guard.error is not None:  # HDF5 may swallow it until the flush
                raise self.f.write_guard.error
            self.digests[layer].update(np.ascontiguousarray(x).tobytes())
            self._unsynced += x.nbytes
            crash_point("consolidate.layer_copied")
        crash_point("consolidate.part_copied")
        self.next = k + 1
        if self._unsynced >= SYNC_EVERY:  # write back as we go: the final fsync finds little
            self.f.flush()
            os.fsync(self.f.write_guard.raw.fileno())
            self._unsynced = 0

    def abort(self) -> None:
        """Close and delete the temporary file (the parts are untouched)."""
        try:
            self._stack.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def finish(self, attrs: dict) -> Path:
        """Copy the remaining parts, write the metadata, ``complete`` last, fsync, rename."""
        f, final = self.f, self.partial.final
        try:
            if self.next < self.n_parts:
                self.add(self.n_parts - 1)
            for layer, ds in self.datasets.items():
                ds.attrs["sha256"] = self.digests[layer].hexdigest()
            f.create_dataset("valid", data=self.valid)
            b = f.create_dataset(
                "bad", data=np.array(self.bad, dtype=object).reshape(-1, 2), dtype=_STR,
                maxshape=(None, 2),
            )
            b.attrs["columns"] = _json_attr(["id", "reason"])
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
            f.attrs["n_valid"] = int(self.valid.sum())
            f.attrs["rows_sha256"] = rows_digest(self.ids, self.labels, self.valid, self.classes)
            crash_point("consolidate.before_complete")
            f.attrs["complete"] = True  # last: a file without it is never read as a cache
            f.flush()
            if f.write_guard.error is not None:
                raise f.write_guard.error
            crash_point("consolidate.flushed")
            self._stack.close()  # closes the HDF5 file and fsyncs it
        except BaseException:
            self.abort()
            raise
        crash_point("consolidate.closed")
        crash_point("consolidate.before_rename")
        os.replace(self.tmp, final)
        crash_point("consolidate.renamed")
        _fsync_dir(final.parent)
        crash_point("consolidate.before_rmtree")
        shutil.rmtree(self.partial.dir, ignore_errors=True)
        return final


def _h5_errno(e: BaseException) -> int | None:
    """The errno inside an HDF5 error message ("... errno = 28, ..."), if there is one."""
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def _attr_value(value):
    """Plain HDF5 attributes: numbers and strings as they are, anything else as JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, str):
        return str(value)  # np.str_ has no HDF5 conversion
    return _json_attr(value)


def _create_once(path: Path, data: bytes) -> bool:
    """Write ``path`` atomically unless it exists (a hard link never replaces a file)."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: rename, last writer wins
        if not path.exists():
            os.replace(tmp, path)
            return True
        return False
    finally:
        tmp.unlink(missing_ok=True)


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


def write_arrays(
    path: str | os.PathLike,
    ids: list[str],
    labels: np.ndarray,
    classes: list,
    features: dict[str, np.ndarray],
    meta: dict | None = None,
    dtype: str = "float16",
    rows_per_part: int = 4096,
) -> FeatureCache:
    """Write features you already have (arrays or memmaps) as a featprobe cache.

    Goes through the same parts-then-consolidate path as ``extract``, so the result is
    indistinguishable from an extracted cache; used by benchmarks and tests, and handy for
    features computed elsewhere. ``meta`` supplies root attributes such as ``backbone``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    layers = list(features)
    partial = PartialCache(final)
    with partial.locked():
        n_parts = -(-n // rows_per_part)
        for k in range(n_parts):
            rows = slice(k * rows_per_part, min(n, (k + 1) * rows_per_part))
            arrays = {"f_" + layer: np.asarray(features[layer][rows], dtype=dtype)
                      for layer in layers}
            arrays.update(start=np.int64(rows.start), valid=np.ones(rows.stop - rows.start, bool),
                          bad_ids=np.array([], dtype=str), bad_reasons=np.array([], dtype=str))
            partial.write_part(k, arrays)
        attrs = {"format_version": FORMAT_VERSION, "backbone": "external", "weights": "external",
                 "layers": layers, "dtype": dtype, "preprocessing": {},
                 "dataset_fingerprint": "", **(meta or {})}
        partial.consolidate(layers, list(ids), np.asarray(labels), list(classes), attrs, dtype,
                            n_parts)
    return FeatureCache(final)


# root attributes every extracted cache has (docs/cache-format.md); written by `extract`
_EXTRACT_ATTRS = ("format_version", "complete", "backbone", "weights", "weights_id",
                  "weights_file", "weights_sha256", "layers", "preprocessing", "dtype",
                  "precision", "dataset_fingerprint", "source", "cache_key", "device",
                  "featprobe_version", "torch_version", "torchvision_version", "created_at",
                  "n_valid")


def _check_identity(meta: dict) -> list[str]:
    """An extracted cache's metadata must still hash to its ``cache_key`` (the content address
    its name comes from), and carry every documented attribute."""
    key = meta.get("cache_key")
    if not key:
        return []  # written by write_arrays: no content address to check
    problems = []
    missing = [k for k in _EXTRACT_ATTRS if k not in meta]
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
    problems += _check_identity(cache.meta)
    checked = {}
    recorded_rows = cache.meta.get("rows_sha256")
    if checksums and recorded_rows:  # caches made before it was recorded have none
        got = rows_digest(cache.ids, cache.labels, cache.valid, cache.classes)
        checked["rows"] = got == recorded_rows
        if not checked["rows"]:
            problems.append("ids/labels/valid/classes do not match their recorded SHA-256")
    with _read_errors(cache.path, "the features"), h5py.File(cache.path, "r") as f:
        for layer in cache.layers:
            ds = f["features"][layer]
            if ds.shape[0] != n:
                problems.append(f"features/{layer} has {ds.shape[0]} rows, ids {n}")
                continue
            recorded = _s(ds.attrs.get("sha256", ""))
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
