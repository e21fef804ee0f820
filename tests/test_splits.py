"""Train / validation / test splits: disjoint, stratified, the test split chooses nothing."""

import numpy as np
import pytest

from src.config import ConfigError
from src.data.index import DatasetIndex, Record
from src.data.splits import check_split_config, make_splits


def _index(labels, folds, multi=False, k=None):
    records = tuple(
        Record(path=f"/data/{i}.wav", label=tuple(lab) if multi else int(lab), fold=int(f))
        for i, (lab, f) in enumerate(zip(labels, folds))
    )
    k = k or (max(c for lab in labels for c in lab) + 1 if multi else max(labels) + 1)
    return DatasetIndex(records=records, class_names=tuple(f"c{i}" for i in range(k)),
                        root="/data", multi_label=multi)


CV = {"val_fraction": 0.25, "split_seed": 0}


def test_cv_carves_a_stratified_validation_split_from_the_training_folds():
    labels = np.repeat(np.arange(4), 20)  # 4 classes x 20 clips
    folds = np.tile(np.arange(1, 6), 16)  # 5 folds, 4 clips per class per fold
    index = _index(labels, folds)
    s = make_splits(index, 3, CV)
    assert set(folds[s.test]) == {3}
    assert set(folds[s.train]) | set(folds[s.val]) == {1, 2, 4, 5}
    assert not set(s.train) & set(s.val) and not set(s.val) & set(s.test)
    assert len(s.train) + len(s.val) + len(s.test) == len(labels)
    # 16 training clips per class, a quarter of them validate: 4 per class.
    assert np.bincount(labels[s.val], minlength=4).tolist() == [4, 4, 4, 4]
    assert "carved" in s.val_source and "split_seed=0" in s.val_source


def test_carve_is_seeded_and_differs_between_test_folds_and_seeds():
    labels = np.repeat(np.arange(3), 30)
    folds = np.tile(np.arange(1, 6), 18)
    index = _index(labels, folds)
    a, b = make_splits(index, 1, CV), make_splits(index, 1, CV)
    assert np.array_equal(a.val, b.val)
    c = make_splits(index, 1, {**CV, "split_seed": 1})
    assert not np.array_equal(a.val, c.val)


def test_fixed_validation_folds():
    labels = np.arange(30) % 3
    folds = np.repeat([1, 2, 3], 10)
    index = _index(labels, folds)
    s = make_splits(index, 3, {"train_folds": [1], "val_folds": [2]})
    assert set(folds[s.train]) == {1} and set(folds[s.val]) == {2} and set(folds[s.test]) == {3}
    assert s.val_source.startswith("fixed")


def test_multi_label_carve_covers_the_rare_classes():
    rng = np.random.default_rng(0)
    labels = []
    for i in range(400):
        common = [int(rng.integers(0, 3))]
        rare = [3 + (i // 10) % 5] if i % 10 == 0 else []  # classes 3..7: 8 clips each
        labels.append(sorted(set(common + rare)))
    folds = np.ones(400, int)
    folds[300:] = 2
    index = _index(labels, folds, multi=True, k=8)
    s = make_splits(index, 2, {"train_folds": [1], "val_fraction": 0.25, "split_seed": 0})
    assert len(s.val) == 75 and len(s.train) == 225
    val_counts = index.label_counts(s.val)
    train_counts = index.label_counts(s.train)
    # every rare class with >= 2 training-pool clips reaches validation, and keeps some to train
    assert (val_counts[3:] >= 1).all() and (train_counts[3:] >= 1).all()


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"folds": [1], "train_folds": [1, 2], "val_fraction": 0.1}, r"data.train_folds.*share fold\(s\) \[1\]"),
        ({"folds": [3], "train_folds": [1], "val_folds": [3]}, r"data.val_folds.*share fold\(s\) \[3\]"),
        ({"folds": [3], "train_folds": [1, 2], "val_folds": [2]}, r"train_folds.*val_folds.*\[2\]"),
        ({"folds": [1], "val_fraction": 0}, "data.val_fraction"),
        ({"folds": [1], "val_fraction": None}, "data.val_fraction"),
    ],
)
def test_bad_split_configs_fail_before_any_work(cfg, match):
    with pytest.raises(ConfigError, match=match):
        check_split_config(cfg)


def test_a_file_listed_in_two_splits_is_refused():
    records = (
        Record("/d/a.wav", 0, 1), Record("/d/b.wav", 1, 1), Record("/d/a.wav", 0, 2),
        Record("/d/c.wav", 1, 1), Record("/d/d.wav", 0, 1),
    )
    index = DatasetIndex(records=records, class_names=("x", "y"), root="/d")
    with pytest.raises(ConfigError, match="share 1 audio file.*a.wav"):
        make_splits(index, 2, {"val_fraction": 0.3})


def test_a_file_listed_twice_in_one_split_is_refused():
    records = (
        Record("/d/a.wav", 0, 1), Record("/d/b.wav", 1, 1), Record("/d/c.wav", 1, 1),
        Record("/d/d.wav", 0, 1), Record("/d/e.wav", 0, 2), Record("/d/e.wav", 0, 2),
    )
    index = DatasetIndex(records=records, class_names=("x", "y"), root="/d")
    with pytest.raises(ConfigError, match="test split of test fold 2 lists 1 audio file.*e.wav"):
        make_splits(index, 2, {"val_fraction": 0.3})


def test_an_empty_fixed_validation_split_names_the_folds_not_the_fraction():
    """FSD50K-style fixed validation fold that holds no clip (every dev.csv row marked
    train): the error names data.val_folds and the folds there are, not val_fraction."""
    index = _index([0, 1, 0, 1, 0, 1], [1, 1, 1, 3, 3, 3])
    with pytest.raises(ConfigError, match=r"data\.val_folds=\[2\] holds no clip .*its folds "
                                          r"are \[1, 3\].*data\.val_folds=null") as err:
        make_splits(index, 3, {"val_folds": [2], "val_fraction": 0.1})
    assert "raise data.val_fraction" not in str(err.value)
