"""featprobe fit / compare / predict over real caches: records, split, sweep, saved heads."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import make_classification

import featprobe
from featprobe.cache import write_arrays
from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.prediction import predict
from featprobe.probe.fit import fit
from featprobe.probe.headfile import load_head
from featprobe.runs import read_runs
from featprobe.splits import split


def synthetic_cache(directory: Path, n=300, d=64, classes=("cat", "dog"), seed=0, sep=2.0):
    X, y = make_classification(n_samples=n, n_features=d, n_informative=10, n_redundant=0,
                               n_classes=len(classes), class_sep=sep, random_state=seed)
    ids = [f"img{i:04d}.jpg" for i in range(n)]
    return write_arrays(directory / f"synthetic-{seed}.h5", ids, y, list(classes),
                        {"fc7": X.astype(np.float32), "fc6": X[:, ::-1].astype(np.float32)},
                        meta={"backbone": "synthetic", "weights": "none",
                              "dataset_fingerprint": f"synthetic{seed}"})


@pytest.fixture
def cache(tmp_path):
    return synthetic_cache(tmp_path / "c")


def test_fit_record_and_runs_log(cache):
    rec = fit(cache, head="logreg", layer="fc7", seed=0)
    assert rec["kind"] == "probe" and rec["head"] == "logreg" and rec["layer"] == "fc7"
    assert rec["cache"] == cache.path.name and rec["backbone"] == "synthetic"
    assert rec["n_train"] == 270 and rec["n_val"] == 30 and rec["n_invalid"] == 0
    assert rec["val"]["accuracy"] > 0.8 and rec["train"]["accuracy"] >= rec["val"]["accuracy"]
    assert np.array(rec["val"]["confusion_matrix"]).sum() == 30
    assert rec["params"]["C"] == 1.0 and rec["fit_seconds"] > 0
    assert rec["classes"] == ["cat", "dog"] and rec["versions"]["featprobe"]
    [logged] = read_runs(cache.directory)
    assert logged == json.loads(json.dumps(rec))
    # the default layer is the cache's first
    assert fit(cache, head="svm")["layer"] == "fc7"


def test_every_head_sees_the_same_split(cache):
    s = split(cache.ids, cache.labels, val_fraction=0.1, seed=3)
    hashes = {fit(cache, head=h, seed=3, epochs=3)["split_hash"]
              if h in ("linear", "mlp") else fit(cache, head=h, seed=3)["split_hash"]
              for h in ("linear", "logreg", "svm", "svm-rbf", "mlp")}
    assert hashes == {s.hash}
    assert fit(cache, head="logreg", seed=4)["split_hash"] != s.hash


def test_linear_head_matches_logreg(tmp_path):
    """Tutorial-sized (1,500 rows) separable set, default head parameters: within 2 points."""
    c = synthetic_cache(tmp_path / "c", n=1500, sep=2.0)
    lin = fit(c, head="linear")["val"]["accuracy"]
    lr = fit(c, head="logreg")["val"]["accuracy"]
    assert lin >= lr - 0.02, (lin, lr)


def test_standardize_and_params(cache):
    rec = fit(cache, head="linear", standardize=True, lr=0.01, epochs=5)
    assert rec["standardize"] is True and rec["params"]["lr"] == 0.01
    assert rec["params_set"] == {"lr": 0.01, "epochs": 5}
    with pytest.raises(FeatprobeError, match="unknown parameter 'bogus'"):
        fit(cache, head="linear", bogus=1)
    with pytest.raises(FeatprobeError, match="unknown head"):
        fit(cache, head="forest")
    with pytest.raises(FeatprobeError, match="layer 'pool5' is not in"):
        fit(cache, head="logreg", layer="pool5")


def test_sweep_chooses_on_an_inner_split_and_scores_on_val(cache):
    rec = fit(cache, head="linear", sweep=True, epochs=5)
    sw = rec["sweep"]
    grid = sw["grid"]
    assert len(grid) >= 12
    best = max(grid, key=lambda g: g["inner_val_accuracy"])
    assert sw["best"]["inner_val_accuracy"] == best["inner_val_accuracy"]
    chosen = sw["best"]["params"]
    assert rec["params"]["lr"] == chosen["lr"] and rec["params"]["weight_decay"] == chosen[
        "weight_decay"]
    # the inner split is carved from the train rows only: stratified, 20%, recorded
    on = sw["selected_on"]
    assert on["n_train"] + on["n_val"] == rec["n_train"] and on["fraction"] == 0.2
    s = split(cache.ids, cache.labels, seed=0)
    inner = split([cache.ids[i] for i in s.train], cache.labels[s.train], val_fraction=0.2,
                  seed=0)
    assert on["split_hash"] == inner.hash
    # the reported val accuracy is the chosen point refitted on all train rows, scored on val
    X = cache.features()
    ref = featprobe.heads.make_head("linear", epochs=5, random_state=0, **chosen)
    ref.fit(X[s.train], cache.labels[s.train])
    assert rec["val"]["accuracy"] == pytest.approx((ref.predict(X[s.val]) == cache.labels[
        s.val]).mean())
    for head in ("logreg", "svm"):
        rec = fit(cache, head=head, sweep=True)
        # walked from C=1e-4 up; the points after 2 in a row below the best are not fitted
        sw = rec["sweep"]
        fitted = [g["C"] for g in sw["grid"]]
        assert fitted + [p["C"] for p in sw["not_fitted"]] == [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100]
        inner = [g["inner_val_accuracy"] for g in sw["grid"]]
        if sw["not_fitted"]:
            assert sw["patience"] == 2 and max(inner[-2:]) < max(inner[:-2])
        assert rec["params"]["C"] == sw["best"]["params"]["C"]
        assert sw["best"]["inner_val_accuracy"] == max(inner)
    with pytest.raises(FeatprobeError, match="--sweep"):
        fit(cache, head="mlp", sweep=True)


def test_invalid_rows_excluded(tmp_path):
    c = synthetic_cache(tmp_path / "c")
    import h5py

    from featprobe.cache.format import rows_digest

    with h5py.File(c.path, "a") as f:  # as if 7 images had been unreadable
        v = f["valid"][()]
        v[:7] = False
        f["valid"][...] = v
        f.attrs["rows_sha256"] = rows_digest(c.ids, c.labels, v, c.classes)
    rec = fit(featprobe.FeatureCache(c.path), head="logreg")
    assert rec["n_invalid"] == 7 and rec["n_train"] + rec["n_val"] == 293


def _one_fit(args):
    path, seed = args
    fit(path, head="logreg", seed=seed)


def test_concurrent_fits_lose_no_line(cache):
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_one_fit, [(str(cache.path), s) for s in range(8)])
    runs = read_runs(cache.directory)
    assert sorted(r["seed"] for r in runs) == list(range(8))


def test_compare_mean_std_and_cli(cache, tmp_path):
    for seed in range(3):
        fit(cache, head="logreg", seed=seed)
    fit(cache, head="svm", seed=0)
    df = featprobe.compare(cache.directory)
    row = df[df["head"] == "logreg"].iloc[0]
    accs = [r["val"]["accuracy"] for r in read_runs(cache.directory) if r["head"] == "logreg"]
    assert row["n_runs"] == 3
    assert row["val_acc"] == pytest.approx(np.mean(accs))
    assert row["val_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    r = CliRunner().invoke(main, ["compare", str(cache.directory), "--format", "csv"])
    assert r.exit_code == 0
    assert set(pd.read_csv(__import__("io").StringIO(r.output))["head"]) == {"logreg", "svm"}
    r = CliRunner().invoke(main, ["compare", str(cache.directory), "--plot",
                                  str(tmp_path / "p.png")])
    assert r.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_rejects_corrupt_log_without_touching_it(cache):
    fit(cache, head="logreg")
    log = cache.directory / "runs.jsonl"
    with open(log, "a") as f:
        f.write("{not json\n")
    before = log.read_bytes()
    r = CliRunner().invoke(main, ["compare", str(cache.directory)])
    assert r.exit_code == 2 and "runs.jsonl:2:" in r.output and "Traceback" not in r.output
    fit(cache, head="svm")  # fitting still appends; nothing is lost
    assert log.read_bytes().startswith(before) and len(log.read_bytes()) > len(before)


def test_cli_fit_prints_metrics_and_saves(cache, tmp_path):
    r = CliRunner().invoke(main, ["fit", str(cache.path), "--head", "linear", "--epochs", "5",
                                  "--layer", "fc6", "--save", str(tmp_path / "h.npz")])
    assert r.exit_code == 0, r.output
    for word in ("train acc", "val acc", "balanced", "macro F1", "fit"):
        assert word in r.output
    est, meta = load_head(tmp_path / "h.npz")
    assert meta["layer"] == "fc6" and meta["classes"] == ["cat", "dog"]
    assert meta["backbone"] == "synthetic"
    r = CliRunner().invoke(main, ["fit", str(cache.path), "--head", "nope"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown head")
    r = CliRunner().invoke(main, ["fit", str(tmp_path / "missing.h5")])
    assert r.exit_code == 2 and "cache not found" in r.output


# ----------------------------------------------------------------------------- predict (real)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real extract (resnet18, random init, 32 px) of two separable classes + held-out CSV."""
    root = tmp_path_factory.mktemp("real")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = ["image_names,emergency_or_no"]
    for i in range(60):
        a = (rng.random((32, 32, 3)) * 60).astype(np.uint8)
        a[..., 2 * (i % 2)] += 180
        Image.fromarray(a).save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    (root / "train.csv").write_text("\n".join(lines[:51]) + "\n")
    (root / "test.csv").write_text("\n".join([lines[0], *lines[51:]]) + "\n")
    cache = featprobe.extract(root / "train.csv", backbone="resnet18", weights="none",
                              image_size=32, cache_dir=root / "c", progress=False, workers=0)
    return root, cache


@pytest.mark.parametrize("head", ["logreg", "linear", "svm"])
def test_saved_head_predicts_what_memory_head_predicts(real, head, tmp_path):
    root, cache = real
    rec = fit(cache, head=head, save=tmp_path / "h.npz", runs_dir=tmp_path)
    est, meta = load_head(tmp_path / "h.npz")
    X = cache.features()
    # refit in memory on the same rows: identical predictions to the saved head's
    s = split(cache.ids, cache.labels, seed=0)
    mem = featprobe.probe.make_head(head, random_state=0).fit(X[s.train], cache.labels[s.train])
    np.testing.assert_array_equal(est.predict(X), mem.predict(X))
    assert meta["weights"] == "none" and meta["preprocessing"]["crop_size"] == [32]
    # predict on held-out labelled images: the backbone reruns from the head's metadata
    df, acc = predict(tmp_path / "h.npz", root / "test.csv", out=tmp_path / "p.csv",
                      progress=False, workers=0)
    assert list(df.columns[:3]) == ["image_names", "label", "probability"]
    assert len(df) == 10 and acc == pytest.approx((df["label"] == df["true_label"]).mean())
    assert acc >= 0.8
    written = pd.read_csv(tmp_path / "p.csv")
    assert list(written["image_names"]) == [f"{i}.png" for i in range(50, 60)]
    # the held-out images' features equal what extract caches for them
    assert "in_training" not in df  # test.csv holds no training image
    train_pred, acc = predict(tmp_path / "h.npz", root / "train.csv", progress=False, workers=0)
    np.testing.assert_array_equal(
        train_pred["label"].astype(int).to_numpy(),
        np.array(cache.classes)[est.predict(X.astype(np.float32))],
    )
    # the head's own training images: marked, and left out of the accuracy
    seen = train_pred["in_training"].to_numpy()
    assert seen.sum() == len(s.train) and not seen[s.val].any()
    hit = (train_pred["label"] == train_pred["true_label"]).to_numpy()
    assert acc == pytest.approx(hit[~seen].mean())
    if head == "svm":
        assert train_pred["probability"].isna().all()
    else:
        assert train_pred["probability"].between(0.5, 1).all()
    assert rec["saved_head"] == str(tmp_path / "h.npz")


def test_predict_marks_training_images_without_labels_too(real, tmp_path, caplog):
    root, cache = real
    fit(cache, head="logreg", save=tmp_path / "h.npz", runs_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="featprobe"):
        df, acc = predict(tmp_path / "h.npz", root / "images", progress=False, workers=0)
    s = split(cache.ids, cache.labels, seed=0)
    train_names = {cache.ids[i] for i in s.train}
    assert acc is None and "true_label" not in df and len(df) == 60
    assert set(df.loc[df["in_training"], "image_names"]) == train_names
    assert df["in_training"].sum() == len(train_names)
    assert f"warning: {len(s.train)} of the 60 images were in the head's training rows " \
           "(column in_training)" in caplog.text
    assert "accuracy" not in caplog.text


def test_predict_cli_and_refusals(real, tmp_path):
    root, cache = real
    fit(cache, head="logreg", save=tmp_path / "h.npz", runs_dir=tmp_path)
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "h.npz"), str(root / "images"),
                                  "--out", str(tmp_path / "p.csv"), "-q", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 60
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "h.npz"), str(root / "test.csv"),
                                  "--out", str(tmp_path / "p.csv"), "-q", "--workers", "0"])
    assert r.exit_code == 0 and "accuracy" in r.output
    # a head whose weights cannot be reproduced here is refused, in one line
    est, meta = load_head(tmp_path / "h.npz")
    from featprobe.probe.headfile import save_head

    save_head(tmp_path / "other.npz", est, {**meta, "weights": "file",
                                            "weights_file": str(tmp_path / "gone.pth")})
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "other.npz"), str(root / "images")])
    assert r.exit_code == 2 and "gone.pth" in r.output
    save_head(tmp_path / "wide.npz", est, {**meta, "n_features": 4096})
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "wide.npz"), str(root / "images"),
                                  "-q", "--workers", "0"])
    assert r.exit_code == 2 and "expects 4096 features" in r.output
    (tmp_path / "junk.npz").write_bytes(b"junk")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "junk.npz"), str(root / "images")])
    assert r.exit_code == 2 and r.output.startswith("error:")
