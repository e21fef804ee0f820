"""Clips cut from one recording stay on one side of every split (Record.group)."""

import logging

import numpy as np
import pytest
import soundfile as sf

from src.data.esc50 import read_esc50
from src.data.folder import read_folder
from src.data.index import DatasetError, DatasetIndex, Record
from src.data.speech_commands import read_speech_commands
from src.data.splits import make_splits
from src.data.urbansound8k import read_urbansound8k

CV = {"val_fraction": 0.2, "split_seed": 0}


def _index(labels, folds, groups, multi=False):
    records = tuple(
        Record(path=f"/data/{i}.wav", label=tuple(lab) if multi else int(lab), fold=int(f),
               group=None if g is None else str(g))
        for i, (lab, f, g) in enumerate(zip(labels, folds, groups))
    )
    k = max(c for lab in labels for c in lab) + 1 if multi else max(labels) + 1
    return DatasetIndex(records=records, class_names=tuple(f"c{i}" for i in range(k)),
                        root="/data", multi_label=multi)


def _sources(rng, classes=5, per_class=24, folds=5):
    """Recordings of 1-5 clips each; a recording's clips share its class and fold."""
    labels, folds_out, groups = [], [], []
    g = 0
    for c in range(classes):
        n = 0
        while n < per_class:
            size = int(min(rng.integers(1, 6), per_class - n))
            labels += [c] * size
            folds_out += [1 + g % folds] * size
            groups += [g] * size
            n += size
            g += 1
    return np.array(labels), np.array(folds_out), np.array(groups)


def _split_groups(groups, a, b):
    return set(groups[a]) & set(groups[b])


def test_the_carved_validation_split_keeps_each_recording_whole():
    rng = np.random.default_rng(3)
    labels, folds, groups = _sources(rng)
    index = _index(labels, folds, groups)
    for seed in range(6):
        for test_fold in (1, 3, 5):
            s = make_splits(index, test_fold, {**CV, "split_seed": seed})
            assert not _split_groups(groups, s.train, s.val)
            assert not _split_groups(groups, s.train, s.test)
            pool = len(s.train) + len(s.val)
            assert 0.1 * pool <= len(s.val) <= 0.3 * pool
            # every class has training and validation clips
            assert set(labels[s.val]) == set(labels[s.train]) == set(range(5))
    assert "whole source recordings" in s.val_source and "sources" in s.val_source


def test_carving_clip_by_clip_splits_recordings():
    rng = np.random.default_rng(3)
    labels, folds, groups = _sources(rng)
    index = _index(labels, folds, groups)
    split = [_split_groups(groups, s.train, s.val) for s in (
        make_splits(index, 1, {**CV, "split_seed": seed, "split_by_source": False})
        for seed in range(6))]
    assert any(split)  # the same data without sources leaks recordings into validation
    assert "whole source" not in make_splits(
        index, 1, {**CV, "split_by_source": False}).val_source


def test_clips_without_a_shared_source_are_carved_as_before():
    labels = np.repeat(np.arange(4), 20)
    folds = np.tile(np.arange(1, 6), 16)
    plain = _index(labels, folds, [None] * len(labels))
    own = _index(labels, folds, [f"rec{i}" for i in range(len(labels))])
    for seed in range(3):
        a = make_splits(plain, 2, {**CV, "split_seed": seed})
        b = make_splits(own, 2, {**CV, "split_seed": seed})
        assert np.array_equal(a.val, b.val) and a.val_source == b.val_source


def test_multi_label_carve_keeps_recordings_whole():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for g in range(150):
        tags = tuple(sorted(set(rng.choice(6, size=rng.integers(1, 3), p=[.4, .3, .15, .1, .04,
                                                                         .01]).tolist())))
        for _ in range(int(rng.integers(1, 4))):
            labels.append(tags)
            groups.append(g)
    groups = np.array(groups)
    index = _index(labels, [1] * len(labels), groups, multi=True)
    index = DatasetIndex(records=index.records + (Record("/data/t.wav", (0,), 2),),
                         class_names=index.class_names, root="/data", multi_label=True)
    s = make_splits(index, 2, CV)
    all_groups = index.groups()
    assert not _split_groups(all_groups, s.train, s.val)
    assert abs(len(s.val) - 0.2 * (len(labels))) <= 3
    val_classes = {c for i in s.val for c in index.records[i].label}
    assert {0, 1, 2, 3} <= val_classes


def test_a_recording_in_the_test_fold_and_in_training_is_warned_about(caplog):
    labels = [0, 0, 1, 1, 0, 1, 0, 1]
    folds = [1, 2, 1, 2, 3, 3, 2, 1]
    groups = ["a", "a", "b", "c", "d", "e", "f", "g"]  # "a" is in folds 1 and 2
    index = _index(labels, folds, groups)
    with caplog.at_level(logging.WARNING, logger="src.data.splits"):
        make_splits(index, 1, {"train_folds": [2], "val_folds": [3]})
    assert "1 source recording(s) have clips in both the training and test splits" in caplog.text
    assert "'a'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.data.splits"):
        make_splits(index, 3, {"train_folds": [2], "val_folds": [1]})
    assert "training and validation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.data.splits"):
        make_splits(index, 3, CV)
    assert "source recording" not in caplog.text


def _wav(path, seconds=0.1, rate=8000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * rate), np.float32), rate, subtype="PCM_16")


def test_esc50_sources_from_src_file_or_the_file_name(tmp_path):
    root = tmp_path / "esc"
    (root / "meta").mkdir(parents=True)
    names = ["1-100032-A-0.wav", "1-100032-B-0.wav", "2-200-A-1.wav", "2-300-A-1.wav"]
    for n in names:
        _wav(root / "audio" / n)
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
        "1-100032-B-0.wav,1,0,dog,True,100032,B\n"
        "2-200-A-1.wav,2,1,rain,False,777,A\n"
        "2-300-A-1.wav,2,1,rain,False,,A\n"
    )
    index = read_esc50(root)
    assert [r.group for r in index.records] == ["100032", "100032", "777", "300"]
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category\n"
        "1-100032-A-0.wav,1,0,dog\n1-100032-B-0.wav,1,0,dog\n"
        "2-200-A-1.wav,2,1,rain\nmine.wav,2,1,rain\n"
    )
    _wav(root / "audio" / "mine.wav")
    index = read_esc50(root)
    assert [r.group for r in index.records] == ["100032", "100032", "200", None]
    assert index.groups().tolist() == [0, 0, 1, 2]


def test_urbansound8k_and_speech_commands_sources(tmp_path):
    root = tmp_path / "UrbanSound8K"
    rows = []
    for i, (fs_id, fold) in enumerate([(11, 1), (11, 1), (12, 2), (13, 2)]):
        name = f"{fs_id}-0-0-{i}.wav"
        _wav(root / "audio" / f"fold{fold}" / name)
        rows.append(f"{name},{fs_id},0,1,1,{fold},0,dog_bark\n")
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text(
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n" + "".join(rows))
    assert [r.group for r in read_urbansound8k(root).records] == ["11", "11", "12", "13"]

    sc = tmp_path / "sc"
    for rel in ["yes/aa01_nohash_0.wav", "yes/aa01_nohash_1.wav", "no/bb02_nohash_0.wav",
                "no/other.wav"]:
        _wav(sc / rel, 1.0, 16000)
    (sc / "validation_list.txt").write_text("no/bb02_nohash_0.wav\n")
    (sc / "testing_list.txt").write_text("")
    groups = {r.path.split("/sc/")[1]: r.group for r in read_speech_commands(sc).records}
    assert groups == {"no/bb02_nohash_0.wav": "bb02", "no/other.wav": None,
                      "yes/aa01_nohash_0.wav": "aa01", "yes/aa01_nohash_1.wav": "aa01"}


def test_folder_source_pattern_deals_each_recording_to_one_fold(tmp_path):
    root = tmp_path / "mine"
    takes = {"dog": {"rec1": 3, "rec2": 1, "rec3": 2, "rec4": 1}, "rain": {"r9": 2, "r8": 2}}
    for cls, recs in takes.items():
        for rec, n in recs.items():
            for k in range(n):
                _wav(root / cls / f"{rec}_{k:03d}.wav")
    _wav(root / "rain" / "loose.wav")
    plain = read_folder(root, labels_from_subdirs=True, num_folds=2)
    assert "sources" not in plain.info
    assert all(r.group is None for r in plain.records)
    # without a pattern the takes of rec1 go round-robin into both folds
    assert {r.fold for r in plain.records if "rec1_" in r.key} == {1, 2}

    index = read_folder(root, labels_from_subdirs=True, num_folds=2,
                        source_pattern=r"^([^/]+/[^_]+)_")
    folds = {}
    for r in index.records:
        folds.setdefault(r.group or r.key, set()).add(r.fold)
    assert all(len(f) == 1 for f in folds.values())
    assert index.records[[r.key for r in index.records].index("rain/loose.wav")].group is None
    assert index.info["sources"] == 7
    # the largest recording first, each to the fold with fewest clips of its class
    per_fold = {(c, f): sum(1 for r in index.records if r.label == c and r.fold == f)
                for c in (0, 1) for f in (1, 2)}
    # dog: rec1 (3) -> 1, rec3 (2) -> 2, rec2 -> 2, rec4 -> 1; rain: r8 -> 1, r9 -> 2, loose -> 1
    assert per_fold == {(0, 1): 4, (0, 2): 3, (1, 1): 3, (1, 2): 2}
    assert [folds[f"{c}/{k}"] for c, k in (("dog", "rec1"), ("dog", "rec3"), ("dog", "rec2"),
                                           ("dog", "rec4"), ("rain", "r8"), ("rain", "r9"))] == [
        {1}, {2}, {2}, {1}, {1}, {2}]


def test_folder_source_pattern_errors(tmp_path, caplog):
    root = tmp_path / "mine"
    _wav(root / "a" / "x.wav")
    _wav(root / "b" / "y.wav")
    with pytest.raises(DatasetError, match=r"data.source_pattern='\(' is not a valid regular"):
        read_folder(root, labels_from_subdirs=True, source_pattern="(")
    with caplog.at_level(logging.WARNING, logger="src.data.folder"):
        index = read_folder(root, labels_from_subdirs=True, source_pattern="nomatch_(\\d+)")
    assert "matches none of the 2 file(s)" in caplog.text
    assert all(r.group is None for r in index.records)


def test_pretraining_validation_keeps_each_recording_whole():
    from src.pretrain import _carve

    rows = np.arange(100, 160)
    groups = np.repeat(np.arange(20), 3)
    plain = _carve(rows, 0.25, 0)
    assert np.array_equal(plain[0], _carve(rows, 0.25, 0, np.arange(60))[0])
    for seed in range(5):
        train, val = _carve(rows, 0.25, seed, groups)
        assert len(val) == 15 and len(train) == 45
        assert not set(groups[train - 100]) & set(groups[val - 100])
    leaks = [set(groups[t - 100]) & set(groups[v - 100])
             for t, v in (_carve(rows, 0.25, s) for s in range(5))]
    assert any(leaks)


def test_a_large_source_does_not_fill_the_validation_split():
    """One 40-clip recording and ten single clips of one class, 5 validation clips
    wanted: the big recording stays in training whichever order the sources are drawn."""
    labels = np.array([0] * 50 + [1] * 50)
    groups = np.array(["big"] * 40 + [f"s{i}" for i in range(10)] + [f"t{i}" for i in range(50)])
    index = _index(labels, [1] * 100 + [], groups)
    index = DatasetIndex(records=index.records + (Record("/data/t.wav", 0, 2),),
                         class_names=index.class_names, root="/data")
    for seed in range(12):
        s = make_splits(index, 2, {"val_fraction": 0.1, "split_seed": seed})
        assert np.bincount(labels[s.val], minlength=2).tolist() == [5, 5], seed


def test_pretraining_validation_is_not_swallowed_by_a_large_source():
    from src.pretrain import _carve

    rows = np.arange(100)
    groups = np.array([0] * 90 + list(range(1, 11)))
    for seed in range(12):
        _train, val = _carve(rows, 0.1, seed, groups)
        assert len(val) == 10 and not set(val) & set(range(90)), seed


def test_multi_label_carve_keeps_a_class_with_one_source_in_training():
    labels = [(0,)] * 10 + [(1,)] * 20
    groups = ["one"] * 10 + [f"s{i}" for i in range(20)]
    index = _index(labels, [1] * 30, groups, multi=True)
    index = DatasetIndex(records=index.records + (Record("/data/t.wav", (0,), 2),),
                         class_names=index.class_names, root="/data", multi_label=True)
    for seed in range(6):
        s = make_splits(index, 2, {"val_fraction": 0.15, "split_seed": seed})
        train_classes = {c for i in s.train for c in index.records[i].label}
        assert train_classes == {0, 1} and len(s.val) <= 2 * 0.15 * 30, seed
