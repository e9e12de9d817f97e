"""Decoding: every PIL mode becomes 8-bit RGB, EXIF orientation applies, bad files -> BadImage."""

from __future__ import annotations

import io
import pickle
import threading

import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from featprobe.data import Dataset, read_image_list
from featprobe.extraction.images import BadImage, ImageRows, load_rgb
from featprobe.extraction.pixels import pixel_transform

ORIENTATION = 0x0112


def _px(im: Image.Image, xy=(0, 0)) -> tuple:
    assert im.mode == "RGB"
    return tuple(int(v) for v in np.asarray(im)[xy[1], xy[0]])


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


# ----------------------------------------------------------------------------- modes


def test_rgb_png_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = load_rgb(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (7, 5)
    assert np.array_equal(np.asarray(out), arr)


def test_grayscale_l(tmp_path):
    out = load_rgb(_save(Image.new("L", (4, 3), 77), tmp_path / "l.png"))
    assert out.mode == "RGB" and out.size == (4, 3) and _px(out) == (77, 77, 77)


def test_grayscale_alpha_la(tmp_path):
    out = load_rgb(_save(Image.new("LA", (4, 4), (77, 10)), tmp_path / "la.png"))
    assert _px(out) == (77, 77, 77)


def test_rgba_alpha_dropped(tmp_path):
    out = load_rgb(_save(Image.new("RGBA", (4, 4), (1, 2, 3, 0)), tmp_path / "rgba.png"))
    assert _px(out) == (1, 2, 3)


def test_one_bit(tmp_path):
    im = Image.new("1", (4, 4), 0)
    im.putpixel((1, 0), 1)
    out = load_rgb(_save(im, tmp_path / "b.png"))
    assert _px(out) == (0, 0, 0) and _px(out, (1, 0)) == (255, 255, 255)


def _palette_image() -> Image.Image:
    im = Image.new("P", (4, 4), 3)
    im.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (768 - 12))
    im.putpixel((1, 1), 1)
    return im


@pytest.mark.parametrize("transparency", [None, 3, 1])
@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_and_without_transparency(tmp_path, transparency, ext):
    kw = {} if transparency is None else {"transparency": transparency}
    path = _save(_palette_image(), tmp_path / f"p.{ext}", **kw)
    with Image.open(path) as raw:
        assert raw.mode == "P"
        assert ("transparency" in raw.info) == (transparency is not None)
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert _px(out) == (70, 80, 90) and _px(out, (1, 1)) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    r, g, b = _px(load_rgb(path), (4, 4))
    assert r > 220 and g < 40 and b < 40  # cyan 0, magenta+yellow full: red


def test_sixteen_bit_png(tmp_path):
    arr = np.array([[0, 32768, 65535, 257, 200]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # I;16 (newer Pillow) or I
    out = load_rgb(path)
    assert out.mode == "RGB" and np.asarray(out).dtype == np.uint8
    row = np.asarray(out)[0, :, 0].tolist()
    assert row[0] == 0 and row[2] == 255 and abs(row[1] - 128) <= 1 and row[3] == 1
    assert row[4] == 1  # 200/65535 of full scale, not 200
    assert np.all(np.asarray(out)[..., 0] == np.asarray(out)[..., 2])


def test_sixteen_bit_dark_image_is_not_rescaled_to_full(tmp_path):
    arr = np.full((2, 2), 1000, dtype=np.uint16)  # dark in 16-bit terms: ~4/255
    out = load_rgb(_save(Image.fromarray(arr), tmp_path / "dark.png"))
    assert _px(out) == (4, 4, 4)


def test_thirty_two_bit_int_tiff(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.int32)
    out = load_rgb(_save(Image.fromarray(arr, "I"), tmp_path / "i.tiff"))
    assert np.asarray(out)[0, :, 0].tolist()[0] == 0
    assert abs(np.asarray(out)[0, 1, 0] - 128) <= 1 and np.asarray(out)[0, 2, 0] == 255


def test_float_tiff(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_rgb(_save(Image.fromarray(arr, "F"), tmp_path / "f.tiff"))
    assert np.asarray(out)[0, :, 0].tolist() == [0, 127, 255]


# ----------------------------------------------------------------------------- EXIF orientation


def _two_tone(w=32, h=16) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left red
    arr[:, w // 2:] = (0, 0, 255)  # right blue
    return Image.fromarray(arr)


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[ORIENTATION] = orientation
    return ex.tobytes()


def test_exif_orientation_6_rotates(tmp_path):
    path = _save(_two_tone(), tmp_path / "o6.jpg", exif=_exif(6), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (32, 16)
    out = load_rgb(path)
    assert out.size == (16, 32)  # width and height swapped
    top, bottom = _px(out, (8, 2)), _px(out, (8, 29))
    assert top[0] > 200 and top[2] < 60  # orientation 6 = 90° clockwise: left goes to top
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_3_and_1(tmp_path):
    out = load_rgb(_save(_two_tone(), tmp_path / "o3.jpg", exif=_exif(3), quality=95))
    assert out.size == (32, 16) and _px(out, (2, 8))[2] > 200  # 180°: blue now on the left
    out = load_rgb(_save(_two_tone(), tmp_path / "o1.jpg", exif=_exif(1), quality=95))
    assert out.size == (32, 16) and _px(out, (2, 8))[0] > 200


def _corrupt_exif_jpeg(path):
    """Orientation 6 plus a YPosition tag (RATIONAL in TIFF) stored as ASCII "Canon"."""
    ex = Image.Exif()
    ex[ORIENTATION] = 6
    ex[0x010F] = "Canon"  # Make (ASCII)
    raw = ex.tobytes()
    tag = b"\x01\x0f\x00\x02" if raw[6:8] == b"MM" else b"\x0f\x01\x02\x00"
    new = b"\x01\x1f\x00\x02" if raw[6:8] == b"MM" else b"\x1f\x01\x02\x00"
    assert raw.count(tag) == 1
    return _save(_two_tone(), path, exif=raw.replace(tag, new))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_exif_is_an_image_or_badimage_never_a_crash(tmp_path):
    path = _corrupt_exif_jpeg(tmp_path / "corrupt_exif.jpg")
    with Image.open(path) as raw:
        raw.load()  # the pixels themselves decode fine
    try:
        out = load_rgb(path)
    except BadImage:
        return
    assert out.mode == "RGB" and out.size in ((32, 16), (16, 32))


# ----------------------------------------------------------------------------- bad files


def _jpeg_bytes() -> bytes:
    b = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(b, "JPEG")
    return b.getvalue()


def _png_bytes() -> bytes:
    b = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


BAD = {
    "truncated_jpeg": ("t.jpg", lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
                       r"(?i)^cannot decode: .*truncated"),
    "truncated_png": ("t.png", lambda: _png_bytes()[: len(_png_bytes()) // 2],
                      r"^cannot decode: "),
    "zero_bytes": ("z.jpg", lambda: b"", r"^not an image"),
    "text_as_jpg": ("t.jpg", lambda: b"image_names,emergency_or_no\n0.jpg,1\n", r"^not an image"),
    "random_bytes": ("r.png", lambda: np.random.default_rng(1).bytes(3000), r"^not an image"),
    "jpeg_header_only": ("h.jpg", lambda: _jpeg_bytes()[:200], r"^cannot decode: "),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_raise_badimage_with_reason(tmp_path, kind):
    name, make, reason = BAD[kind]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(BadImage, match=reason) as e:
        load_rgb(path)
    assert str(e.value).strip()
    assert e.value.__cause__ is None and e.value.__suppress_context__  # "from None"


def test_every_truncation_point_is_badimage(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "cut.jpg"
    for cut in range(0, len(data) - 2, 37):
        path.write_bytes(data[:cut])
        with pytest.raises(BadImage):
            load_rgb(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImage, match="^file not found$"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(BadImage, match="^cannot decode"):
        load_rgb(tmp_path)


@pytest.mark.parametrize("limit, what", [(600, "warning"), (100, "error")])
def test_decompression_bomb(tmp_path, monkeypatch, limit, what):
    path = _save(Image.new("RGB", (32, 32), (9, 9, 9)), tmp_path / "big.png")  # 1024 pixels
    assert load_rgb(path).size == (32, 32)
    # PIL warns above MAX_IMAGE_PIXELS (600 < 1024) and refuses above twice it (200 < 1024)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BadImage, match="too large to decode safely"):
        load_rgb(path)


# ----------------------------------------------------------------------------- ImageRows


def _transform():
    return pixel_transform({"resize_size": [36], "crop_size": [32], "interpolation": "bilinear",
                            "antialias": True})


def test_image_rows_good_and_bad(tmp_path):
    make_images(tmp_path / "imgs", 3, size=20)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(_jpeg_bytes()[:300])
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    ds = read_image_list(tmp_path / "imgs")
    assert ds.ids == ["broken.jpg", "empty.png", "img000.png", "img001.png", "img002.png"]
    rows = ImageRows(ds, _transform(), 32)
    assert len(rows) == 5

    i, x, reason = rows[2]
    assert i == 2 and reason == ""
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert x.abs().sum() > 0
    # the same pixels through the transform directly: ImageRows adds nothing of its own
    assert torch.equal(x, _transform()(load_rgb(ds.path(2))))
    # class 0 is dark red, class 1 bright blue
    assert x[2].float().mean() < 64 < rows[3][1][2].float().mean()

    for k, expect in ((0, "cannot decode"), (1, "not an image")):
        i, x, reason = rows[k]
        assert i == k and reason.startswith(expect)
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and not x.any()


def test_image_rows_non_square_and_gray_inputs(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("L", (50, 20), 128).save(root / "wide.png")
    Image.new("RGBA", (13, 70), (0, 255, 0, 128)).save(root / "tall.png")
    arr = np.array([[0, 65535], [65535, 0]], dtype=np.uint16)
    Image.fromarray(arr).resize((40, 40), Image.NEAREST).save(root / "deep.png")
    ds = Dataset(root, ["wide.png", "tall.png", "deep.png"], np.array([0, 1, 0]), [0, 1])
    rows = ImageRows(ds, _transform(), 32)
    for k in range(3):
        i, x, reason = rows[k]
        assert (i, reason) == (k, "") and x.shape == (3, 32, 32)


def test_image_rows_through_dataloader_worker(tmp_path):
    make_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs" / "bad.jpg").write_text("not really")
    ds = read_image_list(tmp_path / "imgs")
    loader = torch.utils.data.DataLoader(ImageRows(ds, _transform(), 32), batch_size=3,
                                         num_workers=1)
    (idx, x, reasons), = list(loader)
    assert idx.tolist() == [0, 1, 2] and x.shape == (3, 3, 32, 32)
    assert reasons[0].startswith("not an image") and reasons[1:] == ("", "")
    assert not x[0].any() and x[1].any()


def test_image_rows_decode_a_batch_on_threads_in_order(tmp_path, monkeypatch):
    """Without workers, the DataLoader fetches a batch through ``__getitems__``: decoded on
    threads, in order, the same tensors and reasons as one by one."""
    make_images(tmp_path / "imgs", 7, size=24)
    (tmp_path / "imgs" / "bad.jpg").write_text("not really")
    ds = read_image_list(tmp_path / "imgs")
    threads = set()
    real = ImageRows.__getitem__

    def spy(self, i):
        threads.add(threading.get_ident())
        return real(self, i)

    monkeypatch.setattr(ImageRows, "__getitem__", spy)
    serial = ImageRows(ds, _transform(), 32)
    rows = ImageRows(ds, _transform(), 32, threads=3)
    loader = torch.utils.data.DataLoader(rows, batch_size=8, num_workers=0)
    (idx, x, reasons), = list(loader)
    assert threading.get_ident() not in threads and len(threads) > 1  # on the pool's threads
    assert idx.tolist() == list(range(8))
    for k in range(8):
        _, ref, why = serial[k]
        assert torch.equal(x[k], ref) and reasons[k] == why
    assert reasons[0].startswith("not an image")
    assert pickle.loads(pickle.dumps(rows))._pool is None  # a worker process makes its own
