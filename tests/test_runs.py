"""Run records, metrics and the concurrent, append-only runs log."""

import json
import multiprocessing as mp
import uuid
from datetime import datetime

import numpy as np
import pytest

from featprobe.errors import FeatprobeError
from featprobe.runs import (
    RECORD_FIELDS,
    append_run,
    compute_metrics,
    make_record,
    read_runs,
)


def test_compute_metrics_against_hand_counts():
    y_true = ["cat", "cat", "cat", "dog", "dog", "emu"]
    y_pred = ["cat", "cat", "dog", "dog", "cat", "emu"]
    m = compute_metrics(y_true, y_pred, ["emu", "dog", "cat"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1_cat, f1_dog, f1_emu = 2 * 2 / (2 * 2 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1), 1.0
    assert m["macro_f1"] == pytest.approx((f1_cat + f1_dog + f1_emu) / 3)
    # rows = true, cols = pred, in the given label order (emu, dog, cat)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]
    json.dumps(m)  # plain Python only
    assert all(type(v) in (int, float) for v in (m["accuracy"], m["n"]))


def test_compute_metrics_int_labels_and_empty():
    m = compute_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), [0, 1, 2])
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    empty = compute_metrics([], [], [0, 1])
    assert empty["accuracy"] is None and empty["confusion_matrix"] == [[0, 0], [0, 0]]


def test_make_record_fills_schema():
    rec = make_record(kind="probe", backbone="vgg16", layer="fc7", head="logreg",
                      params={"C": np.float64(0.5)}, seed=np.int64(2), n_train=np.int32(9),
                      fit_seconds=float("nan"), extra_field="kept")
    assert set(RECORD_FIELDS) <= set(rec)
    assert rec["extra_field"] == "kept"
    assert len(rec["run_id"]) == 32 and uuid.UUID(hex=rec["run_id"]).version == 4
    assert datetime.fromisoformat(rec["time"]).utcoffset().total_seconds() == 0
    assert set(rec["versions"]) == {"featprobe", "torch", "torchvision", "sklearn", "numpy",
                                    "python"}
    from featprobe import __version__

    assert rec["versions"]["featprobe"] == __version__
    assert rec["params"] == {"C": 0.5} and type(rec["seed"]) is int
    assert rec["fit_seconds"] is None and rec["sweep"] is None and rec["cache"] is None
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    assert make_record()["run_id"] != rec["run_id"]


def test_make_record_baseline_defaults_and_kind_check():
    rec = make_record(kind="baseline", params={"epochs": 15})
    assert (rec["backbone"], rec["weights"], rec["layer"], rec["head"]) == (
        "cnn", "none", "pixels", "cnn")
    with pytest.raises(ValueError, match="kind"):
        make_record(kind="linear")


def test_append_and_read_roundtrip(tmp_path):
    records = [make_record(kind="probe", seed=i, classes=["ä", "b"]) for i in range(3)]
    for r in records:
        path = append_run(tmp_path / "new" / "dir", r)
    assert path == tmp_path / "new" / "dir" / "runs.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    assert read_runs(path.parent) == records
    assert read_runs(path) == records


def test_read_missing_is_empty(tmp_path):
    assert read_runs(tmp_path) == []
    assert read_runs(tmp_path / "nothing" / "runs.jsonl") == []


def _writer(directory: str, worker: int, n: int) -> None:
    for i in range(n):
        # a few KiB per line, so interleaving would show if the lock or O_APPEND failed
        append_run(directory, {"worker": worker, "i": i, "pad": "x" * (2000 + 97 * worker)})


def test_concurrent_appends_never_interleave(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 160
    records = [json.loads(line) for line in lines]  # every line whole, valid JSON
    assert sorted((r["worker"], r["i"]) for r in records) == [
        (w, i) for w in range(8) for i in range(20)]
    for r in records:
        assert r["pad"] == "x" * (2000 + 97 * r["worker"])
    # each writer's own records stay in order
    for w in range(8):
        assert [r["i"] for r in records if r["worker"] == w] == list(range(20))


def test_corrupted_line_named_and_file_untouched(tmp_path):
    for i in range(2):
        append_run(tmp_path, {"i": i})
    path = tmp_path / "runs.jsonl"
    with open(path, "a") as fh:
        fh.write("this is not json\n")
    append_run(tmp_path, {"i": 3})
    before = path.read_bytes()
    with pytest.raises(FeatprobeError, match=r"runs\.jsonl:3: corrupted run record"):
        read_runs(tmp_path)
    assert path.read_bytes() == before


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(FeatprobeError, match=r"runs\.jsonl:2: .*list, not an object"):
        read_runs(path)


def test_a_torn_last_line_is_skipped_and_cut_by_the_next_append(tmp_path, caplog):
    append_run(tmp_path, {"i": 0})
    path = tmp_path / "runs.jsonl"
    with open(path, "a") as fh:
        fh.write('{"i": 1, "val": {"acc')  # writer killed mid-write
    assert read_runs(tmp_path) == [{"i": 0}]  # every whole run kept
    assert "runs.jsonl:2: skipped an incomplete last line" in caplog.text
    append_run(tmp_path, {"i": 2})  # cuts the torn line (its writer is gone), then appends
    assert path.read_text() == '{"i": 0}\n{"i": 2}\n'
    assert "removed an incomplete last line" in caplog.text
    assert read_runs(tmp_path) == [{"i": 0}, {"i": 2}]


def test_complete_last_line_without_newline_is_fine(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"i": 0}\n\n{"i": 1}')
    assert read_runs(path) == [{"i": 0}, {"i": 1}]
