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
from featprobe.errors import FeatprobeError
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


# ------------------------------------------------------------------------ 8. tracebacks


def _csv(tmp_path, lines: list[str], name="t.csv") -> pathlib.Path:
    (tmp_path / name).write_text("image_names,label\n" + "".join(ln + "\n" for ln in lines))
    return tmp_path / name


def _extract(csv, tmp_path, *extra):
    return cli("extract", csv, "--images", csv.parent / "images", "--backbone", "resnet18",
               "--weights", "none", "--image-size", "32", "-q", "--cache-dir",
               tmp_path / "cache", *extra)


@pytest.mark.parametrize("name", ["a" * 300, "a" * 100_000, "x/" * 3000 + "y.png", "\x00.png"])
def test_unusable_image_names_are_one_line(data, tmp_path, name):
    csv = _csv(tmp_path, [f"{name},0", "img001.png,1", "img002.png,0"])
    code, out = _extract(csv, tmp_path)
    assert code == 2 and len(out) < 600
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("command", ["extract", "baseline"])
def test_one_class_is_refused_before_any_work(data, tmp_path, command):
    csv = _csv(tmp_path, ["img000.png,cat", "img001.png,cat", "img002.png,cat"])
    if command == "extract":
        code, out = _extract(csv, tmp_path)
    else:
        code, out = cli("baseline", csv, "--images", tmp_path / "images", "--image-size", "16",
                        "--epochs", "1", "-q", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "'cat'" in out and "two classes" in out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_fit_on_a_one_class_cache_is_one_line(tmp_path):
    from featprobe.cache import write_arrays

    c = write_arrays(tmp_path / "one.h5", ["a", "b", "c", "d"], np.zeros(4, int), ["cat"],
                     {"f": np.ones((4, 3), np.float32)})
    code, out = cli("fit", c.path, "--head", "logreg")
    assert code == 2 and "two classes" in out


@pytest.mark.parametrize("device", ["meta", "cuda:7", "xla", "cpu:x", "cuda:-1", ""])
def test_devices_that_cannot_run_are_refused_before_anything_is_written(data, tmp_path, device):
    code, out = _extract(data, tmp_path, "--device", device)
    assert code == 2 and "device" in out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("field,value", [
    ("head", 5), ("seed", [1]), ("params", 3), ("val", "high"), ("val", {"accuracy": "high"}),
    ("standardize", "yes"), ("fit_seconds", "fast"), ("backbone", {"x": 1}),
    ("majority_rate", True), ("train", {"macro_f1": [0.5]})])
def test_compare_refuses_records_of_the_wrong_types_in_one_line(small_cache, field, value):
    import json

    code, _ = cli("fit", small_cache.path, "--head", "logreg")
    assert code == 0
    log = small_cache.directory / "runs.jsonl"
    record = json.loads(log.read_text())
    record[field] = value
    log.write_text(log.read_text() + json.dumps(record) + "\n")
    code, out = cli("compare", small_cache.directory)
    assert code == 2 and "runs.jsonl:2: corrupted run record" in out and field in out


@pytest.mark.parametrize("memory", [None, "40KB"])
def test_non_finite_features_are_one_line_in_and_out_of_core(tmp_path, memory):
    from featprobe.cache import write_arrays

    X = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    X[17, 3] = np.inf
    c = write_arrays(tmp_path / "inf.h5", [f"{i}" for i in range(200)], np.arange(200) % 2,
                     ["a", "b"], {"f": X})
    for head in ("linear", "logreg"):
        args = ["fit", c.path, "--head", head, "--epochs" if head == "linear" else "--seed", "2"]
        code, out = cli(*args, *(["--max-memory", memory] if memory else []))
        assert code == 2 and ("NaN or inf" in out or "NaN or infinity" in out), out


# ------------------------------------------------------------ 7. resource bombs after decoding


@pytest.mark.parametrize("size", [(1, 60_000), (60_000, 1), (3, 90_000)])
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_sliver_image_is_a_bad_image_not_a_memory_error(data, tmp_path, size, decode):
    """A few hundred bytes of PNG/JPEG whose resize (shorter side to 36 for a 32 px crop) would
    need gigabytes: reported like any unreadable image, in extract and in predict."""
    from PIL import Image

    images = data.parent / "images"
    ext = "jpg" if decode == "gpu" and max(size) <= 65_500 else "png"
    Image.new("RGB", size, (200, 10, 10)).save(images / f"sliver.{ext}")
    csv = _csv(tmp_path, [f"sliver.{ext},0", "img000.png,0", "img001.png,1", "img002.png,0",
                          "img003.png,1"], name="sliver.csv")
    code, out = _extract(csv, tmp_path, "--decode", decode, "--image-size", "300")
    assert code == 2 and f"sliver.{ext}" in out and "extreme aspect ratio" in out
    code, out = _extract(csv, tmp_path, "--decode", decode, "--image-size", "300",
                         "--on-error", "skip")
    assert code == 0 and "skipped 1 unreadable image" in out


# ------------------------------------------------------------------ 3. one image, two rows


@pytest.mark.parametrize("spelling", ["./img000.png", "sub/../img000.png", "ABS",
                                      "link.png", "./sub/../img000.png"])
def test_one_file_under_two_names_is_refused(data, tmp_path, spelling):
    images = tmp_path / "images"
    (images / "sub").mkdir()
    (images / "link.png").symlink_to(images / "img000.png")
    name = str(images / "img000.png") if spelling == "ABS" else spelling
    csv = _csv(tmp_path, ["img000.png,0", f"{name},1", "img001.png,1", "img002.png,0"])
    code, out = _extract(csv, tmp_path, *(["--allow-outside-images"] if spelling == "ABS" else []))
    assert code == 2 and "are the same file" in out and "img000.png" in out


@pytest.mark.parametrize("name", ["../outside.png", "ABS", "sub/../../outside.png"])
def test_names_leaving_the_image_folder_need_an_explicit_yes(data, tmp_path, name):
    from PIL import Image

    Image.new("RGB", (24, 24), (5, 5, 5)).save(tmp_path / "outside.png")
    name = str(tmp_path / "outside.png") if name == "ABS" else name
    (tmp_path / "images" / "sub").mkdir(exist_ok=True)
    csv = _csv(tmp_path, [f"{name},0", "img001.png,1", "img002.png,0", "img003.png,1"])
    code, out = _extract(csv, tmp_path)
    assert code == 2 and "leaves the image folder" in out and "--allow-outside-images" in out
    code, out = _extract(csv, tmp_path, "--allow-outside-images")
    assert code == 0, out


def test_a_symlink_loop_in_a_class_tree_is_walked_once(tmp_path):
    from featprobe.data import load_dataset

    for k, cls in enumerate(("cat", "dog")):
        make_images(tmp_path / "tree" / cls, 6, size=16, seed=k)
    (tmp_path / "tree" / "cat" / "loop").symlink_to(tmp_path / "tree" / "cat")
    (tmp_path / "tree" / "dog" / "deeper").mkdir()
    (tmp_path / "tree" / "dog" / "deeper" / "up").symlink_to(tmp_path / "tree" / "dog")
    ds = load_dataset(tmp_path / "tree")  # 0.1.0: the loops made 492 rows of 12 files
    assert len(ds) == 12 and sorted(ds.classes) == ["cat", "dog"]
    (tmp_path / "tree" / "dog" / "cats").symlink_to(tmp_path / "tree" / "cat")
    with pytest.raises(FeatprobeError, match="are the same file"):  # one file, two labels
        load_dataset(tmp_path / "tree")


# --------------------------------------------------------- 4. parts of another extraction


@pytest.mark.parametrize("tamper", ["stranger", "renumbered", "truncated", "garbage"])
def test_merge_refuses_parts_that_are_not_its_own(data, tmp_path, tamper):
    """Two extractions of the same images (same row count), each half done by --shard; the
    other half of B is filled with A's parts, renumbered parts of B, a part cut short, junk."""
    base = ["--batch-size", "1", "--weights", "none", "--backbone", "resnet18", "-q"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("extract", data, *base, "--image-size", "32", "--cache-dir", a,
               "--shard", "1/2")[0] == 0
    assert cli("extract", data, *base, "--image-size", "40", "--cache-dir", b,
               "--shard", "0/2")[0] == 0
    (pa,), (pb,) = a.glob("*.partial"), b.glob("*.partial")
    for k in (1, 3):
        dest = pb / f"part-{k:06d}.npz"
        if tamper == "stranger":
            shutil.copy(pa / dest.name, dest)
        elif tamper == "renumbered":
            shutil.copy(pb / f"part-{k - 1:06d}.npz", dest)
        elif tamper == "truncated":
            shutil.copy(pb / f"part-{k - 1:06d}.npz", dest)
            dest.write_bytes(dest.read_bytes()[:200])
        else:
            dest.write_bytes(b"PK\x03\x04" + bytes(100))
    code, out = cli("merge", pb.with_suffix(".h5"))
    assert code == 2 and "is not part 1" in out and "remove it and rerun" in out
    assert not pb.with_suffix(".h5").exists()


# ------------------------------------------------------------------------ 6. edited head files


def _edit_head(path: pathlib.Path, edit, digest: str) -> None:
    """Apply ``edit`` to the arrays of a head file; ``digest``: keep the saved SHA-256
    ("stale"), drop it (a 0.1.0-style file) or recompute it (an editor who knows the format)."""
    import json

    from featprobe.probe.headfile import _digest

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta, state = json.loads(str(arrays["__meta__"])), json.loads(str(arrays["__state__"]))
    edit(arrays, meta, state)
    arrays["__meta__"] = np.array(json.dumps(meta))
    arrays["__state__"] = np.array(json.dumps(state))
    if digest == "dropped":
        del arrays["__sha256__"]
    elif digest == "recomputed":
        arrays["__sha256__"] = np.array(_digest(arrays))
    np.savez(path, **arrays)


def _nan_coef(a, meta, state):
    key = next(k for k in a if k.endswith(".coef_"))
    a[key] = a[key].copy()
    a[key].flat[0] = np.nan


def _swap_classes(a, meta, state):
    key = next(k for k in a if k.endswith(".classes_"))
    a[key] = a[key][::-1].copy()


def _zero_scale(a, meta, state):
    a["s0.scale_"] = np.zeros_like(a["s0.scale_"])


def _crop(size):
    def edit(a, meta, state):
        meta["preprocessing"]["crop_size"] = [size]
    return edit


def _zero_std(a, meta, state):
    meta["preprocessing"]["std"] = [0.0, 0.2, 0.2]


EDITS = {"nan_coef": (_nan_coef, "NaN or inf"), "swapped_classes": (_swap_classes, "sorted"),
         "zero_scale": (_zero_scale, "divides by zero"), "zero_crop": (_crop(0), "preprocessing"),
         "negative_crop": (_crop(-5), "preprocessing"), "zero_std": (_zero_std, "preprocessing")}


@pytest.fixture(scope="module")
def saved_head(tmp_path_factory):
    """A standardised logreg head on a real (random-init resnet18, 32 px) cache."""
    root = tmp_path_factory.mktemp("head")
    rows = make_images(root / "images", 8, size=24)
    csv = root / "train.csv"
    csv.write_text("image_names,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows))
    code, out = cli("extract", csv, "--backbone", "resnet18", "--weights", "none",
                    "--image-size", "32", "--cache-dir", root / "cache", "-q")
    assert code == 0, out
    cache = out.strip().splitlines()[-1]
    code, out = cli("fit", cache, "--head", "logreg", "--standardize", "--val-fraction", "0.25",
                    "--save", root / "head.npz")
    assert code == 0, out
    return root / "head.npz", root / "images"


@pytest.mark.parametrize("digest", ["stale", "dropped", "recomputed"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_head_file_is_refused_in_one_line(saved_head, tmp_path, edit, digest):
    head, images = saved_head
    path = tmp_path / "head.npz"
    shutil.copy(head, path)
    fn, why = EDITS[edit]
    _edit_head(path, fn, digest)
    code, out = cli("predict", path, images, "--out", tmp_path / "p.csv", "-q")
    assert code == 2
    assert ("was edited or damaged" in out) if digest == "stale" else (why in out), out
    assert not (tmp_path / "p.csv").exists()


def test_an_unedited_head_file_still_predicts(saved_head, tmp_path):
    head, images = saved_head
    code, out = cli("predict", head, images, "--out", tmp_path / "p.csv", "-q")
    assert code == 0 and (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------- options and CSVs, cheaply

BAD_OPTIONS = [
    ("extract", "--batch-size", "0"), ("extract", "--workers", "-1"),
    ("extract", "--image-size", "3"), ("extract", "--dtype", "float8"),
    ("extract", "--precision", "fp8"), ("extract", "--decode", "tpu"),
    ("extract", "--on-error", "ignore"), ("extract", "--shard", "3/2"),
    ("extract", "--shard", "x"), ("extract", "--layers", "nope"),
    ("extract", "--backbone", "nope"), ("extract", "--weights", "NOPE_V9"),
    ("extract", "--weights", "missing/file.pth"), ("extract", "--layers", "fc,fc"),
    ("baseline", "--epochs", "0"), ("baseline", "--image-size", "2"),
    ("baseline", "--val-fraction", "1.5"), ("baseline", "--lr", "-1"),
]


@pytest.mark.parametrize("command,option,value", BAD_OPTIONS)
def test_bad_option_values_are_one_line_and_write_nothing(data, tmp_path, command, option,
                                                          value):
    args = [command, data, option, value, "--cache-dir", tmp_path / "cache", "-q"]
    if command == "extract" and option != "--backbone":
        args += ["--backbone", "resnet18", "--weights", "none"] * (option != "--weights")
        args += ["--backbone", "resnet18"] * (option == "--weights")
    code, _ = cli(*args)
    assert code == 2
    assert not list(tmp_path.glob("cache/*.h5")) and not list(tmp_path.glob("cache/runs.jsonl"))


BAD_FITS = [("--head", "nope"), ("--layer", "nope"), ("--val-fraction", "0"),
            ("--max-memory", "-1GB"), ("--max-memory", "lots"), ("-p", "C"),
            ("-p", "nope=1"), ("-p", "C=-1"), ("--epochs", "0"), ("--sweep", None)]


@pytest.mark.parametrize("option,value", BAD_FITS)
def test_bad_fit_options_are_one_line_and_record_nothing(small_cache, option, value):
    extra = [option] + ([value] if value is not None else []) + ["--head", "mlp"] * (
        value is None)
    code, _ = cli("fit", small_cache.path, *extra)
    assert code == 2 and not (small_cache.directory / "runs.jsonl").exists()


HOSTILE_CSVS = {
    "nul_in_name": "img000.png\x00.png,0\nimg001.png,1\n",
    "formula_name": "=cmd|' /C calc'!A0,0\nimg001.png,1\n",
    "empty_label": "img000.png,\nimg001.png,1\n",
    "extra_field": "img000.png,0,x\nimg001.png,1\n",
    "directory_name": ".,0\nimg001.png,1\n",
    "dotdot": "..,0\nimg001.png,1\n",
    "same_name_twice": "img000.png,0\nimg000.png,1\nimg001.png,1\n",
    "bom_and_crlf_ok": "img000.png,0\r\nimg001.png,1\r\nimg002.png,0\r\nimg003.png,1\r\n",
}


@pytest.mark.parametrize("name", list(HOSTILE_CSVS))
def test_hostile_csvs(data, tmp_path, name):
    bom = "\ufeff" if name.startswith("bom") else ""
    (tmp_path / "h.csv").write_text(bom + "image_names,label\n" + HOSTILE_CSVS[name], newline="")
    code, out = _extract(tmp_path / "h.csv", tmp_path)
    assert code == (0 if name.endswith("_ok") else 2), out


def test_the_extract_progress_bar_ends_at_its_total(data, tmp_path):
    """0.1.0 stopped one batch short (128/160): the loop's consumer never resumed it."""
    r = CliRunner().invoke(main, ["extract", str(data), "--backbone", "resnet18", "--weights",
                                  "none", "--image-size", "32", "--batch-size", "3",
                                  "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0 and "4/4" in r.output and "3/4 [" not in r.output.split("4/4")[-1]
