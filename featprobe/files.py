"""The one way featprobe replaces a file: write a temporary file beside it, flush and fsync it,
rename it over the target, fsync the folder. Readers and crashes see the old file or the new
one, never half of one; a failed write leaves no temporary file behind."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from featprobe.errors import FeatprobeError
from featprobe.faults import crash_point


def output_path(path: str | os.PathLike) -> Path:
    """``path`` with its folder created: output files (``--save``, ``--out``, ``--plot``) are
    checked this way before the work that fills them, so a bad path costs no work."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FeatprobeError(f"cannot create the folder for {path}: {e.strerror or e}") from None
    if path.is_dir():
        raise FeatprobeError(f"{path} is a folder; give a file name")
    return path


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (where the filesystem lets a folder be fsynced)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, newline: str | None = None,
                 crash: str | None = None) -> Iterator[IO]:
    """Open a temporary file for ``path``; when the block ends without error, it replaces
    ``path``. ``crash`` names the fault point visited between the write and the rename."""
    path = output_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if crash:
            crash_point(crash)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
