"""The CLI on the happy path: info, list, backbones, heads, baseline, extract's stdout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from featprobe.cli import main


def _data(root: Path, n: int = 24) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image_names,emergency_or_no"]
    for i in range(n):
        a = (rng.random((24, 24, 3)) * 60).astype(np.uint8)
        a[..., 2 * (i % 2)] += 180
        Image.fromarray(a).save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def test_extract_info_list(tmp_path):
    csv = _data(tmp_path / "d")
    args = ["extract", str(csv), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--cache-dir", str(tmp_path / "c"), "--workers", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]  # the last line on stdout is the cache
    assert Path(path).is_file() and path.endswith(".h5")
    r = CliRunner().invoke(main, ["info", path])
    assert r.exit_code == 0
    # random init is stored in float32 (--dtype auto): float16 would round it to 0
    for word in ("complete", "True", "avgpool", "(24, 512)", "float32", "resnet18", "valid"):
        assert word in r.output
    facts = json.loads(CliRunner().invoke(main, ["info", path, "--json"]).output)
    assert facts["rows"] == 24 and facts["class_counts"] == {"0": 12, "1": 12}
    assert facts["layers"]["avgpool"] == {"shape": [24, 512], "dtype": "float32"}
    r = CliRunner().invoke(main, ["list", str(tmp_path / "c")])
    assert r.exit_code == 0 and "complete" in r.output and "24/24 valid" in r.output


def test_backbones_and_heads_listing():
    r = CliRunner().invoke(main, ["backbones"])
    assert r.exit_code == 0
    assert "pool5 (25088)" in r.output and "fc7 (4096)" in r.output
    assert "mobilenet_v2" in r.output and "efficientnet_b0" in r.output
    r = CliRunner().invoke(main, ["heads"])
    assert r.exit_code == 0
    for name in ("linear", "mlp", "logreg", "svm", "svm-rbf"):
        assert name in r.output


def test_baseline_cli_records_run(tmp_path):
    csv = _data(tmp_path / "d", n=40)
    r = CliRunner().invoke(main, ["baseline", str(csv), "--image-size", "16", "--epochs", "2",
                                  "--cache-dir", str(tmp_path / "c"), "-q", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "val acc" in r.output and "cnn baseline" in r.output
    rec = json.loads((tmp_path / "c" / "runs.jsonl").read_text().splitlines()[0])
    assert rec["kind"] == "baseline" and rec["params"]["epochs"] == 2
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "c")])
    assert r.exit_code == 0 and "cnn" in r.output


def test_group_quiet_and_verbose_set_what_reaches_stderr(tmp_path):
    """Notes reach stderr through logging: shown by default, gone with `featprobe -q` (which
    also drops progress bars); stdout stays the cache path either way."""
    csv = _data(tmp_path / "d", n=8)
    base = ["extract", str(csv), "--backbone", "resnet18", "--weights", "none", "--image-size",
            "32", "--cache-dir", str(tmp_path / "c"), "--workers", "0", "--batch-size", "2"]
    first = CliRunner().invoke(main, [*base, "--shard", "0/2"])
    assert first.exit_code == 0, first.output
    assert "parts are still to come" in first.stderr and "img" in first.stderr  # note, bar
    last = CliRunner().invoke(main, ["-q", *base, "--shard", "1/2"])
    assert last.exit_code == 0, last.output
    assert last.stderr == "" and last.stdout.strip().endswith(".h5")  # merged, silently
    loud = CliRunner().invoke(main, ["-v", "fit", last.stdout.strip(), "--val-fraction", "0.25"])
    assert loud.exit_code == 0 and "val acc" in loud.stdout
