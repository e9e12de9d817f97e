"""Corrupt caches and head files: truncated, bit-flipped and hand-edited files are refused with
one clear line (exit 2), never a traceback, never silently read as something else.

Complements tests/test_extraction.py (complete=False, future format_version, one truncation,
one flipped feature value) and tests/test_heads.py (unreadable head files, future format,
classes outside the allow-list, missing arrays, pickled members).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from featprobe.cache import FeatureCache, verify
from featprobe.cli import main
from featprobe.errors import FeatprobeError
from featprobe.extraction import extract
from featprobe.probe.fit import fit
from featprobe.probe.headfile import _digest


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    rows = make_images(root / "images", 30, labels=[i % 3 for i in range(30)])
    lines = ["image_names,label"] + [f"{name},{('a', 'b', 'c')[i % 3]}"
                                     for i, (name, _) in enumerate(rows)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    cache = extract(root / "train.csv", backbone="resnet18", weights="none", image_size=32,
                    layers="avgpool,layer4", dtype="float32", batch_size=4, workers=0,
                    device="cpu", cache_dir=root / "c", progress=False)
    head = root / "h.npz"
    fit(cache, head="logreg", layer="avgpool", save=head, runs_dir=root)
    return {"root": root, "cache": cache.path, "head": head}


def _one_line_error(result, *expect):
    out = result.output
    assert "Traceback" not in out
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (out,
                                                                               result.exception)
    lines = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, out
    for text in expect:
        assert text in lines[0], lines[0]


def _same_as(path: Path, orig: FeatureCache) -> bool:
    c = FeatureCache(path)
    return (c.ids == orig.ids and c.classes == orig.classes and c.meta == orig.meta
            and np.array_equal(c.labels, orig.labels) and np.array_equal(c.valid, orig.valid)
            and all(np.array_equal(c.features(k), orig.features(k)) for k in orig.layers))


def test_truncated_cache_refused_at_every_length(made, tmp_path):
    data = made["cache"].read_bytes()
    lengths = sorted({0, 1, 7, 8, 100, 511, 512, 2047, 2048, len(data) - 1,
                      *np.linspace(0, len(data) - 1, 60).astype(int).tolist()})
    refused = 0
    for n in lengths:
        p = tmp_path / "t.h5"
        p.write_bytes(data[:n])
        with pytest.raises(FeatprobeError):
            verify(p)
        refused += 1
    assert refused == len(lengths) >= 60
    print(f"\ntruncated caches: {refused}/{len(lengths)} lengths refused")
    _one_line_error(CliRunner().invoke(main, ["info", str(p)]), "not a readable featprobe cache")


def test_byte_flips_are_refused_or_change_nothing(made, tmp_path):
    """Flip one byte at 250 random offsets: verify must refuse the file, or the flip hit bytes
    nothing reads (unused space) and every array and attribute is exactly as before."""
    orig = FeatureCache(made["cache"])
    data = made["cache"].read_bytes()
    rng = np.random.default_rng(0)
    counts = {"refused": 0, "unchanged": 0}
    for off in rng.choice(len(data), 250, replace=False):
        b = bytearray(data)
        b[off] ^= 0xFF
        p = tmp_path / "f.h5"
        p.write_bytes(bytes(b))
        try:
            verify(p)
        except FeatprobeError:
            counts["refused"] += 1
            continue
        assert _same_as(p, orig), f"byte {off} changed the cache and verify did not notice"
        counts["unchanged"] += 1
    assert sum(counts.values()) == 250 and counts["refused"] > 150
    print(f"\nbyte flips: {counts}")


def _edit_labels(f, value):
    x = f["labels"][()]
    x[0] = value
    f["labels"][...] = x


def _replace(f, name, data):
    del f[name]
    f[name] = data


EDITS = {
    "label_out_of_range": (lambda f: _edit_labels(f, 7), "labels outside the class list"),
    "label_negative": (lambda f: _edit_labels(f, -1), "labels outside the class list"),
    "fewer_feature_rows": (lambda f: _replace(f, "features/avgpool",
                                              f["features/avgpool"][()][:-3]),
                           "features/avgpool has shape (27, 512)"),
    "fewer_ids": (lambda f: _replace(f, "ids", f["ids"][()][:-2]), "ids 28"),
    "fewer_valid": (lambda f: _replace(f, "valid", f["valid"][()][:-1]), "labels/valid"),
    "features_1d": (lambda f: _replace(f, "features/avgpool", np.zeros(30, "f4")),
                    "shape (30,)"),
    "classes_not_json": (lambda f: f["labels"].attrs.__setitem__("classes", "{nope"),
                         "not a readable featprobe cache"),
    "classes_empty": (lambda f: f["labels"].attrs.__setitem__("classes", "[]"),
                      "class list is empty"),
    "classes_dict": (lambda f: f["labels"].attrs.__setitem__("classes", '{"a": 1}'),
                     "class list is empty or not a list"),
    "layers_unknown": (lambda f: f.attrs.__setitem__("layers", '["fc9"]'),
                       "not a readable featprobe cache"),
    "layers_number": (lambda f: f.attrs.__setitem__("layers", 5),
                      "not a readable featprobe cache"),
    "format_version_text": (lambda f: f.attrs.__setitem__("format_version", "abc"),
                            "not a readable featprobe cache"),
    "format_version_future": (lambda f: f.attrs.__setitem__("format_version", 2),
                              "newer than this featprobe reads"),
    "complete_as_text": (lambda f: f.attrs.__setitem__("complete", "False"), "incomplete"),
    "complete_missing": (lambda f: f.attrs.__delitem__("complete"), "incomplete"),
    "ids_missing": (lambda f: f.__delitem__("ids"), "not a readable featprobe cache"),
    "features_missing": (lambda f: f.__delitem__("features/avgpool"),
                         "not a readable featprobe cache"),
}
VERIFY_ONLY = {  # these open (the file is self-consistent) but `verify` must refuse them
    "n_valid_wrong": (lambda f: f.attrs.__setitem__("n_valid", 3), "n_valid says 3"),
    "backbone_renamed": (lambda f: f.attrs.__setitem__("backbone", "resnet50"),
                         "do not hash to the recorded cache_key"),
    "preprocessing_edited": (lambda f: f.attrs.__setitem__("preprocessing", "{}"),
                             "do not hash to the recorded cache_key"),
    "attribute_deleted": (lambda f: f.attrs.__delitem__("weights_sha256"),
                          "attributes missing: weights_sha256"),
    "feature_value_changed": (lambda f: f["features/layer4"].__setitem__((2, 5), 9.5),
                              "features/layer4 does not match its recorded SHA-256"),
}


@pytest.mark.parametrize("case", [*EDITS, *VERIFY_ONLY])
def test_hand_edited_cache_is_refused_in_one_line(made, tmp_path, case):
    edit, expect = EDITS.get(case) or VERIFY_ONLY[case]
    p = tmp_path / made["cache"].name
    shutil.copy(made["cache"], p)
    with h5py.File(p, "a") as f:
        edit(f)
    commands = [["verify", str(p)]]
    if case in EDITS:
        commands += [["info", str(p)], ["fit", str(p), "--runs-dir", str(tmp_path)]]
    for cmd in commands:
        _one_line_error(CliRunner().invoke(main, cmd), expect)
    assert not (tmp_path / "runs.jsonl").exists()


def _head_with(src: Path, dst: Path, meta=None, state=None, **arrays) -> Path:
    with np.load(src, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    m, s = json.loads(str(out["__meta__"][()])), json.loads(str(out["__state__"][()]))
    if meta:
        out["__meta__"] = np.array(json.dumps({**m, **meta}) if isinstance(meta, dict) else meta)
    if state:
        out["__state__"] = np.array(state(s) if callable(state) else state)
    out.update(arrays)
    out = {k: v for k, v in out.items() if v is not None}
    out["__sha256__"] = np.array(_digest(out))  # an editor who knows the format: the
    with open(dst, "wb") as f:  # checks behind the digest are what is tested here
        np.savez(f, **{k: v for k, v in out.items() if v is not None})
    return dst


def _step_params(s):
    s["steps"][0]["params"]["bogus"] = 1
    return json.dumps(s)


HEADS = {
    "meta_not_json": (dict(meta="{not json"), "not a featprobe head file (bad metadata)"),
    "meta_a_list": (dict(meta="[1, 2]"), "not a featprobe head file"),
    "state_not_json": (dict(state="nope"), "not a featprobe head file"),
    "n_features_wrong": (dict(meta={"n_features": 100}), "expects 100 features"),
    "n_features_text": (dict(meta={"n_features": "512"}), "'n_features' is '512'"),
    "coef_wrong_dim": ({"s0.coef_": np.zeros((3, 100))}, "expects 512 features"),
    "coef_1d": ({"s0.coef_": np.zeros(5)}, "expects 512 features"),
    "coef_missing": ({"s0.coef_": None}, "array 's0.coef_' is missing"),
    "classes_fewer": (dict(meta={"classes": ["a", "b"]}), "do not index the 2 classes"),
    "classes_text": (dict(meta={"classes": "abc"}), "'classes' is not a non-empty list"),
    "estimator_classes_more": ({"s0.classes_": np.arange(5)}, "do not index the 3 classes"),
    "preprocessing_empty": (dict(meta={"preprocessing": {}}), "'preprocessing' is not a valid"),
    "preprocessing_text": (dict(meta={"preprocessing": "abc"}), "'preprocessing' is not a valid"),
    "dtype_unknown": (dict(meta={"dtype": "int3"}), "unknown dtype 'int3'"),
    "backbone_unknown": (dict(meta={"backbone": "resnet19"}), "unknown backbone 'resnet19'"),
    "weights_unknown": (dict(meta={"weights": "IMAGENET9"}), "unknown weights 'IMAGENET9'"),
    "format_version_text": (dict(meta={"format_version": "1"}), "bad format_version"),
    "params_unknown": (dict(state=_step_params), "cannot rebuild"),
    "class_not_allowed": (dict(state=lambda s: json.dumps(
        {**s, "steps": [{**s["steps"][0], "class": "builtins.eval"}]})),
        "'builtins.eval' is not one featprobe loads"),
}


@pytest.mark.parametrize("case", HEADS)
def test_tampered_head_file_is_refused_in_one_line(made, tmp_path, case):
    change, expect = HEADS[case]
    kw = dict(change) if "meta" in change or "state" in change else {}
    arrays = {} if kw else change
    p = _head_with(made["head"], tmp_path / "h.npz", **kw, **arrays)
    r = CliRunner().invoke(main, ["predict", str(p), str(made["root"] / "train.csv"), "--out",
                                  str(tmp_path / "p.csv"), "-q", "--workers", "0", "--device",
                                  "cpu"])
    _one_line_error(r, expect)
    assert not (tmp_path / "p.csv").exists()


def test_non_finite_features_are_refused_by_fit(tmp_path):
    """float16 storage turns values above 65504 into inf: a consistent file (verify passes)
    whose features `fit` must refuse in one line rather than fail inside a head."""
    from featprobe.cache import write_arrays

    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    x[4, 2] = 70000.0
    cache = write_arrays(tmp_path / "inf.h5", [f"{i}.png" for i in range(30)],
                         np.arange(30) % 3, ["a", "b", "c"], {"fc": x}, dtype="float16")
    assert np.isinf(cache.features("fc")).sum() == 1 and verify(cache.path)["rows"] == 30
    for head in ("logreg", "linear"):
        r = CliRunner().invoke(main, ["fit", str(cache.path), "--head", head, "--runs-dir",
                                      str(tmp_path)])
        _one_line_error(r, "features/fc has NaN or inf values in 1 row(s)")
    assert not (tmp_path / "runs.jsonl").exists()
