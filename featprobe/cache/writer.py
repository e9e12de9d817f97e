"""Writing a cache so that a killed run never leaves a file that reads as complete but is not.
Features stream into ``<name>.partial/`` as whole parts (written to a temporary name, fsynced,
renamed); once all exist they are consolidated into ``<name>.h5.tmp-<pid>``, ``complete=True`` last,
fsynced and renamed to ``<name>.h5``, and only then is the partial folder removed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from featprobe.cache.format import (
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    STR,
    attr_value,
    json_attr,
    rows_digest,
)
from featprobe.cache.reader import FeatureCache
from featprobe.errors import FeatprobeError, some
from featprobe.faults import crash_point
from featprobe.files import atomic_write, fsync_dir


class _WriteGuard:
    """A file for h5py's ``fileobj`` driver that fails once, then discards. After a failed write
    (full disk, file-size limit) HDF5 cannot close the file, and raising into its C callbacks
    surfaces stale errors later: so the first failure is kept in ``error`` for the caller to raise,
    and later writes are dropped so h5py closes cleanly."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def _guard(self, op, *args, done=None):
        if self.error is None:
            try:
                return op(*args)
            except OSError as e:
                self.error = e  # the caller raises it (checked after each copy and at the flush)
        return done

    def write(self, b) -> int:
        return self._guard(self.raw.write, b, done=memoryview(b).nbytes)

    def truncate(self, size=None):
        return self._guard(self.raw.truncate, size, done=size)

    def flush(self) -> None:
        self._guard(self.raw.flush)

    def __getattr__(self, name: str):  # seek, tell, read, readinto: the file's own
        return getattr(self.raw, name)


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


class PartialCache:
    """The in-progress side of a cache: a folder of whole parts, locked by one writer.
    ``manifest.json`` fixes the rows per part, so a resumed run keeps the part boundaries even if
    ``--batch-size`` changed."""

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.with_suffix(PARTIAL_SUFFIX)
        self._stamp: tuple[str, int, int] | None = None

    def stamp(self) -> tuple[str, int, int]:
        """``(key, rows per part, rows)`` from the manifest; ``key`` (SHA-256 of the extraction's
        config) is written into every part, so parts of another extraction are told apart."""
        if self._stamp is None:
            m = json.loads((self.dir / "manifest.json").read_text())
            key = hashlib.sha256(json.dumps(m["config"], sort_keys=True).encode()).hexdigest()
            self._stamp = (key, int(m["part_rows"]), int(m["n_rows"]))
        return self._stamp

    @contextmanager
    def locked(self, on_wait=None, name: str = "lock"):
        """Hold a writer lock (``lock``, or ``lock-shard-i-of-n`` for one shard's parts); a second
        writer waits here. Lock files sit beside the cache, not in the parts folder the finishing
        writer removes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.final.with_name(f"{self.final.name}.{name}"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            lock.acquire()
        try:
            crash_point("lock.acquired")
            yield self
        finally:
            lock.release()

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

    def save_dataset(self, ids: list[str], labels: np.ndarray, classes: list, attrs: dict) -> None:
        """What consolidation needs besides the parts, so ``featprobe merge`` needs nothing else.
        Written once, by whichever shard gets there first."""
        path = self.dir / "dataset.npz"
        if not path.exists():
            buf = io.BytesIO()
            np.savez(buf, ids=np.array(ids, dtype=str), labels=np.asarray(labels, np.int64),
                     classes=np.array(json_attr(classes)))
            _create_once(path, buf.getvalue())
        _create_once(self.dir / "attrs.json", json_attr(attrs).encode())

    def load_dataset(self) -> tuple[list[str], np.ndarray, list, dict]:
        with np.load(self.dir / "dataset.npz", allow_pickle=False) as z:
            ids, labels, classes = z["ids"].tolist(), z["labels"], json.loads(str(z["classes"]))
        attrs = json.loads((self.dir / "attrs.json").read_text())
        return ids, labels, classes, attrs

    def n_parts(self) -> int:
        """How many parts the manifest (which must exist) divides the rows into."""
        _, part_rows, n_rows = self.stamp()
        return -(-n_rows // part_rows)

    def missing_parts(self, n_parts: int) -> list[int]:
        done = self.done_parts()
        return [k for k in range(n_parts) if k not in done]

    def finish(self, builder: H5Builder | None = None) -> Path:
        """Consolidate a partial folder whose parts are all written (caller holds ``lock``);
        ``builder`` is the one that already copied the parts this run wrote, if any."""
        n_parts = self.n_parts()
        missing = self.missing_parts(n_parts)
        if missing:
            raise FeatprobeError(f"{self.final.name}: {len(missing)} of {n_parts} parts are not "
                                 f"written yet (parts {some(missing, 8)}); let every shard finish (or rerun "
                                 "the ones that failed), then merge")
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
                f"parts are kept in {self.dir}: free space and rerun the same command") from None

    def part_path(self, k: int) -> Path:
        return self.dir / f"part-{k:06d}.npz"

    def done_parts(self) -> set[int]:
        out = set()
        for p in self.dir.glob("part-*.npz"):
            with suppress(ValueError):
                out.add(int(p.stem.split("-")[1]))
        return out

    def write_part(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        with atomic_write(self.part_path(k), crash="part.tmp_written") as f:
            np.savez(f, **arrays, extraction=np.array(self.stamp()[0]))
        crash_point("part.renamed")

    def read_part(self, k: int) -> dict[str, np.ndarray]:
        """Part ``k``, refused unless it is this extraction's part ``k`` (its key and rows)."""
        key, part_rows, n = self.stamp()
        start, rows = k * part_rows, min(part_rows, n - k * part_rows)
        try:
            with np.load(self.part_path(k), allow_pickle=False) as z:
                part = {name: z[name] for name in z.files}
            ok = (str(part.get("extraction", "")) == key and int(part["start"]) == start
                  and all(len(part[name]) == rows for name in part
                          if name.startswith("f_") or name == "valid"))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            ok = False
        if not ok:
            raise FeatprobeError(f"{self.part_path(k)} is not part {k} (rows {start}-"
                                 f"{start + rows - 1}) of this extraction: damaged or copied from "
                                 "another; remove it and rerun the extract to recompute it")
        return part

    def builder(self) -> H5Builder:
        """An :class:`H5Builder` for this folder's manifest and dataset (caller holds ``lock``)."""
        m = json.loads((self.dir / "manifest.json").read_text())
        ids, labels, classes, _ = self.load_dataset()
        return H5Builder(self, m["config"]["layers"], ids, labels, classes,
                         m["config"]["dtype"], self.n_parts())


SYNC_EVERY = 256 << 20  # H5Builder fsyncs the file it builds every 256 MiB of features


class H5Builder:
    """Writes ``<name>.h5.tmp-<pid>`` part by part, in row order; :meth:`finish` completes it.
    ``extract`` feeds it parts as they are written, so the HDF5 copy overlaps the forward pass;
    parts of an earlier run are read back from disk. Until the final rename the parts stay the
    source of truth."""

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
        self.f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=STR)
        lab = self.f.create_dataset("labels", data=np.asarray(labels).astype(np.int64))
        lab.attrs["classes"] = json_attr(classes)

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
                chunk = max(1, min(self.n, (1 << 20) // (dim * np.dtype(self.dtype).itemsize)))
                self.datasets[layer] = self.f.create_dataset(  # checksummed per chunk: every
                    f"features/{layer}", shape=(self.n, dim), dtype=self.dtype,  # read checks
                    chunks=(chunk, dim), fletcher32=True)
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
        with suppress(Exception):
            self._stack.close()
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
            b = f.create_dataset("bad", data=np.array(self.bad, dtype=object).reshape(-1, 2),
                                 dtype=STR, maxshape=(None, 2))
            b.attrs["columns"] = json_attr(["id", "reason"])
            for key, value in attrs.items():
                f.attrs[key] = attr_value(value)
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
        fsync_dir(final.parent)
        crash_point("consolidate.before_rmtree")
        shutil.rmtree(self.partial.dir, ignore_errors=True)
        return final


def _h5_errno(e: BaseException) -> int | None:
    """The errno inside an HDF5 error message ("... errno = 28, ..."), if there is one."""
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def _create_once(path: Path, data: bytes) -> None:
    """Write ``path`` atomically unless it exists (a hard link never replaces a file)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: rename, last writer wins
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_arrays(path: str | os.PathLike, ids: list[str], labels: np.ndarray, classes: list,
                 features: dict[str, np.ndarray], meta: dict | None = None, dtype: str = "float16",
                 rows_per_part: int = 4096) -> FeatureCache:
    """Write features you already have (arrays or memmaps) as a featprobe cache, through the same
    parts-then-consolidate path as ``extract``; ``meta`` supplies root attributes such as
    ``backbone``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    n, layers, partial = len(ids), list(features), PartialCache(final)
    with partial.locked():
        partial.manifest({"write_arrays": layers, "dtype": dtype}, rows_per_part, n)
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
        H5Builder(partial, layers, ids, labels, classes, dtype, n_parts).finish(attrs)
    return FeatureCache(final)


