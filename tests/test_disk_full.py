"""Full disk and read-only places: one `error:` line, exit 2, nothing marked complete, and a
later run with room succeeds by resuming.

A full disk is simulated with ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so a write past the limit
fails with EFBIG, as a write to a full disk fails with ENOSPC); read-only places with
``chmod``. Root ignores file modes, so when the suite runs as root the `featprobe` child drops
to uid 65534 (nobody) first. Every run is the real CLI in a child of ``python -m
featprobe.faults`` (see tests/test_kill_anywhere.py).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from reliability import assert_same_cache, extract_argv, make_dataset, parts_on_disk

from featprobe.cache import FeatureCache, list_caches
from featprobe.errors import FeatprobeError

NOBODY = 65534
AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def env(fork_server):
    """A world-readable work folder (so an unprivileged child can use it), a dataset and a
    reference cache."""
    root = Path(tempfile.mkdtemp(prefix="featprobe-diskfull-"))
    os.chmod(root, 0o755)
    csv = make_dataset(root / "data")
    for p in [root / "data", *root.joinpath("data").rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0))
    server = fork_server
    status, log = server.run(extract_argv(csv, root / "ref"))
    assert status == 0, log
    ref = Path(log.strip().splitlines()[-1])
    yield {"root": root, "csv": csv, "server": server, "ref": ref}
    shutil.rmtree(root, ignore_errors=True)


def one_error_line(log: str, *expect: str) -> str:
    """Progress notes may come first; the error is one line, the last, and nothing else."""
    assert "Traceback" not in log, log
    lines = [x for x in log.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(x.startswith(("error: ", "resuming ")) for x in lines), lines
    for text in expect:
        assert text in errors[0], errors[0]
    return errors[0]


def assert_not_complete(cache_dir: Path, final: Path) -> None:
    assert not final.exists() and not list(cache_dir.glob("*.h5"))
    assert not list(cache_dir.glob("*.tmp-*"))  # a failed consolidation leaves no temp file
    assert all(not e["complete"] for e in list_caches(cache_dir))
    with pytest.raises(FeatprobeError, match="incomplete"):
        FeatureCache(final)


def test_file_size_limit_parts_then_consolidation_then_room(env):
    server, csv, ref = env["server"], env["csv"], env["ref"]
    cache_dir = env["root"] / "fsize"
    final = cache_dir / ref.name
    argv = extract_argv(csv, cache_dir)

    # 8 KiB per file: the manifest fits, the first 12 KiB part does not
    status, log = server.run(argv, fsize=8 << 10)
    assert status == 2, log
    one_error_line(log, "could not write to", "File too large", "finished batches are kept")
    assert_not_complete(cache_dir, final)
    assert parts_on_disk(final) == 0

    # 64 KiB: every part fits, the 115 KiB .h5 does not
    status, log = server.run(argv, fsize=64 << 10)
    assert status == 2, log
    one_error_line(log, f"could not write {final}", "File too large", "parts are kept")
    assert_not_complete(cache_dir, final)
    assert parts_on_disk(final) == 8

    status, log = server.run(argv)  # room again: resumes from all 8 parts, computes nothing
    assert status == 0, log
    assert "8/8 batches already done" in log
    assert_same_cache(final, ref)


def _writable(path: Path, yes: bool) -> None:
    if AS_ROOT:
        os.chown(path, NOBODY, NOBODY)
    path.chmod(0o755 if yes else 0o555)


@pytest.mark.skipif(AS_ROOT and not hasattr(os, "setuid"), reason="cannot drop root")
def test_read_only_cache_dir_partial_dir_and_runs_log(env):
    server, csv, ref = env["server"], env["csv"], env["ref"]
    user = {"uid": NOBODY} if AS_ROOT else {}
    cache_dir = env["root"] / "ro"
    cache_dir.mkdir()
    final = cache_dir / ref.name
    argv = extract_argv(csv, cache_dir)

    _writable(cache_dir, False)  # 1. a read-only cache directory: nothing can start
    status, log = server.run(argv, **user)
    assert status == 2, log
    one_error_line(log, "Permission denied", str(cache_dir))
    assert list(cache_dir.iterdir()) == []

    _writable(cache_dir, True)  # 2. writable: killed after 3 parts; then the parts go read-only
    status, log = server.run(argv, crash_at="part.renamed:3", **user)
    assert status == -9, log
    _writable(final.with_suffix(".partial"), False)
    status, log = server.run(argv, **user)
    assert status == 2, log
    one_error_line(log, "Permission denied")
    assert_not_complete(cache_dir, final)
    assert parts_on_disk(final) == 3

    _writable(final.with_suffix(".partial"), True)  # 3. writable again: resumes, identical
    status, log = server.run(argv, **user)
    assert status == 0, log
    assert "3/8 batches already done" in log
    assert_same_cache(final, ref)

    _writable(cache_dir, False)  # 4. a finished cache in a read-only (shared) directory
    status, log = server.run(argv, **user)
    assert status == 0 and log.strip().splitlines()[-1] == str(final), log
    fit = ["fit", str(final), "--head", "logreg", "--layer", "avgpool"]
    status, log = server.run(fit, **user)  # runs.jsonl cannot be appended there
    assert status == 2, log
    one_error_line(log, "Permission denied", "runs.jsonl")
    runs = env["root"] / "runs"
    runs.mkdir()
    _writable(runs, True)
    status, log = server.run([*fit, "--runs-dir", str(runs)], **user)
    assert status == 0, log
    assert len((runs / "runs.jsonl").read_text().splitlines()) == 1
    _writable(cache_dir, True)
