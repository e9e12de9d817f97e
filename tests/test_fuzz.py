"""Property-based fuzzing of what users feed featprobe: CSVs and image files.

Every generated case must end in success with exactly the rows that were written (ids in
order, each label mapped back to what the CSV said; image size and, for lossless formats,
pixels), or in the one exception featprobe turns into a one-line ``error:`` (FeatprobeError
for datasets, BadImage for images) — never another exception, a hang or a silently wrong row.
Hypothesis runs derandomized, so CI sees the same cases every time; each test prints its
counts (``pytest -s``) and docs/reliability.md records them.
"""

from __future__ import annotations

import csv
import io
import struct
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featprobe.cli import main
from featprobe.data import load_dataset
from featprobe.errors import FeatprobeError
from featprobe.extraction.images import BadImage, load_rgb

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# image files on disk: odd but legal names (spaces, commas, quotes, unicode, a subfolder)
NAMES = ["a.png", "b 2.png", "c,3.png", 'd"4.png', "é5.png", "日本6.png", "sub/f7.png",
         "G8.PNG", "h9.png", "i10.png"]
GOOD_LABELS = st.one_of(
    st.integers(-3, 12).map(str),
    st.sampled_from(["cat", "dog", "Cat", "emu", "1.0", "01", "+1", "ça", "a b", 'q"t', "x,y",
                     "1e3", "None", "nan", "True", "-0", "狗"]),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzzcsv")
    for i, name in enumerate(NAMES):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / "images" / name, "PNG")
    return root


@st.composite
def csv_cases(draw):
    """A CSV as bytes, the options to read it with, and what it must load as (None: an error).
    """
    n = draw(st.integers(1, 8))
    ids = draw(st.lists(st.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    labels = draw(st.lists(GOOD_LABELS, min_size=n, max_size=n))
    header = draw(st.sampled_from([("image_names", "label"), ("label", "image_names"),
                                   ("file", "y"), ("x", "y"), (" Image ", "class"),
                                   ("image_names", "label", "extra")]))
    bad = []  # what, in this case, must make loading fail
    options = {}
    if len(header) == 3:
        if draw(st.booleans()):
            options = {"label_col": "label"}
        else:
            bad.append("ambiguous label column")
    cells = {"id": [f"{x}" for x in ids], "label": list(labels)}
    # perturbations that must fail
    if draw(st.integers(0, 9)) == 0:
        cells["id"][draw(st.integers(0, n - 1))] = "missing.png"
        bad.append("missing file")
    if n > 1 and draw(st.integers(0, 9)) == 0:
        cells["id"][1] = cells["id"][0]
        bad.append("duplicate id")
    if draw(st.integers(0, 11)) == 0:
        cells["label"][draw(st.integers(0, n - 1))] = draw(st.sampled_from(["", "  "]))
        bad.append("empty label")
    j = draw(st.integers(0, n - 1))
    if draw(st.integers(0, 11)) == 0 and cells["label"][j].strip():  # (a row with neither
        cells["id"][j] = ""  # an id nor a label is a blank line, skipped)
        bad.append("empty id")
    dup_header = draw(st.integers(0, 11)) == 0
    if dup_header:
        header = (header[0], header[0], *header[2:])
        bad.append("duplicate column")
    # harmless variations: padding, quoting, blank lines, line endings, BOM, encoding
    pad = draw(st.sampled_from(["", " ", "  ", "\t"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    buf = io.StringIO()
    w = csv.writer(buf, quoting=quoting, lineterminator=eol)
    w.writerow(header)
    blank_after = draw(st.sets(st.integers(0, n)))
    extra_field = draw(st.integers(0, 11)) == 0
    short_row = draw(st.integers(0, 11)) == 0 and len(header) == 2 and cells["id"][-1].strip()
    for i in range(n):
        if i in blank_after:
            buf.write(draw(st.sampled_from([eol, "," + eol, "  " + eol])))
        image, label = pad + cells["id"][i] + pad, cells["label"][i]
        row = {"image_names": image, "label": label, "extra": "z"}
        if header[0] in ("image_names", "file", "x", " Image ") or dup_header:
            row = [image, label] + (["z"] if len(header) == 3 else [])
        else:  # ("label", "image_names")
            row = [label, image]
        if extra_field and i == n - 1:
            row = row + ["surplus"]
        if short_row and i == n - 1:
            row = row[:1]
        w.writerow(row)
    if extra_field:
        bad.append("more fields than columns")
    if short_row:
        bad.append("row without a label")
    text = buf.getvalue()
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]))
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        encoding, data = "utf-8", text.encode()
    try:
        same = data.decode("utf-8-sig") == text
    except UnicodeDecodeError:
        same = False
    if not same:
        bad.append(f"not UTF-8 ({encoding})")
    expected = None if bad else ([x.strip() for x in cells["id"]],
                                 [x.strip() for x in cells["label"]])
    return data, options, expected, bad


def _typed(labels: list[str]) -> list:
    try:
        as_int = [int(v) for v in labels]
    except ValueError:
        return labels
    return as_int if all(v == str(i) for v, i in zip(labels, as_int)) else labels


def test_csv_fuzz(folder):
    stats = Counter()

    @settings(FUZZ, max_examples=400)
    @given(csv_cases())
    def run(case):
        data, options, expected, bad = case
        path = folder / "train.csv"
        path.write_bytes(data)
        t0 = time.monotonic()
        try:
            ds = load_dataset(path, **options)
        except FeatprobeError as e:
            msg = str(e)
            assert msg and "Traceback" not in msg
            assert expected is None, f"refused a good CSV: {msg}\n{data!r}"
            stats["error"] += 1
        else:
            assert expected is not None, f"accepted a bad CSV ({bad}):\n{data!r}"
            ids, labels = expected
            assert ds.ids == ids
            assert [ds.classes[i] for i in ds.labels] == _typed(labels)
            assert ds.classes == sorted(set(_typed(labels)))
            stats["success"] += 1
        assert time.monotonic() - t0 < 5
        stats["cases"] += 1

    run()
    print(f"\nCSV fuzz: {dict(stats)}")
    assert stats["cases"] == 400 and stats["success"] >= 100 and stats["error"] >= 100


# ----------------------------------------------------------------------------- images


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (for the decompression-bomb limit); tiny data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


MODES = {  # format -> modes Pillow writes in it
    "PNG": ["1", "L", "LA", "RGB", "RGBA", "P", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "RGB", "P"],
    "TIFF": ["L", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["L", "P"],
}
LOSSLESS_RGB = {"PNG", "BMP", "TIFF"}


@st.composite
def image_cases(draw):
    """(file bytes, expected (width, height) or None for must-fail, RGB array or None)."""
    kind = draw(st.sampled_from(["valid", "random", "bomb", "truncated", "valid", "exif",
                                 "magic", "valid"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=600)), None, None, kind
    if kind == "magic":  # a real signature, then garbage
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a",
                                      b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]))
        return magic + draw(st.binary(min_size=0, max_size=300)), None, None, kind
    if kind == "bomb":
        side = draw(st.sampled_from([9500, 12000, 20000, 65000]))  # 90M .. 4.2G pixels
        return _png_with_size(side, side), None, None, kind
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode in ("I;16", "I", "F"):
        im = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16))
        im = im if mode == "I;16" else im.convert(mode)
    elif mode != "RGB":
        im = im.convert(mode)
    b = io.BytesIO()
    exif_orientation = 1
    if kind == "exif":
        fmt, exif_orientation = "JPEG", draw(st.integers(1, 8))
        im = im.convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(b, "JPEG", exif=exif.tobytes())
    else:
        im.save(b, fmt)
    data = b.getvalue()
    size = (h, w) if exif_orientation in (5, 6, 7, 8) else (w, h)
    if kind == "truncated":  # refused, or (a cut in trailing metadata) the full image
        cut = draw(st.integers(0, max(0, len(data) - 1)))
        return data[:cut], ("either", size), None, f"{kind}:{fmt}:{mode}"
    exact = rgb if (fmt in LOSSLESS_RGB and mode == "RGB") else None
    return data, size, exact, f"{kind}:{fmt}:{mode}"


def test_image_fuzz(tmp_path):
    stats = Counter()
    path = tmp_path / "f.img"

    @settings(FUZZ, max_examples=400)
    @given(image_cases())
    def run(case):
        data, size, exact, kind = case
        path.write_bytes(data)
        t0 = time.monotonic()
        try:
            im = load_rgb(path)
        except BadImage as e:
            reason = str(e)
            assert reason and "\n" not in reason.strip() and "Traceback" not in reason
            assert size is None or size[0] == "either", f"{kind}: valid image refused: {reason}"
            stats["refused"] += 1
            if kind == "bomb":
                assert "too large" in reason
                stats["bomb refused"] += 1
        else:
            assert size is not None, f"{kind}: garbage decoded as an image"
            assert im.mode == "RGB"
            if size[0] == "either":
                size = size[1]
                stats["truncated but whole"] += 1  # the cut only lost trailing metadata
            assert im.size == size, kind
            if exact is not None:
                np.testing.assert_array_equal(np.asarray(im), exact)
                stats["pixel-exact"] += 1
            stats["decoded"] += 1
        assert time.monotonic() - t0 < 5, f"{kind} took too long"
        stats["cases"] += 1
        stats["kind " + kind.split(":")[0]] += 1

    run()
    print(f"\nimage fuzz: {dict(sorted(stats.items()))}")
    assert stats["cases"] == 400 and stats["decoded"] >= 100 and stats["refused"] >= 60


# ----------------------------------------------------------------------------- through the CLI


def test_cli_fuzzed_csvs_give_one_error_line_and_exit_2(folder, tmp_path, monkeypatch):
    """A sample of generated bad CSVs through `featprobe extract`: exit 2, one `error:` line,
    no traceback, and no model built or cache written first."""
    import featprobe.extraction.backbones

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was rejected")

    monkeypatch.setattr(featprobe.extraction.backbones, "build_model", refuse)
    stats = Counter()

    @settings(FUZZ, max_examples=40)
    @given(csv_cases().filter(lambda c: c[2] is None))
    def run(case):
        data, options, _, _ = case
        (folder / "cli.csv").write_bytes(data)
        args = ["extract", str(folder / "cli.csv"), "--weights", "none", "--backbone",
                "resnet18", "--image-size", "32", "-q", "--cache-dir", str(tmp_path / "c")]
        if options:
            args += ["--label-col", options["label_col"]]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.exception)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert r.stdout == "" and not (tmp_path / "c").exists()
        stats["cases"] += 1

    run()
    print(f"\nCLI CSV fuzz: {dict(stats)}")
    assert stats["cases"] == 40
