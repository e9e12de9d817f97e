"""Kill anywhere: SIGKILL `featprobe extract` at 20 named points, resume, compare.

Each run is `featprobe extract` (the CLI, in a child forked by ``python -m featprobe.faults``,
which imports torch once) with ``FEATPROBE_CRASH_AT=NAME:COUNT``: the process SIGKILLs itself
the COUNT-th time it reaches NAME. Runs are chained: the next run resumes the killed one and is
itself killed at the next point. After every kill nothing may read as complete unless it is
complete and identical to the uninterrupted cache; after each chain a clean run must leave a
cache equal, array for array, to the uninterrupted one (float32, CPU), and no debris.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import assert_same_cache, extract_argv, make_dataset, parts_on_disk

from featprobe.cache import FeatureCache, list_caches
from featprobe.errors import FeatprobeError

# (point:count, parts on disk right after the kill, or None where not checked)
CHAIN_A = [
    ("lock.acquired:1", 0),  # lock taken, nothing written
    ("part.tmp_written:1", 0),  # part 0 complete under its temporary name, not renamed
    ("part.renamed:1", 1),  # part 0 renamed
    ("stream.batch_ready:1", 1),  # batch 1 computed, not yet queued for the writer
    ("part.tmp_written:3", 3),  # parts 1, 2 renamed, part 3 written under its temp name
    ("part.renamed:3", 6),  # parts 3..5 renamed
    ("part.renamed:2", 8),  # parts 6, 7 renamed: all written, nothing consolidated yet
    ("consolidate.begin:1", 8),  # stale temp files removed, .h5.tmp not yet created
    ("consolidate.layer_copied:1", 8),  # first layer of the first part in .h5.tmp
    ("consolidate.part_copied:4", 8),  # half the parts copied
    ("consolidate.layer_copied:16", 8),  # every feature block copied, no checksums yet
    ("consolidate.part_copied:8", 8),  # features done; /valid, /bad, attrs not yet
    ("consolidate.before_complete:1", 8),  # everything but the complete flag
    ("consolidate.flushed:1", 8),  # complete=True flushed, file still open, temp name
    ("consolidate.closed:1", 8),  # closed, not fsynced
    ("consolidate.before_rename:1", 8),  # fsynced, not renamed
    ("consolidate.renamed:1", None),  # renamed to <name>.h5: complete from here on
]
CHAIN_B = [
    ("consolidate.before_rmtree:1", None),  # renamed and dir fsynced; parts not yet removed
    ("request.tmp_written:1", None),  # rerun: request-index entry written, not renamed
]
CHAIN_C = [
    ("extract.remember:1", None),  # everything done except the request index
]
CHAINS = {"a": CHAIN_A, "b": CHAIN_B, "c": CHAIN_C}


def check_after_kill(cache_dir: Path, final: Path, ref: Path) -> bool:
    """Nothing reads as complete unless it is; return whether the cache is complete."""
    h5 = sorted(cache_dir.glob("*.h5"))
    assert h5 in ([], [final]), h5  # temp files never carry the final name
    entries = list_caches(cache_dir)
    assert [e["path"] for e in entries] == [str(final)], entries
    for req in (cache_dir / ".requests").glob("[!.]*"):  # the index never points at a non-cache
        assert (cache_dir / req.read_text().strip()) == final and final.exists()
    if not h5:
        assert entries[0]["complete"] is False
        with pytest.raises(FeatprobeError, match="incomplete"):
            FeatureCache(final)
        return False
    assert entries[0]["complete"] is True
    assert_same_cache(final, ref)
    return True


def test_crash_point_kills_on_the_counted_visit():
    code = ("from featprobe.faults import crash_point\n"
            "for i in range(5):\n    print(i, flush=True)\n    crash_point('x')\n")
    env = {"FEATPROBE_CRASH_AT": "x:3", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == -9 and p.stdout.split() == ["0", "1", "2"]
    env["FEATPROBE_CRASH_AT"] = "y:1"  # another point: never fires
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.split() == ["0", "1", "2", "3", "4"]


def test_sigkill_at_20_points_resumes_to_identical_caches(tmp_path, fork_server):
    csv = make_dataset(tmp_path / "data")
    server, first_run = fork_server, fork_server.n
    status, log = server.run(extract_argv(csv, tmp_path / "ref"))
    assert status == 0, log
    ref = Path(log.strip().splitlines()[-1])
    passed, resumed_counts = [], []
    for chain, points in CHAINS.items():
        cache_dir = tmp_path / chain
        final = cache_dir / ref.name
        expect_prev = 0
        for spec, expect_parts in points:
            status, log = server.run(extract_argv(csv, cache_dir), crash_at=spec)
            assert status == -9, f"{spec}: not killed (status {status}): {log}"
            m = re.search(r"resuming \S+: (\d+)/8 batches already done", log)
            if m:  # a resumed run starts from every part written before the last kill
                assert int(m.group(1)) == expect_prev, (spec, log)
                resumed_counts.append(int(m.group(1)))
            complete = check_after_kill(cache_dir, final, ref)
            if expect_parts is not None:
                assert not complete, spec
                assert parts_on_disk(final) == expect_parts, spec
                expect_prev = expect_parts
            passed.append(spec)
        status, log = server.run(extract_argv(csv, cache_dir))  # the clean finish
        assert status == 0, log
        assert log.strip().splitlines()[-1] == str(final)
        assert_same_cache(final, ref)
        leftovers = [p.name for p in cache_dir.iterdir()
                     if p.name.endswith(".partial") or ".tmp-" in p.name]
        assert leftovers == [], leftovers
    assert len(passed) == len(set(passed)) == 20
    print(f"\nkill-anywhere: {len(passed)}/20 kill points resumed to identical caches; "
          f"{len(resumed_counts)} resumed runs reused {sum(resumed_counts)} parts; "
          f"{server.n - first_run} featprobe extract runs")
