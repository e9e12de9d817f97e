"""Reproducibility on CPU: the same inputs, seed and device give identical cache arrays
(float32) from two separate `featprobe extract` processes writing two cache directories, and
identical metrics and fitted arrays from two separate `featprobe fit` processes per head.

Where results may move on a GPU (cuDNN algorithm choice, atomics, bf16 autocast) is written
up in docs/reliability.md; this machine has no GPU, so those are not measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from reliability import assert_same_cache, extract_argv, make_dataset

from featprobe.cache import FeatureCache

HEADS = ("linear", "mlp", "logreg", "svm")


def _extract(server, csv, cache_dir, *extra):
    status, log = server.run([*extract_argv(csv, cache_dir), *extra])
    assert status == 0, log
    return Path(log.strip().splitlines()[-1])


def test_two_extract_processes_give_identical_arrays(fork_server, tmp_path):
    server = fork_server
    csv = make_dataset(tmp_path / "data", n=30)
    a = _extract(server, csv, tmp_path / "run1")
    b = _extract(server, csv, tmp_path / "run2")
    assert a.name == b.name and a != b  # same content address, two separate files
    assert_same_cache(a, b)  # ids, labels, valid, classes, every layer bit for bit, sha256s
    # decoding in 2 worker processes instead of in the main one changes nothing either
    c = _extract(server, csv, tmp_path / "run3", "--workers", "2")
    assert_same_cache(c, a)
    # another batch size is the same cache by name; on CPU the values agree to float32
    # rounding (oneDNN may pick other kernels per batch size), measured for the docs
    d = _extract(server, csv, tmp_path / "run4", "--batch-size", "8")
    assert d.name == a.name
    fa, fd = FeatureCache(a), FeatureCache(d)
    for layer in fa.layers:
        x, y = fa.features(layer), fd.features(layer)
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        print(f"\nbatch 3 vs 8, {layer}: max |diff| {np.abs(x - y).max():.3g}, "
              f"identical: {np.array_equal(x, y)}")


def test_two_fit_processes_per_head_give_identical_results(fork_server, tmp_path):
    server = fork_server
    csv = make_dataset(tmp_path / "data", n=60)
    cache = _extract(server, csv, tmp_path / "c")
    runs = tmp_path / "runs"
    for head in HEADS:
        for k in (1, 2):
            argv = ["fit", str(cache), "--head", head, "--layer", "avgpool", "--seed", "3",
                    "--standardize", "--runs-dir", str(runs), "--save",
                    str(tmp_path / f"{head}-{k}.npz"), "--force"]  # the same run twice
            if head in ("linear", "mlp"):
                argv += ["--epochs", "5"]
            status, log = server.run(argv)
            assert status == 0, log
    records = [json.loads(line) for line in (runs / "runs.jsonl").read_text().splitlines()]
    assert [r["head"] for r in records] == [h for h in HEADS for _ in (1, 2)]
    for first, second in zip(records[::2], records[1::2]):
        assert first["run_id"] != second["run_id"]
        for key in ("split_hash", "params", "train", "val", "n_train", "n_val"):
            assert first[key] == second[key], (first["head"], key)
        h = first["head"]
        with np.load(tmp_path / f"{h}-1.npz") as x, np.load(tmp_path / f"{h}-2.npz") as y:
            assert x.files == y.files
            for name in x.files:
                if name not in ("__meta__", "__sha256__"):  # run_id; the digest of all
                    np.testing.assert_array_equal(x[name], y[name], err_msg=f"{h} {name}")
        print(f"\n{h}: val acc {first['val']['accuracy']:.3f} twice, "
              f"{len(x.files) - 2} fitted arrays identical")
