"""The CLI's contract for bad input: exit code 2, one ``error: ...`` line, no traceback, and
nothing built or written (no model, no cache directory) before the input has been checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from conftest import make_images, write_csv

from featprobe.cli import main

HEADER = "image_names,emergency_or_no"
FAST = ["--weights", "none", "--backbone", "resnet18", "--image-size", "32", "-q"]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model at all is a failure here: bad input must be caught first."""
    import featprobe.extraction.backbones

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was rejected")

    monkeypatch.setattr(featprobe.extraction.backbones, "build_model", refuse)


def _assert_one_line_error(result, match: str | None = None, click_usage: bool = False):
    out = result.output + result.stderr
    assert "Traceback" not in out
    assert result.exit_code == 2, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines, "nothing on stderr"
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    if click_usage:  # click's own usage errors, in our format, pointing at the right --help
        assert lines[0].endswith(" --help)") and "(see: " in lines[0], lines
    if match is not None:
        assert match in lines[-1], lines[-1]
    return lines[-1]


def _no_cache(cache_dir: Path):
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), list(cache_dir.rglob("*"))


def _extract(*args, cache_dir: Path):
    return CliRunner().invoke(main, ["extract", *FAST, "--cache-dir", str(cache_dir), *args])


@pytest.fixture
def csv_dir(tmp_path) -> Path:
    make_images(tmp_path / "images", 4)
    return tmp_path


def _write(tmp_path: Path, text: str, name: str = "train.csv") -> str:
    return str(write_csv(tmp_path / name, text))


GOOD = f"{HEADER}\nimg000.png,0\nimg001.png,1\nimg002.png,0\nimg003.png,1\n"

# (csv text or None for GOOD, extra args, text the one error line must contain)
CASES = {
    "missing_files": (f"{HEADER}\nimg000.png,0\nlost1.png,1\nlost2.png,0\n", [],
                      "2 of 3 images not found in"),
    "duplicate_ids": (f"{HEADER}\nimg000.png,0\nimg001.png,1\nimg000.png,1\n", [],
                      "duplicate image names: img000.png"),
    "unknown_label_col": (None, ["--label-col", "label"], "no column 'label' (--label-col)"),
    "unknown_image_col": (None, ["--image-col", "file"], "no column 'file' (--image-col)"),
    "three_columns": ("a,b,c\nimg000.png,0,x\n", [], "--image-col"),
    "empty_csv": ("", [], "is empty (no header row)"),
    "header_only": (f"{HEADER}\n", [], "has a header but no rows"),
    "empty_label": (f"{HEADER}\nimg000.png,0\nimg001.png,\n", [], "empty label on line(s) 3"),
    "non_utf8": (None, ["__latin1__"], "cannot read CSV"),
    "images_folder_missing": (None, ["--images", "__tmp__/nowhere"], "image folder not found"),
    "data_missing": (None, ["__tmp__/nope.csv"], "no such file or folder"),
    "unknown_backbone": (None, ["--backbone", "resnet19"], "unknown backbone 'resnet19'"),
    "unknown_layer": (None, ["--layers", "fc-7"], "unknown layer 'fc-7' for resnet18"),
    "layer_twice": (None, ["--layers", "avgpool,avgpool"], "layer 'avgpool' given twice"),
    "unknown_weights": (None, ["--weights", "IMAGENET9K_V9"], "unknown weights 'IMAGENET9K_V9'"),
    "weights_file_missing": (None, ["--weights", "__tmp__/w/resnet18.pth"],
                             "weights file not found"),
    "image_size_too_small": (None, ["--image-size", "8"], "--image-size must be at least 16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_extract_bad_input(csv_dir, no_model, case):
    text, extra, expect = CASES[case]
    data = _write(csv_dir, GOOD if text is None else text)
    if extra == ["__latin1__"]:
        (csv_dir / "train.csv").write_bytes(f"{HEADER}\nimg000.png,caf\xe9\n".encode("latin-1"))
        extra = []
    extra = [a.replace("__tmp__", str(csv_dir)) for a in extra]
    if extra and extra[0].endswith(".csv"):
        data, extra = extra[0], extra[1:]
    cache = csv_dir / "c"
    result = _extract(data, *extra, cache_dir=cache)
    _assert_one_line_error(result, expect)
    _no_cache(cache)


def test_extract_on_error_bogus(csv_dir, no_model):
    cache = csv_dir / "c"
    result = _extract(_write(csv_dir, GOOD), "--on-error", "bogus", cache_dir=cache)
    last = _assert_one_line_error(result, click_usage=True)
    assert "--on-error" in last and "bogus" in last and "fail" in last and "skip" in last
    _no_cache(cache)


@pytest.mark.parametrize("opt, value", [("--dtype", "float64"), ("--precision", "int8"),
                                        ("--batch-size", "0"), ("--workers", "-1")])
def test_extract_bad_choices(csv_dir, no_model, opt, value):
    cache = csv_dir / "c"
    result = _extract(_write(csv_dir, GOOD), opt, value, cache_dir=cache)
    assert opt in _assert_one_line_error(result, click_usage=True)
    _no_cache(cache)


def test_extract_tree_with_csv_options(tmp_path, class_tree, no_model):
    cache = tmp_path / "c"
    result = _extract(str(class_tree), "--label-col", "x", cache_dir=cache)
    _assert_one_line_error(result, "apply to a CSV")
    _no_cache(cache)


def test_extract_empty_tree(tmp_path, no_model):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    cache = tmp_path / "c"
    _assert_one_line_error(_extract(str(tmp_path / "tree"), cache_dir=cache), "no images found")
    _no_cache(cache)


def test_extract_weights_named_like_a_path_but_a_folder(csv_dir, no_model):
    (csv_dir / "weights.pth").mkdir()
    cache = csv_dir / "c"
    result = _extract(_write(csv_dir, GOOD), "--weights", str(csv_dir / "weights.pth"),
                      cache_dir=cache)
    _assert_one_line_error(result, "weights file not found")
    _no_cache(cache)


def test_extract_unknown_module_path_layer_fails_before_model(csv_dir, no_model):
    cache = csv_dir / "c"
    result = _extract(_write(csv_dir, GOOD), "--layers", "fc7", cache_dir=cache)
    _assert_one_line_error(result, "fc7")
    _no_cache(cache)


def test_extract_unknown_weights_lists_each_name_once(csv_dir, no_model):
    result = _extract(_write(csv_dir, GOOD), "--weights", "nope", cache_dir=csv_dir / "c")
    last = _assert_one_line_error(result, "unknown weights 'nope'")
    assert last.count("DEFAULT") == 1, last


def test_extract_error_through_real_process(csv_dir):
    """The console entry point, not CliRunner: exit status 2 and stderr exactly one line."""
    data = _write(csv_dir, f"{HEADER}\nimg000.png,0\nmissing.png,1\n")
    cache = csv_dir / "c"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "featprobe", "extract", data, "--cache-dir", str(cache), *FAST],
        capture_output=True, text=True, timeout=120, env=env, cwd=csv_dir,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: 1 of 2 images not found in {csv_dir / 'images'}: missing.png"]
    _no_cache(cache)
    assert not (csv_dir / "cache").exists()  # nor the default ./cache


# ----------------------------------------------------------------------------- help


def test_main_help():
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(main, [flag])
        assert result.exit_code == 0 and result.stderr == ""
        for word in ("extract", "info", "list", "backbones", "weights"):
            assert word in result.stdout


def test_version():
    from featprobe import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_extract_help():
    result = CliRunner().invoke(main, ["extract", "--help"])
    assert result.exit_code == 0
    for opt in ("DATA", "--images", "--image-col", "--label-col", "--backbone", "--weights",
                "--layers", "--cache-dir", "--device", "--batch-size", "--workers",
                "--on-error", "[fail|skip]", "--dtype", "--precision", "--image-size", "vgg16",
                "image_names,emergency_or_no"):
        assert opt in result.stdout, opt


def test_help_through_real_process():
    proc = subprocess.run([sys.executable, "-m", "featprobe", "extract", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--on-error" in proc.stdout and "Usage:" in proc.stdout
    assert "featprobe extract" in proc.stdout  # prog_name, not "python -m" or "main"


# ----------------------------------------------------------------------------- info


def test_info_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "nope.h5")])
    _assert_one_line_error(result, "cache not found")


def test_info_incomplete_cache_points_at_rerun(tmp_path):
    (tmp_path / "vgg16-abc.partial").mkdir()
    result = CliRunner().invoke(main, ["info", str(tmp_path / "vgg16-abc.h5")])
    _assert_one_line_error(result, "is incomplete")


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 40])
def test_info_not_hdf5(tmp_path, content):
    path = tmp_path / "x.h5"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(path)])
    _assert_one_line_error(result, "is not a readable featprobe cache")


def test_info_hdf5_but_not_a_cache(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = [1, 2, 3]
    result = CliRunner().invoke(main, ["info", str(path), "--json"])
    _assert_one_line_error(result, "is not a featprobe cache (no format_version)")


def test_info_directory(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    _assert_one_line_error(result, str(tmp_path))


def test_usage_errors_are_one_line_from_the_console_script():
    """The real program name, an unknown option and command, and the bare group still helps."""
    run = [sys.executable, "-m", "featprobe"]
    bogus = "No such option '--bogus'. Did you mean '--verbose'? (see: featprobe --help)"
    for args, text in ((["--bogus"], bogus),
                       (["bogus"], "No such command 'bogus'. (see: featprobe --help)"),
                       (["fit"], "Missing argument 'CACHE'. (see: featprobe fit --help)")):
        p = subprocess.run(run + args, capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.splitlines() == ["error: " + text], p.stderr
    p = subprocess.run(run, capture_output=True, text=True)
    assert "Commands:" in p.stdout + p.stderr  # no subcommand: click's help, as before


def test_failed_weights_download_keeps_stdout_clean_and_writes_nothing(csv_dir, tmp_path,
                                                                      monkeypatch):
    """Issue 19 item 5: torch.hub's `Downloading: "https://..."` goes to stderr (stdout holds
    only the cache path), and a download that fails leaves no cache, no .partial folder and
    nothing for `featprobe list`. Offline simulated: an empty TORCH_HOME, a download that fails."""
    import urllib.error

    import torch

    def offline(url, dst, *a, **k):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache_dir = tmp_path / "c"
    data = _write(csv_dir, HEADER + "\n" + "".join(f"img{i:03d}.png,{i % 2}\n" for i in range(4)))
    r = CliRunner().invoke(main, ["extract", data, "--backbone", "resnet18",
                                  "--weights", "IMAGENET1K_V1", "--cache-dir", str(cache_dir)])
    assert r.exit_code == 2 and r.stdout == "" and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith('Downloading: "https://download.pytorch.org/models/resnet18-')
    assert lines[-1].startswith("error: weights ResNet18_Weights.IMAGENET1K_V1 are not on this "
                                "machine"), lines
    _no_cache(cache_dir)
    listed = CliRunner().invoke(main, ["list", str(cache_dir)])
    assert listed.stdout == "" and "no caches" in listed.stderr
