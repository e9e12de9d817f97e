"""Sharded extraction: torchrun ranks (gloo, 2 processes) and --shard i/n + merge.

The property under test: however the rows are split, the final cache is the one a single
process writes — same ids in the same order, same labels, same float32 arrays.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featprobe.cache import FeatureCache, list_caches, merge
from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.extraction import extract
from featprobe.extraction.sharding import Shard, parse_shard, resolve
from tests.conftest import make_images

# 42 rows in parts of 4: 11 parts, the last one short, so shards are uneven on purpose
N, BATCH = 42, 4
ARGS = dict(backbone="resnet18", weights="none", image_size=32, dtype="float32", device="cpu",
            batch_size=BATCH, workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shard-data")
    rows = make_images(root / "images", N, ext="jpg", size=40)
    lines = ["image_names,label"] + [f"{name},{'yes' if y else 'no'}" for name, y in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> FeatureCache:
    return extract(data, cache_dir=tmp_path_factory.mktemp("single"), **ARGS)


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    assert a.path.name == b.path.name  # same content-addressed key
    assert a.ids == b.ids and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.valid, b.valid)
    for layer in a.layers:
        x, y = a.features(layer), b.features(layer)
        assert x.dtype == np.float32 and x.shape == (N, 512)
        np.testing.assert_array_equal(x, y)
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        for layer in a.layers:
            assert fa["features"][layer].attrs["sha256"] == fb["features"][layer].attrs["sha256"]


def test_parts_are_split_without_gaps_or_overlap():
    for n_parts in (1, 7, 11, 64):
        for count in (1, 2, 3, 8):
            got = sorted(k for i in range(count) for k in Shard(i, count).parts(n_parts))
            assert got == list(range(n_parts))


def test_parse_shard_and_errors(monkeypatch):
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard((0, 1)) == Shard(0, 1)
    for bad in ("5/5", "1/0", "a/b", "1", "-1/2"):
        with pytest.raises(FeatprobeError, match="shard"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve(None) == Shard(1, 2, torchrun=True, local_rank=0, local_count=2)
    with pytest.raises(FeatprobeError, match="under torchrun"):
        resolve("0/2")


def test_shards_then_last_one_merges(data, reference, tmp_path):
    out = [extract(data, cache_dir=tmp_path, shard=f"{i}/3", **ARGS) for i in range(3)]
    assert out[0] is None and out[1] is None  # their siblings were not done yet
    assert_same_cache(reference, out[2])
    assert not list(tmp_path.glob("*.partial"))


def test_merge_refuses_until_every_shard_is_done(data, reference, tmp_path):
    runner = CliRunner()
    assert extract(data, cache_dir=tmp_path, shard="1/2", **ARGS) is None
    final = tmp_path / reference.path.name
    [row] = list_caches(tmp_path)
    assert not row["complete"] and "6/11 parts" not in row["error"]  # shard 1 wrote 5 of 11
    assert "5/11 parts" in row["error"]
    r = runner.invoke(main, ["merge", str(final)])
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    assert "6 of 11 parts are not written yet (parts 0, 2, 4, 6, 8, 10)" in r.output
    assert not final.exists()
    with pytest.raises(FeatprobeError, match="incomplete"):
        FeatureCache(final)
    # the missing shard, told not to merge by itself? it merges: it is the last one
    assert extract(data, cache_dir=tmp_path, shard="0/2", **ARGS) is not None
    r = runner.invoke(main, ["merge", str(final.with_suffix(".partial"))])
    assert r.exit_code == 0 and r.output.strip() == str(final)  # merging again just opens it
    assert_same_cache(reference, FeatureCache(final))


def test_merge_command_consolidates_parts_by_itself(data, reference, tmp_path):
    """Shards on other machines: all parts present, nobody merged yet (e.g. the last job died
    between its parts and the merge). `featprobe merge` needs no torch and no images."""
    extract(data, cache_dir=tmp_path, shard="0/2", **ARGS)
    partial = tmp_path / reference.path.with_suffix(".partial").name
    helper = tmp_path / "other"
    extract(data, cache_dir=helper, shard="1/2", **ARGS)  # shard 1 elsewhere: ship its parts
    for p in (helper / partial.name).glob("part-*.npz"):
        shutil.copy(p, partial / p.name)
    r = CliRunner().invoke(main, ["merge", str(tmp_path / reference.path.name)])
    assert r.exit_code == 0, r.output
    assert_same_cache(reference, FeatureCache(r.output.strip()))


def test_merge_errors():
    runner = CliRunner()
    r = runner.invoke(main, ["merge", "/nonexistent/x.h5"])
    assert r.exit_code == 2 and r.output.startswith("error: nothing to merge")
    with pytest.raises(FeatprobeError, match="nothing to merge"):
        merge("/nonexistent/x.partial")


def test_shard_cli_rejects_bad_spec(data, tmp_path):
    r = CliRunner().invoke(main, ["extract", str(data), "--shard", "2/2", "--cache-dir",
                                  str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: --shard 2/2")


def _torchrun(data: Path, cache_dir: Path, extra_env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "featprobe", "extract", str(data), "--backbone", "resnet18",
           "--weights", "none", "--image-size", "32", "--dtype", "float32", "--device", "cpu",
           "--batch-size", str(BATCH), "--workers", "0", "--cache-dir", str(cache_dir), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def test_torchrun_two_ranks_gloo_equals_single_process(data, reference, tmp_path):
    r = _torchrun(data, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines == [str(tmp_path / reference.path.name)]  # printed once, by rank 0
    assert_same_cache(reference, FeatureCache(lines[0]))
    # both ranks wrote parts: the manifest and the shard locks of both are gone after merge
    assert not list(tmp_path.glob("*.partial"))


def test_a_rank_dying_fails_the_job_and_a_rerun_resumes(data, reference, tmp_path):
    r = _torchrun(data, tmp_path, {"FEATPROBE_CRASH_AT": "part.renamed:2",
                                   "FEATPROBE_CRASH_RANK": "1"})
    assert r.returncode != 0
    assert "FAILED" in r.stderr or "failed" in r.stderr  # torchrun names the dead rank
    final = tmp_path / reference.path.name
    assert not final.exists()
    [row] = list_caches(tmp_path)
    assert not row["complete"]
    r = _torchrun(data, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "batches of shard 1/2 already done" in r.stderr
    assert_same_cache(reference, FeatureCache(final))
