"""Out-of-core fitting: training from the HDF5 file in shuffled blocks under a memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featprobe.cache import write_arrays
from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.probe.fit import fit
from featprobe.probe.headfile import load_head
from featprobe.probe.outofcore import parse_size
from featprobe.probe.rows import BlockRows, read_rows
from featprobe.splits import split

ROOT = Path(__file__).resolve().parents[1]


def _features(n, d, n_classes, seed=0, sep=0.12):
    """Class-dependent means + noise, rows sorted by class (as a class-per-folder tree)."""
    rng = np.random.default_rng(seed)
    y = np.sort(rng.integers(0, n_classes, n))
    means = rng.standard_normal((n_classes, d), dtype=np.float32) * sep
    X = rng.standard_normal((n, d), dtype=np.float32)
    X += means[y]
    return X, y


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    X, y = _features(5000, 96, 3, sep=0.3)
    path = tmp_path_factory.mktemp("ooc") / "c.h5"
    return write_arrays(path, [f"{i}.jpg" for i in range(len(y))], y, ["a", "b", "c"], {"f": X})


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("1000000") == 1000000
    assert parse_size(4096) == 4096
    assert parse_size(" 64 mib ") == 64 << 20
    for bad in ("", "abc", "2XB", "-5MB", "0", "1.5.5GB", "GB"):
        with pytest.raises(FeatprobeError):
            parse_size(bad)


def test_read_rows_any_order_matches_h5py(cache):
    rows = np.random.default_rng(1).permutation(len(cache))[:1234]
    got = read_rows(cache.path, "f", rows)
    with h5py.File(cache.path) as f:
        np.testing.assert_array_equal(got, f["features/f"][()][rows])


def test_blocks_cover_the_rows_once_per_epoch(cache):
    import torch

    rows = np.random.default_rng(2).choice(len(cache), 3000, replace=False)
    with BlockRows(cache.path, "f", rows, cache.labels[rows], buffer_bytes=40_000) as src:
        assert len(src.blocks) > 16 and src.buffer_rows * src.row_bytes <= 2 * 40_000
        src.set_targets(np.arange(src.n))  # label = position, to track rows
        seen = []
        for filled, perm, use in src.fills(torch.Generator().manual_seed(0), keep_multiple=64):
            assert use % 64 == 0 or use == filled
            seen.append(src._lab[perm[:use].numpy()].copy())
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == list(range(src.n))  # every row exactly once
        assert not np.array_equal(seen, np.arange(src.n))  # and shuffled


@pytest.mark.parametrize("kw", [{"head": "linear"}, {"head": "linear", "standardize": True},
                                {"head": "mlp", "hidden": 32}])
def test_out_of_core_accuracy_equals_in_memory(cache, tmp_path, kw):
    """Same split, same head: in memory vs from the file with a budget far below the data."""
    common = dict(val_fraction=0.5, epochs=8, lr=1e-2, runs_dir=tmp_path, **kw)
    mem = fit(cache, **common)
    ooc = fit(cache, max_memory="200KB", **common)
    assert mem["out_of_core"] is None and ooc["out_of_core"]["max_memory"] == 200_000
    assert ooc["out_of_core"]["blocks"] >= 16
    assert mem["split_hash"] == ooc["split_hash"]
    assert 0.9 < mem["val"]["accuracy"] < 0.99  # a task where accuracy can differ
    assert abs(mem["val"]["accuracy"] - ooc["val"]["accuracy"]) <= 0.005
    assert ooc["head"] == kw["head"] and ooc["params"] == mem["params"]


def test_saved_out_of_core_head_predicts_as_recorded(cache, tmp_path):
    rec = fit(cache, head="linear", standardize=True, max_memory="200KB", epochs=3,
              save=tmp_path / "h.npz", runs_dir=tmp_path)
    est, meta = load_head(tmp_path / "h.npz")
    assert meta["head"] == "linear" and meta["standardize"] is True
    s = split(cache.ids, cache.labels, seed=0)
    X = cache.features()
    acc = (est.predict(X[s.val].astype(np.float32)) == cache.labels[s.val]).mean()
    assert acc == pytest.approx(rec["val"]["accuracy"])


@pytest.mark.parametrize("head,loss", [("logreg", "log_loss"), ("svm", "hinge")])
def test_sklearn_heads_fall_back_to_sgd_and_say_so(cache, tmp_path, caplog, head, loss):
    mem = fit(cache, head=head, standardize=True, runs_dir=tmp_path)
    rec = fit(cache, head=head, standardize=True, max_memory="200KB", save=tmp_path / "h.npz",
              runs_dir=tmp_path)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note:")]
    assert len(notes) == 1 and "SGDClassifier" in notes[0] and loss in notes[0]
    ooc = rec["out_of_core"]
    assert ooc["estimator"] == "sklearn.linear_model.SGDClassifier" and loss in ooc["fallback"]
    assert ooc["sgd_params"]["loss"] == loss
    assert rec["head"] == head and rec["params"] == mem["params"]  # what was asked for
    assert rec["val"]["accuracy"] > mem["val"]["accuracy"] - 0.05
    logged = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert logged[-1]["out_of_core"]["fallback"] == ooc["fallback"]
    # the saved fallback head loads (allow-listed) and predicts exactly as recorded
    est, meta = load_head(tmp_path / "h.npz")
    assert meta["head"] == head
    s = split(cache.ids, cache.labels, seed=0)
    X = cache.features()[s.val].astype(np.float32)
    assert (est.predict(X) == cache.labels[s.val]).mean() == pytest.approx(rec["val"]["accuracy"])


def test_sweep_out_of_core(cache, tmp_path):
    rec = fit(cache, head="linear", sweep=True, max_memory="200KB", epochs=3,
              runs_dir=tmp_path)
    assert len(rec["sweep"]["grid"]) == 12 and rec["out_of_core"]
    best = rec["sweep"]["best"]
    assert best["inner_val_accuracy"] == max(g["inner_val_accuracy"]
                                             for g in rec["sweep"]["grid"])
    assert rec["params"]["lr"] == best["params"]["lr"]
    # the same choice and the same val score as in memory (chosen on the inner split)
    mem = fit(cache, head="linear", sweep=True, epochs=3, runs_dir=tmp_path)
    assert mem["sweep"]["best"]["params"] == best["params"]
    assert mem["val"]["accuracy"] == pytest.approx(rec["val"]["accuracy"], abs=0.02)


def test_heads_without_out_of_core_variant_refuse(cache, tmp_path):
    with pytest.raises(FeatprobeError, match="no out-of-core variant"):
        fit(cache, head="svm-rbf", max_memory="200KB", runs_dir=tmp_path)
    with pytest.raises(FeatprobeError, match="logreg needs the features in memory"):
        fit(cache, head="logreg", sweep=True, max_memory="200KB", runs_dir=tmp_path)
    with pytest.raises(FeatprobeError, match="too small"):
        fit(cache, head="mlp", max_memory="1MB", runs_dir=tmp_path)  # 4096 hidden units


def test_cli_max_memory(cache, tmp_path):
    r = CliRunner().invoke(main, ["fit", str(cache.path), "--head", "linear", "--epochs", "2",
                                  "--max-memory", "300KB", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "out-of-core: budget" in r.output and "val acc" in r.output
    for bad in ("lots", "0", "-1GB", "2 XB"):
        r = CliRunner().invoke(main, ["fit", str(cache.path), "--max-memory", bad])
        assert r.exit_code == 2, (bad, r.output)
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import featprobe.probe.fit, featprobe.probe.outofcore, torch, sklearn, h5py  # noqa: F401

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    from featprobe.cache import FeatureCache, write_arrays
    import numpy as np
    cache = FeatureCache(sys.argv[1])
    # Warm up on a tiny cache, out of core: every lazily imported module, torch's thread pool
    # and BLAS workspaces are process overhead, not feature data.
    x = np.random.default_rng(0).random((512, cache.shapes["f"][1]), dtype=np.float32)
    tiny = write_arrays(sys.argv[4] + "/tiny.h5", [str(i) for i in range(512)],
                        np.arange(512) % 2, [0, 1], {"f": x})
    del x
    kw = {"epochs": 1} if sys.argv[3] == "linear" else {}
    featprobe.probe.fit.fit(tiny, head=sys.argv[3], standardize=True, **kw, max_memory="1MB",
                          runs_dir=sys.argv[4])
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    rec = featprobe.probe.fit.fit(cache, head=sys.argv[3], standardize=True, **kw,
                                max_memory=sys.argv[2], runs_dir=sys.argv[4])
    print(json.dumps({"growth": status("VmHWM") - base, "ooc": rec["out_of_core"],
                      "acc": rec["val"]["accuracy"]}))
""")


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_peak_rss_growth_stays_under_the_budget(tmp_path_factory, head):
    """An 82 MB float16 layer fitted with a 28 MB budget: the process's peak RSS grows by less
    than the budget over its baseline (Linux /proc VmHWM), taken after imports, opening the
    cache and one tiny out-of-core fit that loads lazy imports and warms up torch's thread
    pool and BLAS workspaces."""
    path = tmp_path_factory.getbasetemp() / "rss-cache.h5"
    if not path.exists():
        X, y = _features(20_000, 2048, 2, sep=0.05)
        write_arrays(path, [str(i) for i in range(len(y))], y, [0, 1], {"f": X})
        del X
    budget = 28 * 10**6
    assert 20_000 * 2048 * 2 > 2.5 * budget  # the layer is far bigger than the budget
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(budget), head,
                          str(tmp_path_factory.mktemp("runs"))],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ooc"] and res["acc"] > 0.9
    assert 0 < res["growth"] < budget, res
