"""Datasets: tutorial CSV + folder, class-per-folder trees, image lists, fingerprints, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, write_csv

from featprobe.data import (
    Dataset,
    load_dataset,
    read_csv_dataset,
    read_folder_dataset,
    read_image_list,
)
from featprobe.errors import FeatprobeError

HEADER = "image_names,emergency_or_no"


@pytest.fixture
def imgs(tmp_path) -> Path:
    """``images/`` holding img000.png .. img005.png."""
    make_images(tmp_path / "images", 6)
    return tmp_path / "images"


def _csv(tmp_path, text: str, name: str = "t.csv", encoding: str = "utf-8") -> Path:
    return write_csv(tmp_path / name, text, encoding)


# ----------------------------------------------------------------------------- tutorial CSV


def test_tutorial_csv_images_beside_it(tutorial_csv):
    ds = read_csv_dataset(tutorial_csv)
    assert isinstance(ds, Dataset)
    assert ds.root == tutorial_csv.parent / "images"
    assert ds.ids == [f"img{i:03d}.jpg" for i in range(8)]
    assert ds.classes == [0, 1] and all(type(c) is int for c in ds.classes)
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert len(ds) == 8 and ds.path(3) == tutorial_csv.parent / "images" / "img003.jpg"
    assert ds.source == str(tutorial_csv)
    # load_dataset decides "CSV" from a file path and gives the same dataset
    again = load_dataset(tutorial_csv)
    assert again.ids == ds.ids and again.labels.tolist() == ds.labels.tolist()


def test_explicit_images_folder(tmp_path):
    make_images(tmp_path / "pics", 4)
    (tmp_path / "meta").mkdir()
    csv = write_csv(tmp_path / "meta" / "train.csv",
                    f"{HEADER}\nimg000.png,1\nimg001.png,0\nimg002.png,1\nimg003.png,0\n")
    with pytest.raises(FeatprobeError, match="image folder not found"):
        read_csv_dataset(csv)  # no meta/images/
    ds = read_csv_dataset(csv, images=tmp_path / "pics")
    assert ds.root == tmp_path / "pics"
    assert ds.labels.tolist() == [1, 0, 1, 0]
    assert load_dataset(csv, images=str(tmp_path / "pics")).ids == ds.ids


def test_string_labels_sorted_and_mapped(tmp_path, imgs):
    csv = _csv(tmp_path, "file,animal\nimg000.png,zebra\nimg001.png,cat\nimg002.png,dog\n"
                         "img003.png,cat\nimg004.png,zebra\n")
    ds = read_csv_dataset(csv)
    assert ds.classes == ["cat", "dog", "zebra"]
    assert ds.labels.tolist() == [2, 0, 1, 0, 2]
    assert [ds.classes[k] for k in ds.labels] == ["zebra", "cat", "dog", "cat", "zebra"]


def test_int_labels_sorted_numerically_and_mapped(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,10\nimg001.png,2\nimg002.png,-1\nimg003.png,2\n")
    ds = read_csv_dataset(csv)
    assert ds.classes == [-1, 2, 10]  # numeric order, not "10" < "2"
    assert ds.labels.tolist() == [2, 1, 0, 1]


def test_labels_that_only_look_like_ints_stay_strings(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,01\nimg001.png,1\n")
    ds = read_csv_dataset(csv)
    assert ds.classes == ["01", "1"]


def test_explicit_columns_among_many(tmp_path, imgs):
    csv = _csv(tmp_path, "split,label,notes,path_to_image\ntrain,b,x,img000.png\n"
                         "train,a,y,img001.png\nval,b,z,img002.png\n")
    with pytest.raises(FeatprobeError, match="--image-col"):
        read_csv_dataset(csv)
    ds = read_csv_dataset(csv, image_col="path_to_image", label_col="label")
    assert ds.ids == ["img000.png", "img001.png", "img002.png"]
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [1, 0, 1]
    ds = read_csv_dataset(csv, image_col="path_to_image", label_col="split")
    assert ds.classes == ["train", "val"] and ds.labels.tolist() == [0, 0, 1]


def test_guessed_image_column_but_label_column_ambiguous(tmp_path, imgs):
    csv = _csv(tmp_path, "image_names,a,b\nimg000.png,1,2\n")
    with pytest.raises(FeatprobeError, match="--label-col"):
        read_csv_dataset(csv)
    assert read_csv_dataset(csv, label_col="b").classes == [2]


@pytest.mark.parametrize(
    "header, row, ids_col_first",
    [("file,cls", "{img},{lab}", True), ("cls,image_names", "{lab},{img}", False),
     ("xx,yy", "{img},{lab}", True)],
)
def test_two_column_auto_detect(tmp_path, imgs, header, row, ids_col_first):
    lines = [header] + [row.format(img=f"img00{i}.png", lab=lab)
                        for i, lab in enumerate(["b", "a", "b"])]
    ds = read_csv_dataset(_csv(tmp_path, "\n".join(lines) + "\n"))
    assert ds.ids == ["img000.png", "img001.png", "img002.png"]
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [1, 0, 1]


def test_bom_prefixed_utf8(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\r\nimg000.png,1\r\nimg001.png,0\r\n", encoding="utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    ds = read_csv_dataset(csv)  # the BOM must not become part of the first column's name
    assert ds.ids == ["img000.png", "img001.png"] and ds.labels.tolist() == [1, 0]
    assert read_csv_dataset(csv, image_col="image_names", label_col="emergency_or_no").ids


def test_blank_lines_and_whitespace_ignored(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\n\nimg000.png,1\n\n  img001.png , 0 \n,\n\n")
    ds = read_csv_dataset(csv)
    assert ds.ids == ["img000.png", "img001.png"]
    assert ds.labels.tolist() == [1, 0]


def test_quoted_names_with_commas_and_unicode(tmp_path):
    make_images(tmp_path / "images", 2)
    os.rename(tmp_path / "images" / "img000.png", tmp_path / "images" / "a, b.png")
    os.rename(tmp_path / "images" / "img001.png", tmp_path / "images" / "süß 🚑.png")
    csv = _csv(tmp_path, f'{HEADER}\n"a, b.png",1\n"süß 🚑.png",0\n')
    ds = read_csv_dataset(csv)
    assert ds.ids == ["a, b.png", "süß 🚑.png"] and ds.labels.tolist() == [1, 0]


def test_ids_in_subfolders(tmp_path):
    make_images(tmp_path / "images" / "sub", 2)
    ds = read_csv_dataset(_csv(tmp_path, f"{HEADER}\nsub/img000.png,1\nsub/img001.png,0\n"))
    assert ds.ids == ["sub/img000.png", "sub/img001.png"]
    assert ds.path(1).is_file()


def test_unlabelled_csv(tmp_path, imgs):
    csv = _csv(tmp_path, "image_names\nimg000.png\nimg001.png\n")
    ds = load_dataset(csv, labelled=False)
    assert ds.ids == ["img000.png", "img001.png"] and ds.labels is None and ds.classes == []
    with pytest.raises(FeatprobeError, match="--label-col"):
        read_csv_dataset(csv)


# ----------------------------------------------------------------------------- CSV errors


def test_missing_images_named_with_count(tmp_path, imgs):
    rows = [f"img{i:03d}.png,{i % 2}" for i in range(6)]
    rows += [f"gone{i}.png,0" for i in range(7)]
    csv = _csv(tmp_path, HEADER + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(FeatprobeError, match=r"7 of 13 images not found") as e:
        read_csv_dataset(csv)
    msg = str(e.value)
    assert "gone0.png, gone1.png, gone2.png, gone3.png, gone4.png (and 2 more)" in msg
    assert "gone5.png" not in msg and str(imgs) in msg


def test_one_missing_image(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\nnope.jpg,0\n")
    with pytest.raises(FeatprobeError, match=r"1 of 2 images not found in .*: nope\.jpg$"):
        read_csv_dataset(csv)


def test_duplicate_ids(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\nimg001.png,0\nimg000.png,0\n img001.png,1\n")
    with pytest.raises(FeatprobeError, match=r"duplicate image names: img000\.png, img001\.png"):
        read_csv_dataset(csv)


def test_duplicate_column_names(tmp_path, imgs):
    with pytest.raises(FeatprobeError, match="duplicate column names: x"):
        read_csv_dataset(_csv(tmp_path, "x,x\nimg000.png,1\n"))


@pytest.mark.parametrize("option", ["image_col", "label_col"])
def test_unknown_column_option(tmp_path, imgs, option):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\n")
    flag = "--" + option.replace("_", "-")
    with pytest.raises(FeatprobeError, match=rf"no column 'nope' \({flag}\); columns are"):
        read_csv_dataset(csv, **{option: "nope"})


def test_more_than_two_columns_without_options(tmp_path, imgs):
    with pytest.raises(FeatprobeError, match=r"has columns \['a', 'b', 'c'\].*--image-col"):
        read_csv_dataset(_csv(tmp_path, "a,b,c\nimg000.png,1,2\n"))


def test_empty_csv(tmp_path, imgs):
    with pytest.raises(FeatprobeError, match=r"is empty \(no header row\)"):
        read_csv_dataset(_csv(tmp_path, ""))
    with pytest.raises(FeatprobeError, match=r"is empty \(no header row\)"):
        read_csv_dataset(_csv(tmp_path, "\n\n\n", name="blank.csv"))


def test_header_only_csv(tmp_path, imgs):
    with pytest.raises(FeatprobeError, match="has a header but no rows"):
        read_csv_dataset(_csv(tmp_path, f"{HEADER}\n"))
    with pytest.raises(FeatprobeError, match="has a header but no rows"):
        read_csv_dataset(_csv(tmp_path, f"{HEADER}\n\n,\n", name="b.csv"))


def test_non_utf8_csv(tmp_path, imgs):
    (tmp_path / "bad.csv").write_bytes(b"image_names,label\n\xff\xfe\x00\x81\x9f garbage,\x80\n")
    with pytest.raises(FeatprobeError, match="cannot read CSV .*bad.csv"):
        read_csv_dataset(tmp_path / "bad.csv")
    (tmp_path / "latin1.csv").write_bytes(f"{HEADER}\ncafé.png,1\n".encode("latin-1"))
    with pytest.raises(FeatprobeError, match="cannot read CSV"):
        read_csv_dataset(tmp_path / "latin1.csv")


def test_nonexistent_path(tmp_path):
    with pytest.raises(FeatprobeError, match="CSV file not found"):
        read_csv_dataset(tmp_path / "nope.csv")
    with pytest.raises(FeatprobeError, match="no such file or folder: .*nope.csv"):
        load_dataset(tmp_path / "nope.csv")


def test_image_folder_missing(tmp_path):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\n")
    with pytest.raises(FeatprobeError, match=r"image folder not found: .*images \(pass --images"):
        read_csv_dataset(csv)
    with pytest.raises(FeatprobeError, match="image folder not found: .*elsewhere"):
        read_csv_dataset(csv, images=tmp_path / "elsewhere")


def test_empty_label_cell_names_line(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\nimg001.png,\nimg002.png,0\nimg003.png\n")
    with pytest.raises(FeatprobeError, match=r"empty label on line\(s\) 3, 5$"):
        read_csv_dataset(csv)


def test_empty_image_name_names_line(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\n ,0\n")
    with pytest.raises(FeatprobeError, match=r"empty image name on line\(s\) 3$"):
        read_csv_dataset(csv)


def test_empty_label_line_number_after_blank_lines(tmp_path, imgs):
    # line 1 header, 2-3 blank, 4 good, 5 the empty label
    csv = _csv(tmp_path, f"{HEADER}\n\n\nimg000.png,1\nimg001.png,\n")
    with pytest.raises(FeatprobeError, match=r"empty label on line\(s\) 5$"):
        read_csv_dataset(csv)


def test_blank_row_with_extra_fields_is_not_a_crash(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,1\n,,\nimg001.png,0\n")
    try:
        ds = read_csv_dataset(csv)
    except FeatprobeError:
        return  # a clear error naming the line is fine too
    assert ds.ids == ["img000.png", "img001.png"]


def test_folder_options_refused_for_tree(class_tree):
    with pytest.raises(FeatprobeError, match="apply to a CSV"):
        load_dataset(class_tree, image_col="x")


# ----------------------------------------------------------------------------- folder tree


def test_class_tree(class_tree):
    ds = read_folder_dataset(class_tree)
    assert ds.root == class_tree
    assert ds.classes == ["cat", "dog"]
    assert ds.ids == [os.path.join("cat", f"img00{i}.png") for i in range(3)] + [
        os.path.join("dog", f"img00{i}.png") for i in range(2)]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert all(ds.path(i).is_file() for i in range(len(ds)))
    assert load_dataset(class_tree).ids == ds.ids


def test_class_tree_ignores_hidden_non_images_and_includes_nested(class_tree):
    (class_tree / "cat" / ".DS_Store").write_bytes(b"\0\0")
    make_images(class_tree / "cat", 1, prefix=".hidden")          # hidden image file
    make_images(class_tree / ".git", 1)                            # hidden class folder
    make_images(class_tree / "dog" / ".thumbs", 1)                 # hidden subfolder
    (class_tree / "dog" / "notes.txt").write_text("not an image")
    (class_tree / "dog" / "readme.md").write_text("#")
    make_images(class_tree, 1, prefix="loose")                      # a file at the root
    make_images(class_tree / "dog" / "night" / "deep", 2, ext="jpg", prefix="n")  # nested
    (class_tree / "dog" / "UPPER.PNG").write_bytes((class_tree / "dog" / "img000.png").read_bytes())
    ds = read_folder_dataset(class_tree)
    assert ds.classes == ["cat", "dog"]
    dog = sorted(i for i, k in zip(ds.ids, ds.labels) if k == 1)
    assert dog == sorted([os.path.join("dog", "img000.png"), os.path.join("dog", "img001.png"),
                          os.path.join("dog", "UPPER.PNG"),
                          os.path.join("dog", "night", "deep", "n000.jpg"),
                          os.path.join("dog", "night", "deep", "n001.jpg")])
    assert len(ds) == 3 + 5
    assert not any(part.startswith(".") for i in ds.ids for part in Path(i).parts)


def test_class_tree_int_folder_names_become_int_classes(tmp_path):
    for name in ("10", "2", "0"):
        make_images(tmp_path / "t" / name, 1)
    ds = read_folder_dataset(tmp_path / "t")
    assert ds.classes == [0, 2, 10]
    assert {i.split(os.sep)[0]: ds.classes[k] for i, k in zip(ds.ids, ds.labels)} == {
        "0": 0, "2": 2, "10": 10}


@pytest.mark.parametrize("setup", ["empty", "empty_classes", "only_text"])
def test_empty_tree(tmp_path, setup):
    root = tmp_path / "t"
    root.mkdir()
    if setup != "empty":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
    if setup == "only_text":
        (root / "cat" / "a.txt").write_text("x")
        make_images(root / ".hidden", 2)
    with pytest.raises(FeatprobeError, match=r"no images found under .*<class>/<image>"):
        read_folder_dataset(root)


def test_tree_not_a_folder(tmp_path):
    with pytest.raises(FeatprobeError, match="not a folder"):
        read_folder_dataset(tmp_path / "nope")


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable(tutorial_csv):
    a = read_csv_dataset(tutorial_csv)
    f = a.fingerprint()
    assert len(f) == 64 and int(f, 16) >= 0
    assert a.fingerprint() == f
    assert read_csv_dataset(tutorial_csv).fingerprint() == f


def test_fingerprint_changes_when_image_touched(tutorial_csv):
    ds = read_csv_dataset(tutorial_csv)
    before = ds.fingerprint()
    st = os.stat(ds.path(2))
    os.utime(ds.path(2), ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert ds.fingerprint() != before


def test_fingerprint_changes_when_image_rewritten_same_size(tutorial_csv):
    ds = read_csv_dataset(tutorial_csv)
    before = ds.fingerprint()
    p = ds.path(0)
    st = os.stat(p)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even 1 ns later counts
    assert os.stat(p).st_size == st.st_size
    assert ds.fingerprint() != before


def test_fingerprint_changes_when_label_changes(tutorial_csv):
    before = read_csv_dataset(tutorial_csv).fingerprint()
    text = tutorial_csv.read_text()
    tutorial_csv.write_text(text.replace("img000.jpg,0", "img000.jpg,1"))
    assert read_csv_dataset(tutorial_csv).fingerprint() != before


def test_fingerprint_changes_when_class_renamed(tmp_path, imgs):
    csv = _csv(tmp_path, f"{HEADER}\nimg000.png,cat\nimg001.png,dog\n")
    before = read_csv_dataset(csv).fingerprint()
    _csv(tmp_path, f"{HEADER}\nimg000.png,cow\nimg001.png,dog\n")  # same indices, new class
    assert read_csv_dataset(csv).fingerprint() != before


def test_fingerprint_changes_when_row_added_or_reordered(tutorial_csv):
    before = read_csv_dataset(tutorial_csv).fingerprint()
    make_images(tutorial_csv.parent / "images", 1, ext="jpg", prefix="extra")
    with open(tutorial_csv, "a") as f:
        f.write("extra000.jpg,0\n")
    added = read_csv_dataset(tutorial_csv).fingerprint()
    assert added != before
    lines = tutorial_csv.read_text().splitlines()
    tutorial_csv.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert read_csv_dataset(tutorial_csv).fingerprint() not in (before, added)


# ----------------------------------------------------------------------------- image lists


def test_read_image_list_folder(tmp_path):
    make_images(tmp_path / "new", 2, ext="jpg")
    make_images(tmp_path / "new" / "more", 1)
    (tmp_path / "new" / "list.txt").write_text("x")
    make_images(tmp_path / "new", 1, prefix=".hidden")
    ds = read_image_list(tmp_path / "new")
    assert ds.root == tmp_path / "new"
    assert ds.ids == sorted(["img000.jpg", "img001.jpg", os.path.join("more", "img000.png")])
    assert ds.labels is None and ds.classes == []
    assert load_dataset(tmp_path / "new", labelled=False).ids == ds.ids
    assert read_image_list(str(tmp_path / "new")).ids == ds.ids


def test_read_image_list_files(tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "b" / "c", 1, ext="jpg")
    files = [tmp_path / "a" / "img001.png", str(tmp_path / "b" / "c" / "img000.jpg"),
             tmp_path / "a" / "img000.png"]
    ds = read_image_list(files)
    assert ds.root == tmp_path.resolve()
    assert ds.ids == [os.path.join("a", "img001.png"), os.path.join("b", "c", "img000.jpg"),
                      os.path.join("a", "img000.png")]  # the order given
    assert ds.labels is None
    assert [ds.path(i).resolve() for i in range(3)] == [Path(p).resolve() for p in files]
    one = read_image_list(tmp_path / "a" / "img000.png")
    assert one.ids == ["img000.png"] and one.root == (tmp_path / "a").resolve()


def test_read_image_list_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(FeatprobeError, match="no images found under"):
        read_image_list(tmp_path / "empty")
    make_images(tmp_path / "a", 1)
    with pytest.raises(FeatprobeError, match=r"1 of 2 images not found .*nope\.png"):
        read_image_list([tmp_path / "a" / "img000.png", tmp_path / "a" / "nope.png"])
    with pytest.raises(FeatprobeError, match="duplicate image names: img000.png"):
        read_image_list([tmp_path / "a" / "img000.png", tmp_path / "a" / "." / "img000.png"])


def test_read_image_list_empty_list(tmp_path):
    with pytest.raises(FeatprobeError):
        read_image_list([])


def test_read_image_list_skips_hidden_folders(tmp_path):
    make_images(tmp_path / "new", 1)
    make_images(tmp_path / "new" / ".ipynb_checkpoints", 1, prefix="ckpt")
    assert read_image_list(tmp_path / "new").ids == ["img000.png"]
