"""The hostile corpus: files and arguments a hostile (or unlucky) user hands featprobe.

Every case asserts one outcome class: a correct success, or one ``error:`` line and exit code 2
with no traceback, no code run from a file and nothing half-written that looks complete.
The classes follow docs/reliability.md ("What is not trusted").
"""

from __future__ import annotations

import hashlib
import pathlib
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_images

from featprobe.cli import main
from featprobe.extraction.weights import checkpoint_path, weights_enum

MARKER = "featprobe-hostile-marker"


class _Planted:
    """Unpickling this creates a marker file: the stand-in for any code a planted pickle runs."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _evil_checkpoint(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(2), "payload": _Planted(marker)}, path)
    return path


def cli(*args: str):
    """Run the CLI in-process; return (exit code, output), asserting the outcome's shape."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    if r.exit_code == 2:
        lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), \
        repr(r.exception)
    return r.exit_code, r.output


@pytest.fixture
def data(tmp_path):
    """A labelled CSV of four tiny images."""
    rows = make_images(tmp_path / "images", 4, size=24)
    csv = tmp_path / "train.csv"
    csv.write_text("image_names,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows))
    return csv


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; downloads fail as they do offline."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(*args, **kwargs):
        raise OSError("no network in the hostile corpus")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home


# ---------------------------------------------------------------- 1. code run from a file


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1"])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_a_planted_hub_checkpoint_runs_no_code(data, torch_home, tmp_path, backbone, weights):
    """The file torchvision's loader reads for an enum, replaced by a pickle with a payload."""
    enum_cls = weights_enum(backbone)
    enum = enum_cls.DEFAULT if weights == "DEFAULT" else enum_cls[weights]
    marker = tmp_path / MARKER
    _evil_checkpoint(checkpoint_path(enum), marker)
    code, out = cli("extract", data, "--backbone", backbone, "--weights", weights,
                    "--cache-dir", tmp_path / "cache", "--image-size", "32", "-q")
    assert not marker.exists()  # first: the payload did not run
    assert code == 2 and "refusing" in out and "delete it" in out
    assert "weights_only=False" not in out and "weights_only` set to `False" not in out
    assert not list((tmp_path / "cache").glob("*.h5"))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_a_weights_file_with_a_payload_runs_no_code(data, torch_home, tmp_path, suffix):
    marker = tmp_path / MARKER
    path = _evil_checkpoint(tmp_path / f"evil{suffix}", marker)
    code, out = cli("extract", data, "--backbone", "resnet18", "--weights", path,
                    "--cache-dir", tmp_path / "cache", "--image-size", "32", "-q")
    assert code == 2 and "cannot load weights" in out and "only tensors" in out
    assert not marker.exists() and "weights_only=False" not in out


def test_weights_add_loads_nothing_but_tensors(torch_home, tmp_path):
    """A payload named with its own hash prefix passes the name check; loading it does not."""
    marker = tmp_path / MARKER
    evil = _evil_checkpoint(tmp_path / "tmp.pth", marker)
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    named = evil.with_name(f"resnet18-{digest[:8]}.pth")
    shutil.move(evil, named)
    code, out = cli("weights", "add", named)
    assert code == 2 and "cannot load weights" in out
    assert not marker.exists()
    assert not (torch_home / "hub" / "checkpoints" / named.name).exists()


def test_a_head_file_cannot_name_code_to_run(tmp_path):
    """Head files are arrays + JSON: a class outside the allow-list is refused by name."""
    path = tmp_path / "head.npz"
    meta = '{"format_version": 1}'
    state = '{"pipeline": null, "steps": [{"class": "os.system", "params": {}, "attrs": {}}]}'
    np.savez(path, __meta__=np.array(meta), __state__=np.array(state))
    code, out = cli("predict", path, tmp_path)
    assert code == 2 and "not one featprobe loads" in out


# ------------------------------------------------------- 2. corruption that only verify saw


def _flip_feature_byte(path: pathlib.Path, layer: str, chunk: int = 0, at: float = 0.5) -> None:
    """Flip one bit inside the stored bytes of one chunk of ``features/<layer>``."""
    with h5py.File(path, "r") as f:
        info = f["features"][layer].id.get_chunk_info(chunk)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + int(info.size * at))
        b = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([b[0] ^ 0x10]))


@pytest.fixture
def small_cache(tmp_path):
    from test_fitting import synthetic_cache

    return synthetic_cache(tmp_path / "c", n=200, d=32)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("memory", [None, "40KB"])
def test_a_flipped_feature_byte_stops_fit(small_cache, where, memory):
    _flip_feature_byte(small_cache.path, "fc7", chunk=0, at=where)
    args = ["fit", small_cache.path, "--head", "linear", "--layer", "fc7", "--epochs", "2"]
    code, out = cli(*args, *(["--max-memory", memory] if memory else []))
    assert code == 2 and "damaged" in out and "Fletcher-32 checksum does not match" in out
    assert not (small_cache.directory / "runs.jsonl").exists()  # nothing recorded
    code, out = cli("fit", small_cache.path, "--head", "logreg", "--layer", "fc6")
    assert code == 0  # the other layer is intact and still usable


@pytest.mark.parametrize("edit", ["label", "id", "valid", "classes"])
def test_edited_rows_stop_fit(small_cache, edit):
    with h5py.File(small_cache.path, "r+") as f:
        if edit == "label":
            f["labels"][3] = 1 - f["labels"][3]
        elif edit == "id":
            f["ids"][3] = "other.jpg"
        elif edit == "valid":
            f["valid"][3] = False
        else:
            f["labels"].attrs["classes"] = '["dog", "cat"]'
    code, out = cli("fit", small_cache.path, "--head", "logreg")
    assert code == 2 and "do not match their recorded SHA-256" in out
    assert not (small_cache.directory / "runs.jsonl").exists()


def test_a_0_1_0_cache_is_read_with_a_warning(tmp_path):
    """0.1.0 caches have no per-chunk checksums: fit says so once and goes on."""
    src = pathlib.Path(__file__).parent / "fixtures" / "v0_1_0" / "cache.h5"
    shutil.copy(src, tmp_path / "cache.h5")
    code, out = cli("fit", tmp_path / "cache.h5", "--head", "logreg")
    assert code == 0 and out.count("no per-chunk checksums") == 1 and "featprobe verify" in out


# ------------------------------------------------------------------------ 5. torn records

_APPEND_ON_A_FULL_DISK = r"""
import resource, signal, sys
from featprobe.errors import FeatprobeError
from featprobe.runs.records import append_run
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails like ENOSPC
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    append_run(sys.argv[1], {"run": "big", "pad": "x" * 4000})
except FeatprobeError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("room", [0, 1, 100, 3000])
def test_a_full_disk_during_an_append_leaves_no_torn_line(tmp_path, room):
    from featprobe.runs.records import append_run, read_runs

    append_run(tmp_path, {"run": "first"})
    path = tmp_path / "runs.jsonl"
    before = path.read_bytes()
    out = subprocess.run([sys.executable, "-c", _APPEND_ON_A_FULL_DISK, str(tmp_path),
                          str(len(before) + room)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("refused: cannot append"), out
    assert path.read_bytes() == before  # the partial write was cut off again
    append_run(tmp_path, {"run": "after"})
    assert [r["run"] for r in read_runs(tmp_path)] == ["first", "after"]


def test_compare_keeps_every_run_before_a_torn_last_line(small_cache):
    code, _ = cli("fit", small_cache.path, "--head", "logreg")
    assert code == 0
    with open(small_cache.directory / "runs.jsonl", "a") as f:
        f.write('{"run_id": "x", "val": {"accur')
    code, out = cli("compare", small_cache.directory, "--format", "csv")
    assert code == 0 and "skipped an incomplete last line" in out and "logreg" in out
