"""Issue 19, a newcomer's first hour: the tests that would have caught what they met (the docs
themselves run in tests/test_docs.py). Real ELPV images, real random-init torchvision models."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

import featprobe as fp
from featprobe.cli import main
from featprobe.errors import FeatprobeError

BAR = re.compile(r"(\d+)/(\d+) \[")


@pytest.fixture(scope="module")
def elpv(tmp_path_factory) -> Path:
    """12 real ELPV solar-cell images (300x300 grayscale PNG), 8 ok / 4 defective."""
    from featprobe.demo import elpv_labels

    rows = elpv_labels()
    ok = [r for r in rows if r[1] < 0.5][:8]
    bad = [r for r in rows if r[1] >= 0.5][:4]
    root = tmp_path_factory.mktemp("elpv")
    (root / "images").mkdir()
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_names", "defective"])
        for src, p, _ in sorted(ok + bad):
            shutil.copyfile(src, root / "images" / Path(src).name)
            w.writerow([Path(src).name, int(p >= 0.5)])
    return root / "train.csv"


def _extract(csv_path, cache_dir, **kw):
    kw = {"backbone": "mobilenet_v2", "weights": "none", "image_size": 64, "progress": False,
          **kw}
    return fp.extract(csv_path, cache_dir=cache_dir, **kw)


@pytest.fixture(scope="module")
def control(elpv, tmp_path_factory):
    """The random-init control as extracted by default (--dtype auto)."""
    return _extract(elpv, tmp_path_factory.mktemp("control"))


# item 1: the random-init control is not empty, and degenerate features are flagged


def test_random_init_control_keeps_its_features_by_default(elpv, control, tmp_path, caplog):
    X = control.features()
    assert control.meta["dtype"] == "float32" and X.dtype == np.float32
    assert np.isfinite(X).all() and (X != 0).mean() > 0.5  # 0.1.0 stored 100% zeros
    assert (X.max(axis=0) > X.min(axis=0)).mean() > 0.5  # columns vary across images
    # float16 asked for: the same values, every one rounded to 0, and said so
    with caplog.at_level(logging.WARNING, logger="featprobe"):
        f16 = _extract(elpv, tmp_path, dtype="float16")
    assert f16.meta["dtype"] == "float16" and not f16.features().any()
    assert "float16 storage lost 100.0%" in caplog.text
    # pretrained weights stay float16 under auto
    from featprobe.policy import resolve_dtype

    assert resolve_dtype("auto", "torchvision") == "float16"
    assert resolve_dtype("auto", "file") == "float16"


def test_fit_and_compare_flag_degenerate_features_in_one_line(elpv, control, tmp_path):
    f16 = _extract(elpv, tmp_path, dtype="float16")
    runner = CliRunner()
    r = runner.invoke(main, ["fit", str(f16.path), "--head", "logreg"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "every feature value is 0" in warnings[0]
    rec = json.loads((f16.directory / "runs.jsonl").read_text().splitlines()[-1])
    assert rec["degenerate"] == "every feature value is 0"
    assert rec["val"]["accuracy"] == rec["majority_rate"]  # all it can do
    r = runner.invoke(main, ["compare", str(f16.directory)])
    assert r.exit_code == 0
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and f16.path.name in warnings[0], r.stderr
    # the float32 control: no warning, recorded as not degenerate
    r = runner.invoke(main, ["fit", str(control.path), "--head", "logreg", "--standardize",
                             "--runs-dir", str(tmp_path / "ok")])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
    rec = json.loads((tmp_path / "ok" / "runs.jsonl").read_text())
    assert rec["degenerate"] is None


def test_degenerate_features_rules():
    from featprobe.probe.fit import degenerate_features

    rng = np.random.default_rng(0)
    assert degenerate_features(np.zeros((5, 3), np.float16)) == "every feature value is 0"
    assert degenerate_features(np.ones((5, 3), np.float32)) == "all 3 features are constant"
    X = rng.standard_normal((5, 3)).astype(np.float32)
    X[:, 0] = 0  # a dead unit is normal
    assert degenerate_features(X) is None


# item 3: output files create their folders, checked before the work; predictions.csv stays


def test_save_out_and_plot_create_their_folders(control, elpv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    head = tmp_path / "heads" / "deep" / "logreg.npz"
    r = runner.invoke(main, ["fit", str(control.path), "--head", "logreg", "--save", str(head),
                             "--runs-dir", "runs"])
    assert r.exit_code == 0 and head.is_file(), r.output
    r = runner.invoke(main, ["predict", str(head), str(elpv), "-q", "--out", "out/p/pred.csv"])
    assert r.exit_code == 0 and (tmp_path / "out/p/pred.csv").is_file(), r.output
    r = runner.invoke(main, ["compare", "runs", "--plot", "plots/a/compare.png"])
    assert r.exit_code == 0 and (tmp_path / "plots/a/compare.png").stat().st_size > 1000


def test_a_bad_save_path_is_refused_before_the_fit(control, tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be")
    r = CliRunner().invoke(main, ["fit", str(control.path), "--head", "mlp", "--save",
                                  str(tmp_path / "taken" / "h.npz"), "--runs-dir", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.startswith("error: cannot create the folder for")
    assert "train acc" not in r.output and not (tmp_path / "runs.jsonl").exists()


def test_a_save_that_fails_after_the_fit_keeps_the_record(control, tmp_path, monkeypatch):
    import featprobe.probe.fit as fit_module

    def broken(*a, **k):
        raise FeatprobeError("disk gone")

    monkeypatch.setattr(fit_module, "save_fitted", broken)
    with pytest.raises(FeatprobeError, match="disk gone"):
        fit_module.fit(control, head="logreg", save=tmp_path / "h.npz", runs_dir=tmp_path)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1


def test_predict_without_out_never_replaces_predictions_csv(control, elpv, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    head = tmp_path / "h.npz"
    fp.fit(control, head="logreg", save=head, runs_dir=tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["predict", str(head), str(elpv), "-q"])
    assert r.exit_code == 0 and r.stdout.splitlines()[-1] == "predictions.csv"
    first = (tmp_path / "predictions.csv").read_text()
    (tmp_path / "predictions.csv").write_text("mine\n")
    r = runner.invoke(main, ["predict", str(head), str(elpv), "-q"])
    assert r.exit_code == 2 and "--out" in r.stderr and r.stderr.count("\n") == 1
    assert (tmp_path / "predictions.csv").read_text() == "mine\n"
    r = runner.invoke(main, ["predict", str(head), str(elpv), "-q", "--out", "predictions.csv"])
    assert r.exit_code == 0 and (tmp_path / "predictions.csv").read_text() == first


# item 4: every bar starts at 0 and ends at its total


def _bar_counts(text: str, desc: str) -> list[tuple[int, int]]:
    lines = [seg for seg in re.split(r"[\r\n]", text) if desc in seg]
    return [(int(a), int(b)) for seg in lines for a, b in BAR.findall(seg)]


def test_shard_bar_counts_its_own_rows_from_zero(elpv, tmp_path, capsys):
    capsys.readouterr()
    _extract(elpv, tmp_path, batch_size=4, progress=True, shard="0/2")  # parts 0, 2: 8 rows
    counts = _bar_counts(capsys.readouterr().err, "extract mobilenet_v2")
    assert counts[0] == (0, 8) and counts[-1] == (8, 8), counts
    _extract(elpv, tmp_path, batch_size=4, progress=True, shard="1/2")  # part 1: 4 rows, merges
    counts = _bar_counts(capsys.readouterr().err, "extract mobilenet_v2")
    assert counts[0] == (0, 4) and counts[-1] == (4, 4), counts


def test_out_of_core_fit_shows_a_bar_per_epoch(tmp_path, capsys):
    from featprobe.cache import write_arrays

    rng = np.random.default_rng(0)
    y = np.arange(3000) % 2
    X = rng.standard_normal((3000, 64)).astype(np.float32) + y[:, None]
    cache = write_arrays(tmp_path / "c.h5", [f"{i}.jpg" for i in range(3000)], y, [0, 1],
                         {"f": X})
    capsys.readouterr()
    rec = fp.fit(cache, head="linear", epochs=2, max_memory="200KB", progress=True,
                 runs_dir=tmp_path)
    assert rec["out_of_core"] is not None
    err = capsys.readouterr().err
    for epoch in (1, 2):
        counts = _bar_counts(err, f"out-of-core epoch {epoch}:")
        assert counts[0] == (0, rec["n_train"]) and counts[-1][0] == rec["n_train"], counts


# item 6: the tutorial's calls and messages


def test_prepare_data_takes_a_str_and_n(tmp_path, monkeypatch):
    from featprobe.demo import prepare_data

    monkeypatch.chdir(tmp_path)
    out = prepare_data("demo", n=10)
    assert out == Path("demo/data/train.csv")
    rows = out.read_text().splitlines()
    assert rows[0] == "image_names,defective" and len(rows) == 11
    assert len(list(Path("demo/data/images").glob("*.png"))) == 10


def test_duplicate_ids_are_named_plainly():
    from featprobe.splits import split

    with pytest.raises(FeatprobeError) as e:
        split(np.array(["a", "a", "b", "c"]), np.array([0, 0, 1, 1]))
    assert "'a'" in str(e.value) and "np.str_" not in str(e.value)


def test_missing_vgg16_weights_offline_point_to_weights_add(elpv, tmp_path, monkeypatch):
    import torch.hub

    def offline(url, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FeatprobeError) as e:
        fp.extract(elpv, backbone="vgg16", cache_dir=tmp_path, progress=False)
    assert "featprobe weights add" in str(e.value) and "vgg16-397923af.pth" in str(e.value)


# item 7: a CNN that has not learnt says so


def test_cnn_baseline_says_when_it_has_not_converged(elpv, tmp_path, caplog):
    # one real image under 12 names, 8 labelled 0 and 4 labelled 1: whatever the CNN learns, it
    # answers the same class for every row, so it can never beat the majority on train
    src = next((elpv.parent / "images").iterdir())
    (tmp_path / "images").mkdir()
    lines = ["image_names,label"]
    for i in range(12):
        shutil.copyfile(src, tmp_path / "images" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,{int(i >= 8)}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="featprobe"):
        rec = fp.baseline(tmp_path / "t.csv", image_size=16, epochs=2, cache_dir=tmp_path,
                          progress=False, val_fraction=0.25)
    counts = np.sum(rec["train"]["confusion_matrix"], axis=1)  # true class counts, train rows
    assert rec["train"]["accuracy"] <= counts.max() / counts.sum() and rec["converged"] is False
    assert "has not converged" in caplog.text
    assert json.loads((tmp_path / "runs.jsonl").read_text())["converged"] is False


def test_cnn_baseline_that_learns_is_converged(tmp_path, caplog):
    rows = make_images(tmp_path / "images", 20, size=16)
    (tmp_path / "t.csv").write_text("image_names,label\n" + "".join(f"{n},{c}\n" for n, c in rows))
    with caplog.at_level(logging.WARNING, logger="featprobe"):
        rec = fp.baseline(tmp_path / "t.csv", image_size=16, epochs=10, cache_dir=tmp_path,
                          progress=False)
    assert rec["train"]["accuracy"] == 1.0 and rec["converged"] is True
    assert "converged" not in caplog.text
