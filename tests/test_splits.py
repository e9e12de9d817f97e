"""The stratified split: proportions, determinism, order independence, hash, errors."""

from collections import Counter

import numpy as np
import pytest

from featprobe.errors import FeatprobeError
from featprobe.splits import Split, split


def _dataset(counts: dict, prefix: str = "img"):
    ids, labels = [], []
    for label, n in counts.items():
        for i in range(n):
            ids.append(f"{prefix}/{label}/{i:04d}.jpg")
            labels.append(label)
    return ids, labels


def _ids(ids, idx):
    return sorted(np.asarray(ids)[idx].tolist())


def test_partition_sizes_sorted_int64():
    ids, labels = _dataset({"cat": 60, "dog": 40})
    s = split(ids, labels, val_fraction=0.2, seed=3)
    assert isinstance(s, Split)
    assert (len(s.train), len(s.val), len(s.test)) == (80, 20, 0)
    for part in (s.train, s.val, s.test):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
    assert not set(s.train) & set(s.val)
    assert set(s.train) | set(s.val) == set(range(100))
    assert (s.n_invalid, s.val_fraction, s.test_fraction, s.seed) == (0, 0.2, 0.0, 3)
    assert len(s.hash) == 16 and int(s.hash, 16) >= 0


def test_stratified_proportions_three_way():
    ids, labels = _dataset({0: 500, 1: 300, 2: 200})
    s = split(ids, labels, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (700, 100, 200)
    y = np.asarray(labels)
    for part, n in ((s.val, 100), (s.test, 200), (s.train, 700)):
        counts = Counter(y[part].tolist())
        for cls, total in ((0, 500), (1, 300), (2, 200)):
            assert abs(counts[cls] - n * total / 1000) <= 1
    assert not (set(s.train) & set(s.test) or set(s.val) & set(s.test))


def test_fraction_is_of_whole_set_without_float_drift():
    ids, labels = _dataset({"a": 15, "b": 15})
    assert len(split(ids, labels, val_fraction=0.1).val) == 3  # 0.1 * 30 is 3.0000000000000004


def test_deterministic_and_order_independent():
    ids, labels = _dataset({"a": 37, "b": 23, "c": 19})
    a = split(ids, labels, val_fraction=0.25, seed=7)
    b = split(ids, labels, val_fraction=0.25, seed=7)
    assert a.hash == b.hash and np.array_equal(a.val, b.val)

    perm = np.random.default_rng(1).permutation(len(ids))
    shuffled_ids = [ids[i] for i in perm]
    shuffled_labels = [labels[i] for i in perm]
    c = split(shuffled_ids, shuffled_labels, val_fraction=0.25, seed=7)
    assert c.hash == a.hash
    assert _ids(shuffled_ids, c.val) == _ids(ids, a.val)
    assert _ids(shuffled_ids, c.train) == _ids(ids, a.train)
    # indices point into the order they were given in
    assert np.all(np.diff(c.val) > 0)


def test_hash_changes_with_seed_and_fraction():
    ids, labels = _dataset({"a": 50, "b": 50})
    base = split(ids, labels, val_fraction=0.2, seed=0)
    assert split(ids, labels, val_fraction=0.2, seed=1).hash != base.hash
    assert split(ids, labels, val_fraction=0.3, seed=0).hash != base.hash
    assert split(ids, labels, val_fraction=0.2, seed=0, test_fraction=0.1).hash != base.hash


def test_string_and_int_labels_give_same_split():
    ids, labels = _dataset({"no": 30, "yes": 20})
    as_int = [0 if v == "no" else 1 for v in labels]
    assert split(ids, labels).hash == split(ids, as_int).hash


def test_invalid_rows_excluded_and_counted():
    ids, labels = _dataset({"a": 40, "b": 40})
    valid = np.ones(80, dtype=bool)
    valid[[0, 5, 41, 79]] = False
    s = split(ids, labels, val_fraction=0.25, valid=valid)
    assert s.n_invalid == 4
    used = set(s.train) | set(s.val)
    assert used == set(np.flatnonzero(valid))
    assert len(s.val) == 19  # ceil(0.25 * 76)


def test_duplicate_ids_rejected():
    ids, labels = _dataset({"a": 10, "b": 10})
    ids[3] = ids[12]
    with pytest.raises(FeatprobeError, match="duplicate id.*img/b/0002.jpg"):
        split(ids, labels)


def test_class_with_one_image_rejected_by_name():
    ids, labels = _dataset({"common": 30, "rare": 1})
    with pytest.raises(FeatprobeError, match="'rare' has only 1 image"):
        split(ids, labels, val_fraction=0.2)


def test_class_too_small_for_three_parts():
    ids, labels = _dataset({"common": 30, "rare": 2})
    split(ids, labels, val_fraction=0.2)  # two parts: fine
    with pytest.raises(FeatprobeError, match="'rare' has only 2 image"):
        split(ids, labels, val_fraction=0.2, test_fraction=0.2)


def test_val_too_small_for_the_classes():
    ids, labels = _dataset({c: 4 for c in "abcde"})
    with pytest.raises(FeatprobeError, match="val_fraction=0.1 of 20 image"):
        split(ids, labels, val_fraction=0.1)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_range(bad):
    ids, labels = _dataset({"a": 10, "b": 10})
    with pytest.raises(FeatprobeError, match="val_fraction"):
        split(ids, labels, val_fraction=bad)


def test_length_mismatch_and_no_valid_rows():
    ids, labels = _dataset({"a": 10, "b": 10})
    with pytest.raises(FeatprobeError, match="20 ids but 19 labels"):
        split(ids, labels[:-1])
    with pytest.raises(FeatprobeError, match="no valid rows"):
        split(ids, labels, valid=[False] * 20)


def test_split_is_immutable():
    ids, labels = _dataset({"a": 10, "b": 10})
    s = split(ids, labels, val_fraction=0.2)
    with pytest.raises(AttributeError):
        s.seed = 1
    with pytest.raises(ValueError):
        s.train[0] = 99
