"""Honest comparisons (issue 15): selection never scores itself, repeated splits with intervals
and paired marks, the k-NN head, few-shot curves, l2 normalisation, any scikit-learn classifier
as a head."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from test_fitting import synthetic_cache

import featprobe as fp
from featprobe.cache import write_arrays
from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.probe.fit import fit
from featprobe.probe.headfile import load_head
from featprobe.probe.knn import KNNHead
from featprobe.runs import read_runs
from featprobe.runs.compare import compare, format_table
from featprobe.runs.curves import read_curves
from featprobe.splits import split


def coin_flip_cache(directory: Path, n=800, d=32, seed=0):
    """Gaussian features whose labels are fair coin flips: nothing can be learned."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    ids = [f"img{i:04d}.jpg" for i in range(n)]
    return write_arrays(directory / "coin.h5", ids, y, ["heads", "tails"], {"fc7": X},
                        meta={"backbone": "synthetic", "weights": "none",
                              "dataset_fingerprint": "coin"})


@pytest.fixture
def cache(tmp_path):
    return synthetic_cache(tmp_path / "c")


def test_coin_flip_labels_every_selecting_command_stays_at_chance(tmp_path):
    c = coin_flip_cache(tmp_path)
    seeds = range(6)
    for head, kw in (("linear", {"sweep": True, "epochs": 10, "min_steps": 0}),
                     ("logreg", {"sweep": True}),
                     ("svm", {"sweep": True}), ("knn", {})):
        recs = fit(c, head=head, seeds=seeds, val_fraction=0.3, **kw)
        accs = np.array([r["val"]["accuracy"] for r in recs])
        n_val = recs[0]["n_val"]
        se = math.sqrt(0.25 / (n_val * len(accs)))  # if every val image were a fresh coin
        assert abs(accs.mean() - 0.5) < 3 * se, (head, accs)
        # the choice was made on the inner split, whose best score is the optimistic one
        inner = [r["sweep"]["best"]["inner_val_accuracy"] for r in recs]
        assert all(r["sweep"]["selected_on"]["n_val"] > 0 for r in recs)
        assert np.mean(inner) >= accs.mean() - 3 * se
    r = CliRunner().invoke(main, ["curve", str(c.path), "--shots", "4,all", "--tries", "3",
                                  "-q", "--format", "json"])
    assert r.exit_code == 0, r.output
    for point in json.loads(r.output):
        assert point["val_acc_ci_low"] <= 0.5 <= point["val_acc_ci_high"] + 0.05, point


class Threshold(ClassifierMixin, BaseEstimator):
    """Class 1 where feature 0 exceeds ``t``: its accuracy is set by the data, point by point."""

    def __init__(self, t=0.0):
        self.t = t

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.fits_ = getattr(self, "fits_", 0) + 1
        return self

    def predict(self, X):
        return (np.asarray(X)[:, 0] > self.t).astype(int)


def test_a_patient_sweep_stops_after_points_in_a_row_below_the_best():
    # feature 0 = 1.5 everywhere; labels: 1 for 80% of rows. t < 1.5 predicts 1 (80%), t above
    # predicts 0 (20%). Grid t: 0 (0.8), 1 (0.8), 2 (0.2), 3 (0.2), 4 (0.2), 5 (0.2)
    X = np.full((50, 2), 1.5, np.float32)
    y = np.array([1] * 40 + [0] * 10)
    from featprobe.probe.sweeps import sweep_head

    grid = {"t": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
    res = sweep_head(Threshold(), grid, X, y, X, y, patience=2)
    assert [g["t"] for g in res.grid] == [0.0, 1.0, 2.0, 3.0]  # 2 and 3 score below 0.8
    assert res.not_fitted == [{"t": 4.0}, {"t": 5.0}]
    assert res.best["t"] == 0.0 and res.best["val_accuracy"] == pytest.approx(0.8)
    assert len(res.estimators_) == 4
    # a dip shorter than the patience does not stop the walk; no patience fits every point
    y2 = np.array([0] * 40 + [1] * 10)  # t < 1.5 now scores 0.2, above it 0.8
    res = sweep_head(Threshold(), {"t": [1.0, 2.0, 0.0, 3.0, 1.0]}, X, y2, X, y2, patience=2)
    assert [g["t"] for g in res.grid] == [1.0, 2.0, 0.0, 3.0, 1.0] and not res.not_fitted
    assert res.best["t"] == 2.0
    assert len(sweep_head(Threshold(), grid, X, y, X, y).grid) == 6
    with pytest.raises(FeatprobeError, match="patience"):
        sweep_head(Threshold(), grid, X, y, X, y, patience=0)


def test_knn_head_matches_a_reference_vote_and_saves(cache, tmp_path):
    X = cache.features()
    s = split(cache.ids, cache.labels, seed=0)
    head = KNNHead(k=7, temperature=0.1).fit(X[s.train], cache.labels[s.train])
    Xn = normalize(X.astype(np.float64))
    sim = Xn[s.val] @ Xn[s.train].T
    nearest = np.argsort(-sim, axis=1)[:, :7]
    w = np.exp(np.take_along_axis(sim, nearest, 1) / 0.1)
    ref = np.stack([(w * (cache.labels[s.train][nearest] == k)).sum(1) for k in (0, 1)], 1)
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(head.predict_proba(X[s.val]), ref, atol=1e-5)
    # blocks of a few training rows give the same votes (the running top-k)
    import featprobe.probe.knn as knn

    old, knn._BLOCK_ELEMENTS = knn._BLOCK_ELEMENTS, 50
    try:
        np.testing.assert_allclose(head.predict_proba(X[s.val]), ref, atol=1e-5)
    finally:
        knn._BLOCK_ELEMENTS = old
    assert KNNHead(k=10_000).fit(X[:20], cache.labels[:20]).predict(X[:5]).shape == (5,)
    # fit --head knn: k chosen on the inner split, saved, loaded, same predictions
    rec = fit(cache, head="knn", save=tmp_path / "knn.npz")
    assert rec["sweep"]["best"]["params"]["k"] in (10, 20, 100, 200)
    assert [g["k"] for g in rec["sweep"]["grid"]] == [10, 20, 100, 200]
    est, meta = load_head(tmp_path / "knn.npz")
    assert meta["head"] == "knn" and est.k == rec["params"]["k"]
    assert (est.predict(X[s.val]) == cache.labels[s.val]).mean() == pytest.approx(
        rec["val"]["accuracy"])
    small = synthetic_cache(tmp_path / "small", n=40)
    grid = fit(small, head="knn")["sweep"]["grid"]  # 28 inner training rows
    assert [g["k"] for g in grid] == [10, 20]  # k above the inner training rows: left out


def test_a_fit_that_stops_at_max_iter_says_so_in_one_line_and_records_it(cache):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    runner = CliRunner()
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        r = runner.invoke(main, ["fit", str(cache.path), "--head", "svm", "--sweep",
                                 "-p", "max_iter=1"])
    assert r.exit_code == 0, r.output
    assert not [w for w in escaped if issubclass(w.category, ConvergenceWarning)]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    rec = read_runs(cache.directory)[-1]
    n_fits = len(rec["sweep"]["grid"]) + 1
    assert lines == [f"warning: svm did not converge in {n_fits} of its {n_fits} fits, the "
                     "scored one among them (Liblinear failed to converge, increase the number "
                     "of iterations); its scores stand as recorded, with converged: false"]
    assert "site-packages" not in r.stderr and rec["converged"] is False
    # only the scored fit; and a fit that converges says nothing and records true
    r = runner.invoke(main, ["fit", str(cache.path), "--head", "logreg", "-p", "max_iter=1"])
    assert r.exit_code == 0 and "did not converge in the scored fit (lbfgs failed" in r.stderr
    r = runner.invoke(main, ["fit", str(cache.path), "--head", "logreg"])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
    assert [x["converged"] for x in read_runs(cache.directory)[-2:]] == [False, True]


def test_seeds_are_recorded_once_and_compared_with_intervals(cache):
    runner = CliRunner()
    r = runner.invoke(main, ["fit", str(cache.path), "--head", "logreg", "--seeds", "0-2,5"])
    assert r.exit_code == 0, r.output
    assert "over 4 seeds, 95% interval" in r.output
    runs = read_runs(cache.directory)
    assert sorted(x["seed"] for x in runs) == [0, 1, 2, 5]
    r = runner.invoke(main, ["fit", str(cache.path), "--head", "logreg", "--seeds", "0,1"])
    assert r.exit_code == 0 and r.output.count("already recorded") == 2
    assert len(read_runs(cache.directory)) == 4
    r = runner.invoke(main, ["fit", str(cache.path), "--head", "logreg", "--seed", "1",
                             "--force"])
    assert r.exit_code == 0 and len(read_runs(cache.directory)) == 5
    df = compare(cache.directory)
    row = df.iloc[0]
    assert row["n_runs"] == 5 and row["n_seeds"] == 4
    accs = np.array([x["val"]["accuracy"] for x in read_runs(cache.directory)][:4])
    n_tr, n_va = runs[0]["n_train"], runs[0]["n_val"]
    se = math.sqrt((1 / 4 + n_va / n_tr) * accs.var(ddof=1))  # Nadeau & Bengio
    half = stats.t.ppf(0.975, 3) * se
    assert row["val_acc"] == pytest.approx(accs.mean())
    assert row["val_acc_ci_low"] == pytest.approx(max(0, accs.mean() - half))
    assert row["val_acc_ci_high"] == pytest.approx(min(1, accs.mean() + half))
    text = format_table(df, "table")
    assert "val 95% CI" in text and "vs best" in text
    r = runner.invoke(main, ["fit", str(cache.path), "--seeds", "0,1", "--save", "h.npz"])
    assert r.exit_code == 2 and "--save keeps one head" in r.output
    for bad in ("x", "3-1", ""):
        r = runner.invoke(main, ["fit", str(cache.path), "--seeds", bad])
        assert r.exit_code == 2 and r.output.startswith("error:"), r.output


def _rec(head, seed, acc, n_val=100, correct=None, split_hash=None):
    correct = correct if correct is not None else np.arange(n_val) < round(acc * n_val)
    return {"kind": "probe", "backbone": "b", "weights": "w", "layer": "l", "head": head,
            "params": {}, "standardize": False, "seed": seed, "val_fraction": 0.1,
            "dataset_fingerprint": "d", "split_hash": split_hash or f"s{seed}", "n_train": 900,
            "n_val": n_val, "config_key": head, "run_id": f"{head}{seed}",
            "train": {"accuracy": 1.0}, "val": {"accuracy": acc},
            "val_correct": np.packbits(correct).tobytes().hex()}


def test_rows_indistinguishable_from_the_best_are_marked_by_paired_tests():
    best = [0.90, 0.92, 0.91, 0.93, 0.90]
    close = [0.89, 0.92, 0.90, 0.93, 0.91]
    far = [0.80, 0.81, 0.79, 0.80, 0.82]
    recs = [_rec(h, s, a) for h, accs in (("a", best), ("b", close), ("c", far))
            for s, a in enumerate(accs)]
    recs.append(_rec("d", 99, 0.85))  # no seed in common with the best
    df = compare(recs).set_index("head")
    assert df.loc["d", "tied_best"] is None or pd_isna(df.loc["d", "tied_best"])
    d = np.array(close) - np.array(best)
    t = d.mean() / math.sqrt((1 / 5 + 100 / 900) * d.var(ddof=1))
    assert df.loc["b", "p_vs_best"] == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert df.loc["b", "tied_best"] is True or df.loc["b", "tied_best"] == True  # noqa: E712
    assert df.loc["c", "tied_best"] == False  # noqa: E712
    # one shared split: McNemar on the same val images
    a = np.zeros(100, bool)
    a[:80] = True
    b = a.copy()
    b[:20] = False  # b loses 20 images a gets right, gains none
    df = compare([_rec("a", 0, 0.8, correct=a), _rec("b", 0, 0.6, correct=b)]).set_index("head")
    assert df.loc["b", "p_vs_best"] == pytest.approx(stats.binomtest(0, 20).pvalue)
    assert df.loc["b", "tied_best"] == False  # noqa: E712
    lo, hi = df.loc["a", ["val_acc_ci_low", "val_acc_ci_high"]]
    ci = stats.binomtest(80, 100).proportion_ci(method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))


def pd_isna(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def test_curve_points_equal_fits_on_the_drawn_rows(cache, tmp_path):
    r = CliRunner().invoke(main, ["curve", str(cache.path), "--head", "logreg", "--head", "knn",
                                  "--shots", "2,all", "--tries", "2", "--plot",
                                  str(tmp_path / "plots" / "curve.png"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plots" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    curves = read_curves(cache.directory)
    assert [c["head"] for c in curves] == ["logreg", "knn"]
    logreg = curves[0]
    two, every = logreg["points"]
    assert two["n_per_class"] == 2 and two["n_train"] == 4 and len(two["accuracies"]) == 2
    s = split(cache.ids, cache.labels, seed=0)
    X = cache.features()
    ref = fp.heads.make_head("logreg", random_state=0).fit(X[s.train], cache.labels[s.train])
    assert every["n_per_class"] is None and every["mean"] == pytest.approx(
        (ref.predict(X[s.val]) == cache.labels[s.val]).mean())
    assert every["ci_low"] <= every["mean"] <= every["ci_high"] and every["ci_low"] < every[
        "ci_high"]  # never narrower than the val rows' own sampling error
    assert "2" in r.output and "all" in r.output
    r = CliRunner().invoke(main, ["curve", str(cache.path), "--shots", "0,x"])
    assert r.exit_code == 2 and "--shots" in r.output


def test_l2_normalize_and_any_sklearn_classifier(cache, tmp_path):
    res = fp.fit(cache, head="logreg", l2_normalize=True, save=tmp_path / "h.npz")
    assert res["l2_normalize"] is True and res.estimator is not None
    s = split(cache.ids, cache.labels, seed=0)
    X = cache.features()
    ref = LogisticRegression(max_iter=1000, random_state=0).fit(normalize(X[s.train]),
                                                                cache.labels[s.train])
    assert res["val"]["accuracy"] == pytest.approx(
        (ref.predict(normalize(X[s.val])) == cache.labels[s.val]).mean())
    est, meta = load_head(tmp_path / "h.npz")
    assert meta["l2_normalize"] is True
    np.testing.assert_array_equal(est.predict(X), res.estimator.predict(X))
    # float16 rows are normalised in float32 (their sum of squares overflows float16)
    big = (X[:5] * 200).astype(np.float16)
    assert np.isfinite(est[0].transform(big)).all()

    mine = KNeighborsClassifier(n_neighbors=3)
    res = fp.fit(cache, head=mine)
    assert res["head"] == "sklearn:KNeighborsClassifier"
    ref = KNeighborsClassifier(n_neighbors=3).fit(X[s.train], cache.labels[s.train])
    assert res["val"]["accuracy"] == pytest.approx(
        (ref.predict(X[s.val]) == cache.labels[s.val]).mean())
    assert not hasattr(mine, "classes_")  # the user's estimator is cloned, not fitted
    with pytest.raises(FeatprobeError, match="not a registered head"):
        fp.fit(cache, head=mine, save=tmp_path / "k.npz")
    with pytest.raises(FeatprobeError, match="scikit-learn classifier"):
        fp.fit(cache, head=42)
    again = fp.fit(cache, head=mine)  # the same run: fitted, not recorded twice
    assert again.duplicate_of == res["run_id"]
    assert sum(r["head"] == "sklearn:KNeighborsClassifier"
               for r in read_runs(cache.directory)) == 1


def test_linear_head_passes_sklearn_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(fp.heads.LinearHead(), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results
              if r["status"] == "failed"]
    assert failed == []
