"""Kill anywhere: SIGKILL `featprobe extract` at 20 named points, resume, compare.

Each run is `featprobe extract` (the CLI, in a child forked by ``python -m featprobe.faults``,
which imports torch once) with ``FEATPROBE_CRASH_AT=NAME:COUNT``: the process SIGKILLs itself
the COUNT-th time it reaches NAME. Runs are chained: the next run resumes the killed one and is
itself killed at the next point. After every kill nothing may read as complete unless it is
complete and identical to the uninterrupted cache; after each chain a clean run must leave a
cache equal, array for array, to the uninterrupted one (float32, CPU), and no debris.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featprobe.cache import FeatureCache, list_caches, verify
from featprobe.errors import FeatprobeError

N_IMAGES, BATCH = 24, 3  # 8 parts
LAYERS = ("avgpool", "layer4")  # 2 layers: consolidation copies 16 (part, layer) blocks

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


class ForkServer:
    """``python -m featprobe.faults``: one torch import, one forked `featprobe` per job."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, "-m", "featprobe.faults"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], crash_at: str | None = None, timeout: float = 180,
            **options) -> tuple:
        """Run ``featprobe <argv>``; ``options``: fsize, uid (see featprobe.faults)."""
        self.n += 1
        log = self.logs / f"run{self.n:02d}.log"
        job = {"argv": argv, "crash_at": crash_at, "log": str(log), **options}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            pytest.fail(f"featprobe extract hung (crash_at={crash_at}); log {log}")
        answer = json.loads(self.proc.stdout.readline())
        return answer["status"], log.read_text() if log.exists() else ""

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def make_dataset(root: Path, n: int = N_IMAGES) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(7)
    lines = ["image_names,label"]
    for i in range(n):
        a = (rng.random((20 + i % 5, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / "images" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{('cat', 'dog', 'emu')[i % 3]}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def extract_argv(csv: Path, cache_dir: Path) -> list[str]:
    return ["extract", str(csv), "--backbone", "resnet18", "--weights", "none", "--layers",
            ",".join(LAYERS), "--image-size", "32", "--batch-size", str(BATCH), "--workers", "0",
            "--dtype", "float32", "--device", "cpu", "--cache-dir", str(cache_dir), "-q"]


def assert_same_cache(path: Path, ref: Path) -> None:
    a, b = FeatureCache(path), FeatureCache(ref)
    assert a.ids == b.ids and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.valid, b.valid)
    for layer in LAYERS:
        x, y = a.features(layer), b.features(layer)
        assert x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(x, y)
    with h5py.File(path, "r") as fa, h5py.File(ref, "r") as fb:
        for layer in LAYERS:
            assert fa["features"][layer].attrs["sha256"] == fb["features"][layer].attrs["sha256"]
    assert verify(path)["checksums"] == {layer: True for layer in LAYERS}


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


def parts_on_disk(final: Path) -> int:
    return len(list(final.with_suffix(".partial").glob("part-*.npz")))


def test_crash_point_kills_on_the_counted_visit():
    code = ("from featprobe.faults import crash_point\n"
            "for i in range(5):\n    print(i, flush=True)\n    crash_point('x')\n")
    env = {"FEATPROBE_CRASH_AT": "x:3", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == -9 and p.stdout.split() == ["0", "1", "2"]
    env["FEATPROBE_CRASH_AT"] = "y:1"  # another point: never fires
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.split() == ["0", "1", "2", "3", "4"]


def test_sigkill_at_20_points_resumes_to_identical_caches(tmp_path):
    csv = make_dataset(tmp_path / "data")
    (tmp_path / "logs").mkdir()
    server = ForkServer(tmp_path / "logs")
    try:
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
              f"{server.n} featprobe extract runs")
    finally:
        server.close()
