"""Writing a cache so that a killed run never leaves a file that reads as complete but is not.

1. Features stream into ``<name>.partial/``: one ``part-NNNNNN.npz`` per batch, each written to a
   temporary name, fsynced and atomically renamed. A killed run leaves only whole parts.
2. When every part exists they are consolidated into ``<name>.h5.tmp-<pid>``, with
   ``complete=True`` written last; the file is fsynced and renamed to ``<name>.h5``.
3. Only then is the partial folder removed.

So ``<name>.h5`` exists only when complete; rerunning the same extract resumes from the parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from featprobe.cache.format import (
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    STR,
    attr_value,
    fsync_dir,
    json_attr,
    rows_digest,
)
from featprobe.cache.reader import FeatureCache
from featprobe.errors import FeatprobeError
from featprobe.faults import crash_point


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
        under ``lock-shard-i-of-n``, so shards run side by side but never twice at once. The
        lock files sit beside the cache (``<name>.h5.lock...``), not in the parts folder, which
        the writer that finishes removes while others may be waiting.
        """
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

    def save_dataset(self, ids: list[str], labels: np.ndarray, classes: list,
                     attrs: dict) -> None:
        """What consolidation needs besides the parts, so ``featprobe merge`` needs nothing else.

        Written once (by whichever shard gets there first); later writers keep the first.
        """
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
                "bad", data=np.array(self.bad, dtype=object).reshape(-1, 2), dtype=STR,
                maxshape=(None, 2),
            )
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



def write_arrays(path: str | os.PathLike, ids: list[str], labels: np.ndarray, classes: list,
                 features: dict[str, np.ndarray], meta: dict | None = None, dtype: str = "float16",
                 rows_per_part: int = 4096) -> FeatureCache:
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


