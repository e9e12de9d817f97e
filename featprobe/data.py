"""Labelled image datasets: a CSV of ``image_names,<label>`` plus a folder, or a folder tree.
Checked before any model is built, so a typo or a missing file costs a second, not an hour of GPU
time. An image's ``id`` is its path relative to the image folder."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featprobe.errors import FeatprobeError, some

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
_IMAGE_COLUMN_GUESSES = ("image_names", "image_name", "image", "filename", "file", "path", "id")


@dataclass(frozen=True)
class Dataset:
    """Image ids (paths relative to ``root``), integer labels and the class list; ``labels`` is
    ``None`` (and ``classes`` empty) for unlabelled image sets (``predict``)."""

    root: Path
    ids: list[str]
    labels: np.ndarray | None
    classes: list = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, i: int) -> Path:
        return self.root / self.ids[i]

    def fingerprint(self) -> str:
        """SHA-256 of ids, labels, classes and each file's size and mtime: these stand in for the
        bytes (as for make and rsync), which would cost a second read of every image."""
        h = hashlib.sha256()
        h.update(json.dumps(self.classes, sort_keys=True).encode())
        labels = self.labels if self.labels is not None else np.full(len(self.ids), -1)
        for i, (image_id, label) in enumerate(zip(self.ids, labels)):
            st = os.stat(self.path(i))
            h.update(f"{image_id}\0{int(label)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _encode_labels(raw: list[str]) -> tuple[np.ndarray, list]:
    """Map raw labels to class indices; classes sorted, as ints when every label is an int."""
    values: list = raw
    try:
        as_int = [int(v) for v in raw]
        if all(v == str(i) for v, i in zip(raw, as_int)):
            values = as_int
    except ValueError:
        pass
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in values], dtype=np.int64), classes


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict], list[int]]:
    """Header, non-blank rows, and each row's line number in the file (for error messages)."""
    rows, lines, extra = [], [], []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for r in reader:
                more = r.pop(None, None) or []
                if not any((v or "").strip() for v in [*r.values(), *more]):
                    continue
                if any((v or "").strip() for v in more):
                    extra.append(reader.line_num)
                rows.append(r)
                lines.append(reader.line_num)
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise FeatprobeError(f"CSV file not found: {csv_path}") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise FeatprobeError(f"cannot read CSV {csv_path}: {e}") from None
    if not header:
        raise FeatprobeError(f"CSV {csv_path} is empty (no header row)")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise FeatprobeError(f"CSV {csv_path} has duplicate column names: {some(dupes)}")
    if extra:
        raise FeatprobeError(f"CSV {csv_path}: more fields than the {len(header)} columns on "
                             f"line(s) {some(extra)} (quote file names that contain commas)")
    return header, rows, lines


def _pick_columns(header: list[str], csv_path: Path, image_col: str | None,
                  label_col: str | None, labelled: bool) -> tuple[str, str | None]:
    for name, option in ((image_col, "--image-col"), (label_col, "--label-col")):
        if name is not None and name not in header:
            raise FeatprobeError(f"CSV {csv_path} has no column {name!r} ({option}); "
                                 f"columns are {header}")
    if image_col is None:
        guesses = [c for c in header if c.strip().lower() in _IMAGE_COLUMN_GUESSES]
        if guesses:
            image_col = guesses[0]
        elif len(header) == 2 or (len(header) == 1 and not labelled):
            image_col = header[0]
        else:
            raise FeatprobeError(f"CSV {csv_path} has columns {header}: say which holds image "
                                 "names with --image-col")
    if not labelled:
        return image_col, label_col
    if label_col is None:
        others = [c for c in header if c != image_col]
        if len(others) != 1:
            raise FeatprobeError(f"CSV {csv_path} has columns {header}: say which holds the "
                                 "labels with --label-col")
        label_col = others[0]
    return image_col, label_col


def read_csv_dataset(csv_path: str | Path, images: str | Path | None = None,
                     image_col: str | None = None, label_col: str | None = None,
                     labelled: bool = True, allow_outside: bool = False) -> Dataset:
    """Read the tutorial format: a CSV with an image-name column and a label column (auto-detected
    when there are two), images in ``images`` (default: ``images/`` beside the CSV). With
    ``labelled=False`` the label column is optional."""
    csv_path = Path(csv_path)
    root = Path(images) if images is not None else csv_path.parent / "images"
    header, rows, line_nos = _read_csv(csv_path)
    image_col, label_col = _pick_columns(header, csv_path, image_col, label_col, labelled)
    if not rows:
        raise FeatprobeError(f"CSV {csv_path} has a header but no rows: nothing to do")
    def column(name: str, what: str) -> list[str]:
        values = [(r.get(name) or "").strip() for r in rows]
        blank = [n for n, v in zip(line_nos, values) if not v]
        if blank:
            raise FeatprobeError(f"CSV {csv_path}: empty {what} on line(s) {some(blank)}")
        return values

    ids = column(image_col, "image name")
    labels = classes = None
    if label_col is not None:
        labels, classes = _encode_labels(column(label_col, "label"))
    if not root.is_dir():
        raise FeatprobeError(f"image folder not found: {root} (pass --images DIR)")
    return _checked(Dataset(root, ids, labels, classes or [], source=str(csv_path)), allow_outside)


def _image_files(folder: Path, relative_to: Path) -> list[str]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), as paths
    relative to ``relative_to``, in sorted walk order."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: walked already
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.relpath(os.path.join(dirpath, fn), relative_to) for fn in sorted(filenames)
                if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith(".")]
    return out


def read_folder_dataset(root: str | Path) -> Dataset:
    """Read a class-per-folder tree ``root/<class>/<image>`` (as torchvision's ImageFolder)."""
    root = Path(root)
    if not root.is_dir():
        raise FeatprobeError(f"not a folder: {root}")
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ids, raw = [], []
    for name in class_dirs:
        found = _image_files(root / name, relative_to=root)
        ids += found
        raw += [name] * len(found)
    if not ids:
        raise FeatprobeError(f"no images found under {root}: expected {root}/<class>/<image> "
                             f"with extensions {', '.join(IMAGE_EXTENSIONS)}")
    labels, classes = _encode_labels(raw)
    return _checked(Dataset(root, ids, labels, classes, source=str(root)))


def read_image_list(paths: list[str | Path] | str | Path) -> Dataset:
    """Unlabelled images: a folder (searched recursively) or an explicit list of files."""
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        root = Path(paths)
        ids = sorted(_image_files(root, relative_to=root))
        if not ids:
            raise FeatprobeError(f"no images found under {root}")
    else:
        files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not files:
            raise FeatprobeError("no images given")
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
        ids = [os.path.relpath(p.resolve(), root) for p in files]
    return _checked(Dataset(root, ids, None, [], source=str(paths)))


def require_two_classes(ds: Dataset) -> None:
    """Training data (extract, baseline) must hold two classes: refused before any work."""
    if ds.labels is not None and len(set(ds.labels.tolist())) < 2:
        raise FeatprobeError(f"every image of {ds.source} is class {ds.classes[ds.labels[0]]!r}: "
                             "heads need at least two classes to tell apart")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name the filesystem cannot take (too long, ...)
        return False


def _checked(ds: Dataset, allow_outside: bool = False) -> Dataset:
    """``ds``, once free of duplicate ids, missing files, files reached twice, names leaving
    its folder (unless ``allow_outside``) and emptiness (else one line naming offenders)."""
    if not ds.ids:
        raise FeatprobeError(f"dataset {ds.source} is empty")
    dupes = sorted(k for k, n in Counter(ds.ids).items() if n > 1)
    if dupes:
        raise FeatprobeError(f"{ds.source}: duplicate image names: {some(dupes)}")
    missing = [image_id for i, image_id in enumerate(ds.ids) if not _is_file(ds.path(i))]
    if missing:
        raise FeatprobeError(f"{len(missing)} of {len(ds.ids)} images not found in {ds.root}: "
                             f"{some(missing)}")
    root, first = Path(os.path.normpath(ds.root)), {}
    for i in range(len(ds)):
        real = ds.path(i).resolve()  # the file itself: one file, one row
        if not allow_outside and not Path(os.path.normpath(ds.path(i))).is_relative_to(root):
            raise FeatprobeError(f"{ds.source}: {some([ds.ids[i]], 1)} leaves the image folder "
                                 f"{ds.root}; pass --allow-outside-images if that is meant")
        if real in first:
            raise FeatprobeError(f"{ds.source}: {some([ds.ids[first[real]]], 1)} and "
                                 f"{some([ds.ids[i]], 1)} are the same file ({some([real], 1)})")
        first[real] = i
    return ds


def load_dataset(data: str | Path, images: str | Path | None = None, image_col: str | None = None,
                 label_col: str | None = None, labelled: bool = True,
                 allow_outside: bool = False) -> Dataset:
    """A CSV file (tutorial format) or a class-per-folder tree, decided by what ``data`` is."""
    p = Path(data)
    if p.is_dir():
        if images is not None or image_col is not None or label_col is not None:
            raise FeatprobeError("--images/--image-col/--label-col apply to a CSV; "
                                 f"{p} is a class-per-folder tree")
        return read_folder_dataset(p) if labelled else read_image_list(p)
    if not p.exists():
        raise FeatprobeError(f"no such file or folder: {p}")
    return read_csv_dataset(p, images, image_col, label_col, labelled, allow_outside)


def image_digest(path: str | os.PathLike) -> str:
    """A short digest of an image's resolved path: how a saved head remembers its training
    images without carrying their names (``predict`` warns when it is asked to score them)."""
    return hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=8).hexdigest()
