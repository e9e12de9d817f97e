"""Files written by featprobe 0.1.0 keep working: its cache opens, verifies and fits; its head
files load and predict the labels it predicted, probabilities within 1e-4; a head fitted now on
its cache equals the one it fitted (tests/fixtures/make_v0_1_0.py made the fixtures)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featprobe.cache import FeatureCache, verify
from featprobe.prediction import predict
from featprobe.probe.fit import fit
from featprobe.probe.headfile import load_head

OLD = Path(__file__).parent / "fixtures" / "v0_1_0"
EXPECTED = json.loads((OLD / "expected.json").read_text())
HEADS = {"linear": ("linear", True, {"min_steps": 0}),  # 0.1.0 had no min_steps
         "logreg": ("logreg", False, {}),
         "svm": ("svm", True, {}), "mlp": ("mlp", True, {"hidden": 32, "epochs": 10})}


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A copy of the fixtures (fits append to runs.jsonl beside the cache)."""
    root = tmp_path_factory.mktemp("v0_1_0")
    shutil.copytree(OLD, root, dirs_exist_ok=True)
    return root


def test_the_0_1_0_cache_opens_and_verifies(old):
    cache = FeatureCache(old / "cache.h5")
    assert len(cache) == 36 and cache.classes == ["cat", "dog", "emu"]
    assert cache.meta["featprobe_version"] == "0.1.0"
    assert verify(old / "cache.h5")["checksums"] == {"rows": True, "avgpool": True}


@pytest.mark.parametrize("stem", list(HEADS))
def test_0_1_0_head_files_predict_as_they_did(old, stem):
    df, _ = predict(old / f"{stem}.npz", old / "train.csv", device="cpu", workers=0,
                    progress=False)
    want = EXPECTED[stem]
    assert df["label"].astype(str).tolist() == want["labels"]
    if stem == "svm":  # LinearSVC has no probabilities
        assert df["probability"].isna().all()
    else:
        np.testing.assert_allclose(df["probability"], want["probability"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("stem", list(HEADS))
def test_fitting_the_0_1_0_cache_gives_what_0_1_0_gave(old, stem):
    head, standardize, params = HEADS[stem]
    rec = fit(old / "cache.h5", head=head, standardize=standardize, seed=0, record=False,
              save=old / f"new-{stem}.npz", **params)
    assert rec["train"]["accuracy"] == pytest.approx(EXPECTED[stem]["train_accuracy"])
    assert rec["val"]["accuracy"] == pytest.approx(EXPECTED[stem]["val_accuracy"])
    new, _ = load_head(old / f"new-{stem}.npz")
    was, _ = load_head(old / f"{stem}.npz")
    X = FeatureCache(old / "cache.h5").features().astype(np.float32)
    np.testing.assert_array_equal(new.predict(X), was.predict(X))
    if hasattr(was, "predict_proba"):
        # autograd + torch.optim (now) vs the hand-written step (0.1.0): 2.6e-8 apart, measured
        np.testing.assert_allclose(new.predict_proba(X), was.predict_proba(X), atol=1e-5)


def test_the_0_1_0_python_api_names_still_import():
    import featprobe as fp
    from featprobe.heads import HEADS, LinearHead, make_head, sweep_linear, sweep_logreg  # noqa

    assert fp.heads.LinearHead is LinearHead and fp.heads.make_head is make_head
    assert callable(fp.extract) and callable(fp.fit) and callable(fp.compare)
    assert callable(fp.predict) and callable(fp.baseline)
    import featprobe.cnn_baseline  # noqa: F401
    import featprobe.prediction  # noqa: F401  (importing a module must not shadow fp.predict)
    assert callable(fp.predict) and callable(fp.baseline)
