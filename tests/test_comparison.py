"""compare: grouping over seeds, output formats, the plot."""

import io
import json
import sys

import numpy as np
import pandas as pd
import pytest

from featprobe.errors import FeatprobeError
from featprobe.runs import append_run, make_record
from featprobe.runs.compare import compare, format_table, plot

VAL_ACC = {"logreg": [0.80, 0.84, 0.83], "svm": [0.90, 0.86, 0.91]}


def _metrics(acc: float, bal: float | None = None, f1: float | None = None) -> dict:
    # 100 val images: 70 of class 0, 30 of class 1
    return {"accuracy": acc, "balanced_accuracy": acc if bal is None else bal,
            "macro_f1": acc if f1 is None else f1,
            "confusion_matrix": [[60, 10], [5, 25]]}


def _probe(head: str, seed: int, acc: float, **over) -> dict:
    fields = dict(kind="probe", cache="abc.h5", dataset_fingerprint="f" * 64,
                  backbone="vgg16", weights="DEFAULT", layer="fc7", head=head,
                  params={"C": 1.0, "seed": seed, "device": "cpu"}, standardize=True,
                  seed=seed, val_fraction=0.1, train=_metrics(1.0), val=_metrics(acc),
                  fit_seconds=0.5 + seed)
    fields.update(over)
    return make_record(**fields)


@pytest.fixture
def records() -> list[dict]:
    recs = [_probe(head, seed, acc) for head, accs in VAL_ACC.items()
            for seed, acc in enumerate(accs)]
    recs.append(make_record(kind="baseline", dataset_fingerprint="f" * 64, params={"epochs": 15},
                            seed=0, val_fraction=0.1, train=_metrics(0.95), val=_metrics(0.85),
                            fit_seconds=40.0))
    return recs


def test_groups_seeds_mean_std_vs_numpy(records):
    df = compare(records)
    assert list(df["head"]) == ["svm", "cnn", "logreg"]  # 89.0, 85.0, 82.3
    assert len(df) == 3 and "dataset" not in df.columns
    assert df["val_acc"].is_monotonic_decreasing
    for head, accs in VAL_ACC.items():
        row = df[df["head"] == head].iloc[0]
        assert row["n_runs"] == 3 and row["seeds"] == "0,1,2"
        assert row["val_acc"] == pytest.approx(np.mean(accs))
        assert row["val_acc_std"] == pytest.approx(np.std(accs, ddof=1))
        assert row["fit_seconds"] == pytest.approx(1.5)
        assert row["params"] == "C=1"  # seed and device are not part of the configuration
        assert row["kind"] == "probe"
    base = df[df["kind"] == "baseline"].iloc[0]
    assert (base["backbone"], base["head"], base["n_runs"]) == ("cnn", "cnn", 1)
    assert np.isnan(base["val_acc_std"])
    assert base["majority_rate"] == pytest.approx(0.70)
    for column in ("backbone", "weights", "layer", "head", "params", "n_runs", "train_acc",
                   "val_acc", "val_acc_std", "val_bal_acc", "val_f1", "fit_seconds", "kind"):
        assert column in df.columns


def test_ungrouped_one_row_per_run(records):
    df = compare(records, group_seeds=False)
    assert len(df) == 7 and (df["n_runs"] == 1).all()
    assert df["run_id"].is_unique and df["val_acc"].iloc[0] == pytest.approx(0.91)


def test_params_and_standardize_split_groups(records):
    records.append(_probe("svm", 0, 0.5, params={"C": 10.0, "seed": 0}))
    records.append(_probe("svm", 0, 0.4, standardize=False))
    df = compare(records)
    svm = df[df["head"] == "svm"]
    assert sorted(svm["n_runs"]) == [1, 1, 3]
    assert set(svm["params"]) == {"C=1", "C=10"}


def test_datasets_never_pooled(records):
    records.append(_probe("svm", 0, 0.2, dataset_fingerprint="0123456789abcdef" * 4))
    df = compare(records)
    assert "dataset" in df.columns and len(df) == 4
    other = df[df["dataset"] == "0123456789ab"].iloc[0]
    assert other["n_runs"] == 1 and other["val_acc"] == pytest.approx(0.2)


def test_sweep_contributes_its_winner(records):
    sweep = {"grid": [{"lr": 0.1, "weight_decay": 0.0}, {"lr": 0.001, "weight_decay": 0.0}],
             "best": {"params": {"lr": 0.001, "weight_decay": 0.0}, "val_acc": 0.93}}
    records.append(_probe("linear", 0, 0.93, params={"epochs": 30, "seed": 0}, sweep=sweep))
    df = compare(records)
    top = df.iloc[0]
    assert top["head"] == "linear" and top["val_acc"] == pytest.approx(0.93)
    # marked as a sweep: chosen on val, never pooled with a plain run of the same params
    assert top["params"] == "epochs=30 lr=0.001 sweep=true weight_decay=0"


def test_reads_directory_file_and_env(records, tmp_path, monkeypatch):
    for r in records:
        append_run(tmp_path, r)
    expected = compare(records)
    pd.testing.assert_frame_equal(compare(tmp_path), expected)
    pd.testing.assert_frame_equal(compare(tmp_path / "runs.jsonl"), expected)
    monkeypatch.setenv("FEATPROBE_CACHE", str(tmp_path))
    pd.testing.assert_frame_equal(compare(), expected)
    (tmp_path / "no-runs-yet").mkdir()
    assert compare(tmp_path / "no-runs-yet").empty
    with pytest.raises(FeatprobeError, match="no such cache directory"):
        compare(tmp_path / "missing")


def test_table_format(records):
    df = compare(records)
    text = format_table(df, "table")
    lines = text.splitlines()
    assert len(lines) == 1 + len(df)
    assert lines[0].split()[:4] == ["backbone", "weights", "layer", "head"]
    assert "89.0 ± 2.6" in lines[1]  # svm: mean 0.89, std 0.0265
    assert "85.0" in text and "85.0 ±" not in text  # single baseline run: no ± shown
    # aligned: every column starts at the same offset on every line
    assert lines[1].index("DEFAULT") == lines[0].index("weights")
    assert lines[1].index("probe") == lines[2].index("baseline") == lines[0].index("kind")
    assert format_table(df.iloc[0:0], "table").strip() == "no runs"


def test_markdown_format(records):
    text = format_table(compare(records), "markdown")
    lines = text.splitlines()
    assert lines[0].startswith("| backbone | weights |")
    cells = [c.strip() for c in lines[1].strip("|").split("|")]
    assert all(c in ("---", "---:") for c in cells)
    assert len(cells) == lines[0].count("|") - 1
    assert len(lines) == 2 + 3
    assert "| 89.0 ± 2.6 |" in text


def test_csv_and_json_round_trip_full_precision(records):
    df = compare(records)
    back = pd.read_csv(io.StringIO(format_table(df, "csv")))
    assert list(back.columns) == list(df.columns)
    np.testing.assert_array_equal(back["val_acc"].to_numpy(), df["val_acc"].to_numpy())
    np.testing.assert_array_equal(back["val_acc_std"].to_numpy(), df["val_acc_std"].to_numpy())

    rows = json.loads(format_table(df, "json"))
    assert [r["val_acc"] for r in rows] == df["val_acc"].tolist()
    assert rows[0]["val_acc_std"] == df["val_acc_std"].iloc[0]
    base = next(r for r in rows if r["kind"] == "baseline")
    assert base["val_acc_std"] is None  # NaN written as null, so the JSON is standard


def test_unknown_format(records):
    with pytest.raises(FeatprobeError, match="unknown format 'xml'"):
        format_table(compare(records), "xml")


def test_plot_writes_png(records, tmp_path):
    out = plot(compare(records), tmp_path / "figs" / "cmp.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_errors(records, tmp_path, monkeypatch):
    with pytest.raises(FeatprobeError, match="nothing to plot"):
        plot(compare([]), tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(FeatprobeError, match=r"pip install 'featprobe\[plot\]'"):
        plot(compare(records), tmp_path / "x.png")
