"""Tests for featprobe.probe: the registry, the torch heads, the sweeps, the head files."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featprobe.errors import FeatprobeError
from featprobe.probe import (
    HEADS,
    LinearHead,
    MLPHead,
    head_name,
    head_params,
    list_heads,
    make_head,
    sweep_linear,
    sweep_logreg,
)
from featprobe.probe.headfile import FORMAT_VERSION, _digest, load_head, save_head

# SVC(probability=True) is deprecated in scikit-learn 1.9; svm-rbf still uses it (see docs).
pytestmark = pytest.mark.filterwarnings("ignore:The `probability` parameter:FutureWarning")

# Small but enough for every head to learn the toy problems below, fast on 2 CPU cores.
SMALL = {
    "linear": {"epochs": 15, "lr": 1e-2, "device": "cpu", "min_steps": 0},
    "mlp": {"hidden": 16, "dropout": 0.1, "epochs": 15, "lr": 1e-2, "device": "cpu"},
}


@pytest.fixture(scope="module")
def three_class():
    """String labels, 3 classes, train/test split."""
    X, y = make_classification(
        n_samples=450,
        n_features=24,
        n_informative=8,
        n_classes=3,
        class_sep=2.5,
        random_state=0,
    )
    labels = np.array(["cat", "dog", "emu"])[y]
    return train_test_split(X.astype(np.float32), labels, test_size=150, random_state=0)


# --------------------------------------------------------------------------- sklearn API


def _expected_failed_checks(estimator):
    # Every scikit-learn check applies to the torch heads and passes. (check_array_api_input
    # skips itself unless SCIPY_ARRAY_API is set: the heads take numpy input only.)
    return {}


@parametrize_with_checks(
    [
        LinearHead(epochs=20, lr=1e-2, device="cpu"),
        MLPHead(hidden=16, dropout=0.1, epochs=10, lr=2e-2, device="cpu"),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- torch heads


def test_linear_head_matches_logistic_regression_accuracy():
    X, y = make_classification(
        n_samples=1200, n_features=40, n_informative=10, class_sep=2.0, random_state=1
    )
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=400, random_state=0)
    ref = LogisticRegression(max_iter=1000).fit(X_tr, y_tr).score(X_te, y_te)
    acc = LinearHead(device="cpu").fit(X_tr, y_tr).score(X_te, y_te)
    assert ref > 0.9  # the set is (nearly) separable
    assert acc >= ref - 0.02


def test_same_seed_same_weights_and_global_rng_untouched(three_class):
    X_tr, _, y_tr, _ = three_class
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = LinearHead(**SMALL["linear"]).fit(X_tr, y_tr)
    b = LinearHead(**SMALL["linear"]).fit(X_tr, y_tr)
    c = LinearHead(**SMALL["linear"], random_state=1).fit(X_tr, y_tr)
    assert np.array_equal(a.coef_, b.coef_) and np.array_equal(a.intercept_, b.intercept_)
    assert not np.array_equal(a.coef_, c.coef_)
    m1 = MLPHead(**SMALL["mlp"]).fit(X_tr, y_tr)
    m2 = MLPHead(**SMALL["mlp"]).fit(X_tr, y_tr)
    for w1, w2 in zip(m1.coefs_ + m1.intercepts_, m2.coefs_ + m2.intercepts_, strict=True):
        assert np.array_equal(w1, w2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(s, t) for s, t in zip(np.random.get_state(), np_state))


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_string_labels_multiclass(three_class, name):
    X_tr, X_te, y_tr, y_te = three_class
    head = make_head(name, **SMALL[name]).fit(X_tr, y_tr)
    assert list(head.classes_) == ["cat", "dog", "emu"]
    assert head.score(X_te, y_te) > 0.8
    proba = head.predict_proba(X_te)
    assert proba.shape == (len(X_te), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-12)
    assert head.decision_function(X_te).shape == (len(X_te), 3)
    assert np.array_equal(head.predict(X_te), head.classes_[proba.argmax(axis=1)])
    assert head.n_iter_ == SMALL[name]["epochs"] and len(head.loss_curve_) == head.n_iter_
    assert head.loss_curve_[-1] < head.loss_curve_[0]


def test_binary_shapes_and_decision_sign():
    X, y = make_blobs(n_samples=200, centers=2, n_features=5, random_state=0)
    labels = np.array(["no", "yes"])[y]
    head = LinearHead(**SMALL["linear"]).fit(X, labels)
    assert head.coef_.shape == (2, 5) and head.intercept_.shape == (2,)
    d = head.decision_function(X)
    assert d.shape == (200,)
    assert np.array_equal(head.predict(X), np.where(d > 0, "yes", "no"))


def test_float16_input_used_as_is_and_same_as_float32(three_class):
    X_tr, X_te, y_tr, _ = three_class
    X16 = X_tr.astype(np.float16)
    head = LinearHead(**SMALL["linear"])
    X_checked, _ = head._validate_fit(X16, y_tr)
    assert X_checked.dtype == np.float16 and np.shares_memory(X_checked, X16)  # no copy
    a = LinearHead(**SMALL["linear"]).fit(X16, y_tr)
    b = LinearHead(**SMALL["linear"]).fit(X16.astype(np.float32), y_tr)
    assert np.array_equal(a.coef_, b.coef_)  # converted per minibatch to the same float32
    assert np.array_equal(a.predict(X_te.astype(np.float16)), b.predict(X_te))


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_linear_head_is_a_plain_torch_training_loop(three_class, optimizer):
    """LinearHead = nn.Linear + torch.optim.AdamW/Adam + cross-entropy on the minibatches a
    local generator draws: written out here independently, the weights agree."""
    X_tr, _, y_tr, _ = three_class
    kw = {"epochs": 3, "batch_size": 40, "lr": 1e-2, "weight_decay": 1e-2, "device": "cpu",
          "random_state": 5, "optimizer": optimizer, "min_steps": 0}
    head = LinearHead(**kw).fit(X_tr, y_tr)
    classes, y_idx = np.unique(y_tr, return_inverse=True)
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(X_tr.shape[1], len(classes))
    bound = 1 / np.sqrt(X_tr.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.empty(len(classes), X_tr.shape[1]).uniform_(-bound, bound,
                                                                           generator=gen))
        lin.bias.copy_(torch.empty(len(classes)).uniform_(-bound, bound, generator=gen))
    torch.randint(2**62, (), generator=gen)  # the dropout seed every torch head draws
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)(
        [{"params": [lin.weight], "weight_decay": 1e-2}, {"params": [lin.bias],
                                                           "weight_decay": 0.0}], lr=1e-2)
    X, y = torch.from_numpy(X_tr), torch.from_numpy(y_idx)
    for _ in range(3):
        for idx in torch.randperm(len(X), generator=gen).split(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(X[idx]), y[idx]).backward()
            opt.step()
    np.testing.assert_allclose(head.coef_, lin.weight.detach().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(head.intercept_, lin.bias.detach().numpy(), rtol=0, atol=1e-5)


def test_a_fit_does_not_import_torchs_compiler_stack():
    """Constructing a torch.optim optimiser imports torch._dynamo (torch 2.14: about 2 s and
    +159 MiB in every process); the heads use torch.optim's functional update instead."""
    code = ("import sys, numpy as np\nfrom featprobe.probe import LinearHead, MLPHead\n"
            "X = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)\n"
            "for h in (LinearHead(epochs=2), MLPHead(hidden=4, epochs=2)):\n"
            "    h.fit(X, np.arange(64) % 2)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_non_finite_input_is_refused():
    X, y = make_blobs(n_samples=60, centers=2, n_features=4, random_state=0)
    X[5, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        LinearHead(epochs=2, device="cpu").fit(X, y)


# --------------------------------------------------------------------------- sweeps


def test_sweep_linear_equals_heads_trained_one_by_one(three_class):
    X_tr, X_val, y_tr, y_val = three_class
    X16, X16_val = X_tr.astype(np.float16), X_val.astype(np.float16)
    kw = {"epochs": 4, "batch_size": 32, "device": "cpu", "random_state": 3}
    res = sweep_linear(X16, y_tr, X16_val, y_val, **kw)
    assert len(res.grid) == len(res.estimators_) >= 12
    assert {(p["lr"], p["weight_decay"]) for p in res.grid} == {
        (lr, wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for wd in (0, 1e-4, 1e-2)
    }
    for point, swept in zip(res.grid, res.estimators_, strict=True):
        alone = LinearHead(lr=point["lr"], weight_decay=point["weight_decay"], **kw)
        alone.fit(X16, y_tr)
        assert swept.get_params() == alone.get_params()
        np.testing.assert_allclose(swept.coef_, alone.coef_, rtol=0, atol=1e-5)
        np.testing.assert_allclose(swept.intercept_, alone.intercept_, rtol=0, atol=1e-5)
        np.testing.assert_allclose(swept.loss_curve_, alone.loss_curve_, rtol=1e-5)
        assert point["train_accuracy"] == pytest.approx(alone.score(X16, y_tr), abs=0.01)
        assert point["val_accuracy"] == pytest.approx(alone.score(X16_val, y_val), abs=0.01)


def test_sweep_linear_picks_the_best_on_val(three_class, tmp_path):
    X_tr, X_val, y_tr, y_val = three_class
    res = sweep_linear(X_tr, y_tr, X_val, y_val, epochs=5, device="cpu")
    vals = [p["val_accuracy"] for p in res.grid]
    assert res.best is res.grid[int(np.argmax(vals))]  # argmax: ties go to the earlier point
    best = res.best_estimator_
    assert isinstance(best, LinearHead)
    assert (best.lr, best.weight_decay) == (res.best["lr"], res.best["weight_decay"])
    assert best.score(X_val, y_val) == pytest.approx(res.best["val_accuracy"])
    assert best.score(X_tr, y_tr) == pytest.approx(res.best["train_accuracy"])
    loaded, _ = load_head(save_head(tmp_path / "best.npz", best, {}))
    assert np.array_equal(loaded.predict_proba(X_val), best.predict_proba(X_val))


def test_sweep_linear_tie_goes_to_the_earlier_point(three_class):
    X_tr, X_val, y_tr, y_val = three_class
    res = sweep_linear(
        X_tr, y_tr, X_val, y_val, lrs=(1e-3, 1e-3), weight_decays=(0,), epochs=2, device="cpu"
    )
    assert res.grid[0]["val_accuracy"] == res.grid[1]["val_accuracy"]
    assert res.best is res.grid[0]


def test_sweep_logreg(three_class):
    X_tr, X_val, y_tr, y_val = three_class
    res = sweep_logreg(X_tr, y_tr, X_val, y_val, Cs=(0.001, 0.1, 10))
    assert [p["C"] for p in res.grid] == [0.001, 0.1, 10]
    assert res.best is res.grid[int(np.argmax([p["val_accuracy"] for p in res.grid]))]
    assert isinstance(res.best_estimator_, LogisticRegression)
    assert res.best_estimator_.C == res.best["C"]
    assert res.best_estimator_.score(X_val, y_val) == pytest.approx(res.best["val_accuracy"])


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert list_heads() == ["linear", "mlp", "logreg", "svm", "svm-rbf", "knn"]
    for name, spec in HEADS.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
        json.dumps(spec.params())


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("standardize", [False, True])
def test_every_head_fits_and_roundtrips_its_params(three_class, name, standardize):
    X_tr, X_te, y_tr, y_te = three_class
    est = make_head(name, standardize=standardize, **SMALL.get(name, {}))
    assert isinstance(est, Pipeline) == standardize
    if standardize:
        assert isinstance(est.steps[0][1], StandardScaler)
    est.fit(X_tr, y_tr)
    assert est.score(X_te, y_te) > 0.75
    assert head_name(est) == name
    params = head_params(est)
    json.dumps(params)
    assert params["standardize"] == standardize
    rebuilt = make_head(name, **params)
    assert clone(est).get_params(deep=False).keys() == clone(rebuilt).get_params(deep=False).keys()
    assert head_params(rebuilt) == params


def test_make_head_defaults():
    assert make_head("logreg").max_iter == 1000
    svc = make_head("svm-rbf")
    assert svc.probability is True
    head = make_head("linear")
    assert (head.epochs, head.batch_size, head.lr, head.weight_decay) == (30, 128, 1e-3, 1e-4)
    assert (head.optimizer, head.device, head.random_state) == ("adamw", "auto", 0)
    mlp = make_head("mlp")
    assert (mlp.hidden, mlp.dropout) == (4096, 0.5)


def test_make_head_errors():
    with pytest.raises(FeatprobeError, match="unknown head 'resnet'.*linear, mlp, logreg"):
        make_head("resnet")
    with pytest.raises(FeatprobeError, match="unknown parameter 'learning_rate'.*lr"):
        make_head("linear", learning_rate=0.1)
    with pytest.raises(FeatprobeError, match="unknown parameter 'hidden' for head 'logreg'"):
        make_head("logreg", hidden=10)
    with pytest.raises(FeatprobeError, match="head 'linear': lr must be"):
        make_head("linear", lr=-1)
    with pytest.raises(FeatprobeError, match="head 'mlp': dropout must be"):
        make_head("mlp", dropout=1.0)
    with pytest.raises(FeatprobeError, match="head 'linear': optimizer"):
        make_head("linear", optimizer="sgd")
    with pytest.raises(FeatprobeError, match="head 'logreg':.*'C' parameter"):
        make_head("logreg", C=-1.0)


# --------------------------------------------------------------------------- headio


def _fitted(name, standardize, X, y):
    return make_head(name, standardize=standardize, **SMALL.get(name, {})).fit(X, y)


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("standardize", [False, True])
def test_save_load_roundtrip_is_exact(three_class, tmp_path, name, standardize):
    X_tr, X_te, y_tr, _ = three_class
    est = _fitted(name, standardize, X_tr, y_tr)
    meta = {
        "classes": ["cat", "dog", "emu"],
        "layer": "fc7",
        "backbone": "vgg16",
        "weights": "DEFAULT",
        "preprocessing": {"resize": 256, "crop": 224},
    }
    path = save_head(tmp_path / "head.npz", est, meta)
    assert path == tmp_path / "head.npz" and os.listdir(tmp_path) == ["head.npz"]
    loaded, got = load_head(path)
    assert type(loaded) is type(est)
    assert {k: got[k] for k in meta} == meta
    assert got["format_version"] == FORMAT_VERSION and got["head"] == name
    assert got["params"] == head_params(est) and got["standardize"] == standardize
    assert loaded.get_params(deep=False).keys() == est.get_params(deep=False).keys()
    methods = ["predict", "predict_proba", "decision_function"]
    available = [m for m in methods if hasattr(est, m)]
    assert "predict" in available and (name == "svm") == ("predict_proba" not in available)
    for m in available:
        a, b = getattr(est, m)(X_te), getattr(loaded, m)(X_te)
        assert a.dtype == b.dtype and np.array_equal(a, b), m


def test_head_file_holds_no_pickle(three_class, tmp_path):
    X_tr, _, y_tr, _ = three_class
    path = save_head(tmp_path / "h.npz", _fitted("svm-rbf", True, X_tr, y_tr), {"layer": "fc7"})
    with zipfile.ZipFile(path) as zf:
        assert all(n.endswith(".npy") for n in zf.namelist())
    with np.load(path, allow_pickle=False) as npz:
        assert {"__meta__", "__state__"} <= set(npz.files)
        for key in npz.files:
            assert npz[key].dtype != object, key  # each array loads without pickle
        json.loads(str(npz["__meta__"][()]))


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    if all(a.dtype != object for a in arrays.values()):  # recomputed: test the checks behind it
        arrays["__sha256__"] = np.array(_digest(arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.fixture
def saved(three_class, tmp_path):
    X_tr, _, y_tr, _ = three_class
    return save_head(tmp_path / "h.npz", _fitted("linear", False, X_tr, y_tr), {})


def test_load_refuses_bad_files(saved, tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = {
        tmp_path / "missing.npz": "no head file",
        tmp_path / "text.npz": "not a featprobe head file",
        tmp_path / "plain.npy": "not a featprobe head file",
        tmp_path / "other.npz": "not a featprobe head file",
        tmp_path / "pickled.npy": "not a featprobe head file",
    }
    for path, msg in cases.items():
        with pytest.raises(FeatprobeError, match=msg) as err:
            load_head(path)
        assert "\n" not in str(err.value)


def test_load_refuses_newer_format(saved):
    with np.load(saved) as npz:
        meta = json.loads(str(npz["__meta__"][()]))
    _rewrite(saved, __meta__=np.array(json.dumps({**meta, "format_version": FORMAT_VERSION + 1})))
    with pytest.raises(FeatprobeError, match="format_version 2.*upgrade featprobe"):
        load_head(saved)


def test_load_refuses_classes_outside_the_allow_list(saved):
    with np.load(saved) as npz:
        state = json.loads(str(npz["__state__"][()]))
    state["steps"][0]["class"] = "os.system"
    _rewrite(saved, __state__=np.array(json.dumps(state)))
    with pytest.raises(FeatprobeError, match="'os.system' is not one featprobe loads"):
        load_head(saved)


def test_load_refuses_missing_pieces(saved):
    _rewrite(saved, **{"s0.coef_": None})
    with pytest.raises(FeatprobeError, match="array 's0.coef_' is missing"):
        load_head(saved)
    _rewrite(saved, __state__=None)
    with pytest.raises(FeatprobeError, match="missing '__state__'"):
        load_head(saved)


def test_load_refuses_pickled_member(saved):
    _rewrite(saved, **{"s0.coef_": np.array([object()], dtype=object)})
    with pytest.raises(FeatprobeError, match="cannot be read as plain data"):
        load_head(saved)


def test_save_refusals(three_class, tmp_path):
    X_tr, _, y_tr, _ = three_class
    est = _fitted("logreg", False, X_tr, y_tr)
    with pytest.raises(FeatprobeError, match="unfitted"):
        save_head(tmp_path / "a.npz", make_head("linear"), {})
    with pytest.raises(FeatprobeError, match="not JSON-serialisable"):
        save_head(tmp_path / "a.npz", est, {"when": object()})
    with pytest.raises(FeatprobeError, match="'head' is reserved"):
        save_head(tmp_path / "a.npz", est, {"head": "svm"})
    with pytest.raises(FeatprobeError, match="not a registered head"):
        save_head(tmp_path / "a.npz", StandardScaler().fit(X_tr), {})
    (tmp_path / "file").write_text("")  # a file where the head's folder should be
    with pytest.raises(FeatprobeError, match="cannot create the folder"):
        save_head(tmp_path / "file" / "dir.npz", est, {})
    assert os.listdir(tmp_path) == ["file"]


def test_interrupted_save_leaves_old_file_and_no_debris(saved, monkeypatch, three_class):
    import featprobe.probe.headfile as headio

    before = saved.read_bytes()
    X_tr, _, y_tr, _ = three_class

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(headio.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_head(saved, _fitted("logreg", False, X_tr, y_tr), {})
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]
