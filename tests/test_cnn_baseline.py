"""The end-to-end CNN benchmark, on a small real image set of two visually separable classes."""

import inspect
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import featprobe.cnn_baseline as bl
from featprobe.cli import main
from featprobe.cnn_baseline import BASELINE_DEFAULTS, SmallCNN, architecture, baseline
from featprobe.data import load_dataset
from featprobe.errors import FeatprobeError
from featprobe.runs import RECORD_FIELDS, read_runs
from featprobe.runs.compare import compare
from featprobe.splits import split

N_IMAGES = 60


def _stripes(rng: np.random.Generator, vertical: bool) -> np.ndarray:
    """Noisy stripes of random size, period and phase: horizontal (class 0) or vertical (1)."""
    h, w = (int(v) for v in rng.integers(40, 64, size=2))
    period = int(rng.integers(6, 12))
    phase = int(rng.integers(0, period))
    along = np.arange(w if vertical else h)
    line = ((along + phase) // (period // 2)) % 2
    base = np.broadcast_to(line[None, :] if vertical else line[:, None], (h, w))
    img = base[..., None] * 150.0 + 50.0 + rng.normal(0.0, 30.0, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """The tutorial layout: train.csv (image_names,emergency_or_no) and images/ (PNG + JPEG)."""
    root = tmp_path_factory.mktemp("stripes")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        label = i % 2
        name = f"img{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(_stripes(rng, vertical=bool(label))).save(root / "images" / name)
        rows.append(f"{name},{label}")
    (root / "train.csv").write_text("image_names,emergency_or_no\n" + "\n".join(rows) + "\n")
    return root


def test_small_cnn_is_two_conv_blocks_and_one_dense_layer():
    model = SmallCNN(3, 32)
    kinds = [type(m) for m in model]
    block = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert kinds == block + block + [nn.Flatten, nn.Linear]
    conv1, conv2 = model[0], model[4]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (3, 25, (3, 3))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (25, 50, (3, 3))
    assert model[3].kernel_size == model[7].kernel_size == 2
    dense = model[-1]
    assert (dense.in_features, dense.out_features) == (50 * 8 * 8, 3)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    odd = SmallCNN(2, 30)  # pools round down: 30 -> 15 -> 7
    assert odd(torch.zeros(1, 3, 30, 30)).shape == (1, 2)
    assert architecture(2, 30).endswith("linear(50*7*7->2)")
    with pytest.raises(FeatprobeError, match="image_size"):
        SmallCNN(2, 3)


def test_defaults_are_exported_for_the_cli():
    params = inspect.signature(baseline).parameters
    assert {k: params[k].default for k in BASELINE_DEFAULTS} == BASELINE_DEFAULTS
    assert BASELINE_DEFAULTS["epochs"] == 15 and BASELINE_DEFAULTS["batch_size"] == 128


def test_learns_separable_set_and_appends_record_on_the_shared_split(
    stripes, tmp_path, monkeypatch, capsys
):
    evaluated = []
    real_predict = bl._predict

    def spy(model, pixels, rows, dev, batch_size):
        evaluated.append(np.array(rows))
        return real_predict(model, pixels, rows, dev, batch_size)

    monkeypatch.setattr(bl, "_predict", spy)
    cache = tmp_path / "cache"
    rec = baseline(stripes / "train.csv", image_size=32, epochs=5, batch_size=16,
                   val_fraction=0.25, seed=0, cache_dir=cache, device="cpu", workers=2)

    assert rec["val"]["accuracy"] >= 0.9
    assert rec["train"]["accuracy"] >= 0.9
    assert "loss=" in capsys.readouterr().err  # the per-epoch progress bar shows the loss

    # the same split as every head on this dataset, and the val metrics come from its val rows
    ds = load_dataset(stripes / "train.csv")
    s = split(ds.ids, ds.labels, val_fraction=0.25, seed=0)
    assert rec["split_hash"] == s.hash
    assert (rec["n_train"], rec["n_val"]) == (len(s.train), len(s.val)) == (45, 15)
    train_rows, val_rows = evaluated
    np.testing.assert_array_equal(train_rows, s.train)
    np.testing.assert_array_equal(val_rows, s.val)
    val_counts = np.bincount(ds.labels[s.val], minlength=2).tolist()
    assert [sum(row) for row in rec["val"]["confusion_matrix"]] == val_counts
    majority = np.bincount(ds.labels[s.train]).argmax()
    assert rec["majority_rate"] == pytest.approx(np.mean(ds.labels[s.val] == majority))

    # the record, as appended to <cache_dir>/runs.jsonl
    (logged,) = read_runs(cache)
    assert logged == rec
    assert set(RECORD_FIELDS) <= set(rec)
    expected = {
        "kind": "baseline", "backbone": "cnn", "weights": "none", "layer": "pixels",
        "head": "cnn", "cache": None, "cache_path": None, "standardize": False, "seed": 0,
        "val_fraction": 0.25, "n_invalid": 0, "classes": [0, 1], "sweep": None,
        "dataset_fingerprint": ds.fingerprint(),
    }
    assert {k: rec[k] for k in expected} == expected
    assert rec["params"] == {
        "image_size": 32, "epochs": 5, "batch_size": 16, "lr": 1e-3, "optimizer": "adam",
        "architecture": architecture(2, 32), "device": "cpu",
    }
    assert rec["fit_seconds"] > 0 and len(rec["epoch_losses"]) == 5


def test_same_call_twice_gives_identical_results_and_leaves_global_rng_alone(
    stripes, tmp_path, capsys
):
    kwargs = dict(image_size=16, epochs=2, batch_size=8, seed=3, val_fraction=0.25,
                  cache_dir=tmp_path, device="cpu", workers=0, progress=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = baseline(stripes / "train.csv", **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    b = baseline(stripes / "train.csv", **kwargs)
    for key in ("train", "val", "epoch_losses", "split_hash", "majority_rate"):
        assert a[key] == b[key], key
    assert a["run_id"] != b["run_id"]
    assert len(read_runs(tmp_path)) == 2
    assert capsys.readouterr().err == ""  # progress=False is silent


def test_unreadable_image_names_the_file_and_writes_no_record(stripes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(stripes, data)
    (data / "images" / "img007.png").write_bytes(b"this is not a png")
    with pytest.raises(FeatprobeError, match=r"img007\.png.*no skip"):
        baseline(data / "train.csv", image_size=16, epochs=1, cache_dir=tmp_path / "cache",
                 device="cpu", workers=0, progress=False)
    assert not (tmp_path / "cache" / "runs.jsonl").exists()


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0},
                                 {"image_size": 2}, {"device": "tpu"}])
def test_bad_arguments_are_featprobe_errors(stripes, tmp_path, bad):
    with pytest.raises(FeatprobeError):
        baseline(stripes / "train.csv", cache_dir=tmp_path, workers=0, progress=False, **bad)


def test_seeds_decode_once_and_equal_single_runs(stripes, tmp_path):
    kwargs = dict(image_size=16, epochs=2, batch_size=8, val_fraction=0.25, device="cpu",
                  workers=0, progress=False)
    r = CliRunner().invoke(main, ["baseline", str(stripes / "train.csv"), "--seeds", "1,4",
                                  "--image-size", "16", "--epochs", "2", "--batch-size", "8",
                                  "--val-fraction", "0.25", "--device", "cpu", "--workers", "0",
                                  "-q", "--cache-dir", str(tmp_path / "many")])
    assert r.exit_code == 0, r.output
    many = read_runs(tmp_path / "many")
    assert [x["seed"] for x in many] == [1, 4] and r.output.count("cnn baseline") == 2
    one = baseline(stripes / "train.csv", seed=4, cache_dir=tmp_path / "one", **kwargs)
    for key in ("train", "val", "epoch_losses", "split_hash", "val_correct"):
        assert many[1][key] == one[key], key
    df = compare(tmp_path / "many")
    assert df.loc[0, "n_seeds"] == 2 and df.loc[0, "val_acc_ci_low"] <= df.loc[0, "val_acc"]
