import os
import shutil
from pathlib import Path

import pytest

from src.data.esc50 import REQUIRED_COLUMNS, DatasetError, Record, read_esc50
from src.data.synthetic import CLASSES, ESC10_CLASSES, generate_dataset

HEADER = "filename,fold,target,category,esc10,src_file,take\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generate_dataset(
        tmp_path_factory.mktemp("esc") / "ds", clips_per_class=5, num_folds=5, duration=0.2
    )


def _write_tree(root, body, header=HEADER):
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "meta" / "esc50.csv").write_text(header + body)
    return root


def test_read_generated_tree(tree):
    index = read_esc50(tree)
    assert index.root == str(tree)
    assert index.class_names == CLASSES
    assert index.num_classes == len(CLASSES)
    assert len(index.records) == 5 * len(CLASSES)
    assert index.folds() == [1, 2, 3, 4, 5]
    for rec in index.records:
        assert isinstance(rec, Record)
        assert os.path.isabs(rec.path) and os.path.isfile(rec.path)
        assert os.path.dirname(rec.path) == str(tree / "audio")
        fold, _clip, _take, target = os.path.basename(rec.path)[:-4].split("-")
        assert (rec.fold, rec.label) == (int(fold), int(target))


def test_relative_root_gives_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    index = read_esc50(tree.name)
    assert index.root == str(tree)
    assert all(os.path.isabs(r.path) for r in index.records)


def test_split(tree):
    index = read_esc50(tree)
    train, test = index.split([5])
    assert len(train) == 4 * len(CLASSES) and len(test) == len(CLASSES)
    assert {r.fold for r in test} == {5} and 5 not in {r.fold for r in train}
    assert sorted(r.label for r in test) == list(range(len(CLASSES)))
    train, test = index.split((1, 2))
    assert len(test) == 2 * len(CLASSES) and {r.fold for r in test} == {1, 2}
    assert set(train).isdisjoint(test)


def test_split_unknown_fold(tree):
    index = read_esc50(tree)
    with pytest.raises(DatasetError, match=r"\[7\].*available folds: \[1, 2, 3, 4, 5\]"):
        index.split([7])
    with pytest.raises(DatasetError):
        index.split([])


def test_esc10_only_remaps_targets(tree):
    full = read_esc50(tree)
    index = read_esc50(tree, esc10_only=True)
    expected = tuple(c for c in CLASSES if c in ESC10_CLASSES)
    assert index.class_names == expected and len(expected) == 10
    assert sorted({r.label for r in index.records}) == list(range(10))
    by_path = {r.path: r for r in full.records}
    for rec in index.records:
        original = by_path[rec.path]
        assert index.class_names[rec.label] == full.class_names[original.label]
        assert rec.fold == original.fold
    assert len(index.records) == 10 * 5


def test_esc10_remap_sorted_by_original_target(tmp_path):
    root = _write_tree(
        tmp_path / "ds",
        "1-1-A-7.wav,1,7,seven,True,1,A\n"
        "1-2-A-0.wav,1,0,zero,False,2,A\n"
        "2-3-A-3.wav,2,3,three,True,3,A\n"
        "2-4-A-1.wav,2,1,one,False,4,A\n"
        + "".join(f"1-{t}-A-{t}.wav,1,{t},c{t},False,{t},A\n" for t in (2, 4, 5, 6)),
    )
    index = read_esc50(root, esc10_only=True)
    assert index.class_names == ("three", "seven")
    assert [(os.path.basename(r.path), r.label) for r in index.records] == [
        ("1-1-A-7.wav", 1),
        ("2-3-A-3.wav", 0),
    ]


def test_custom_csv_and_audio_dir(tmp_path, tree):
    root = tmp_path / "other"
    root.mkdir()
    shutil.copy(tree / "meta" / "esc50.csv", root / "index.csv")
    index = read_esc50(root, csv_path="index.csv", audio_dir=tree / "audio")
    assert len(index.records) == 5 * len(CLASSES)
    assert all(r.path.startswith(str(tree / "audio")) for r in index.records)
    # the same through the config keys that the missing-csv error names
    from hydra import compose, initialize_config_dir

    from src.config import unknown_override_keys
    from src.data.datasets import load_index

    overrides = ["data=esc50", f"data.root={root}", "data.csv_path=index.csv",
                 f"data.audio_dir={tree / 'audio'}"]
    assert unknown_override_keys(overrides, "train") is None
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert load_index(cfg.data).records == index.records


def test_missing_root(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        read_esc50(root)
    msg = str(err.value)
    assert f"ESC-50 data not found at {root}" in msg
    assert f"python -m scripts.download esc50 --root {root}" in msg
    assert "data.root=" in msg and "meta/esc50.csv" in msg


def test_missing_csv(tmp_path):
    (tmp_path / "audio").mkdir()
    with pytest.raises(DatasetError, match="metadata csv not found") as err:
        read_esc50(tmp_path)
    assert str(tmp_path / "meta" / "esc50.csv") in str(err.value)


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_missing_column(tmp_path, column):
    columns = [c for c in HEADER.strip().split(",") if c != column]
    root = _write_tree(tmp_path / "ds", "", header=",".join(columns) + "\n")
    with pytest.raises(DatasetError) as err:
        read_esc50(root)
    assert repr(column) in str(err.value)
    assert str(root / "meta" / "esc50.csv") in str(err.value)


def test_esc10_only_needs_esc10_column(tmp_path):
    root = _write_tree(
        tmp_path / "ds", "1-1-A-0.wav,1,0,a\n", header="filename,fold,target,category\n"
    )
    assert read_esc50(root).class_names == ("a",)
    with pytest.raises(DatasetError, match="'esc10'"):
        read_esc50(root, esc10_only=True)


@pytest.mark.parametrize(
    ("row", "column"),
    [("1-1-A-0.wav,one,0,a,False,1,A", "fold"), ("1-1-A-0.wav,1,0.5,a,False,1,A", "target")],
)
def test_non_integer_values(tmp_path, row, column):
    root = _write_tree(tmp_path / "ds", "1-2-A-0.wav,1,0,a,False,2,A\n" + row + "\n")
    with pytest.raises(DatasetError) as err:
        read_esc50(root)
    msg = str(err.value)
    assert "row 3" in msg and "1-1-A-0.wav" in msg and repr(column) in msg
    assert str(root / "meta" / "esc50.csv") in msg


def test_inconsistent_category(tmp_path):
    root = _write_tree(
        tmp_path / "ds",
        "1-1-A-0.wav,1,0,dog,False,1,A\n1-2-A-0.wav,1,0,cat,False,2,A\n",
    )
    with pytest.raises(DatasetError, match="inconsistent class names for target 0") as err:
        read_esc50(root)
    assert str(root / "meta" / "esc50.csv") in str(err.value)


def test_category_on_two_targets(tmp_path):
    root = _write_tree(
        tmp_path / "ds",
        "1-1-A-0.wav,1,0,dog,False,1,A\n1-2-A-1.wav,1,1,dog,False,2,A\n",
    )
    with pytest.raises(DatasetError, match="'dog' is used by targets 0 and 1"):
        read_esc50(root)


def test_non_contiguous_targets_are_remapped_and_the_mapping_recorded(tmp_path, caplog):
    root = _write_tree(
        tmp_path / "ds",
        "1-1-A-0.wav,1,0,dog,False,1,A\n1-2-A-5.wav,1,5,cat,False,2,A\n"
        "2-3-A-2.wav,2,2,cow,False,3,A\n2-4-A-5.wav,2,5,cat,False,4,A\n",
    )
    with caplog.at_level("INFO", logger="src.data.esc50"):
        index = read_esc50(root)
    assert index.class_names == ("dog", "cow", "cat")  # in the order of the csv's targets
    assert [r.label for r in index.records] == [0, 2, 1, 2]
    assert index.info["target_remap"] == {"0": 0, "2": 1, "5": 2}
    (message,) = [r.getMessage() for r in caplog.records if "remapped" in r.getMessage()]
    assert str(root / "meta" / "esc50.csv") in message and "0, 2, 5" in message
    assert "0..2" in message


def test_contiguous_targets_are_kept_as_they_are(tree):
    index = read_esc50(tree)
    assert "target_remap" not in index.info
    # ESC-10's subset of the targets is remapped to 0..9, in the order of the targets.
    kept = sorted(index.class_names.index(c) for c in ESC10_CLASSES)
    assert kept != list(range(10))
    remap = read_esc50(tree, esc10_only=True).info["target_remap"]
    assert remap == {str(t): i for i, t in enumerate(kept)}


def test_empty_csv(tmp_path):
    root = _write_tree(tmp_path / "ds", "")
    with pytest.raises(DatasetError, match="no rows"):
        read_esc50(root)


def test_fold_differing_from_the_file_name_is_warned_about(tmp_path, caplog):
    """A csv fold that disagrees with the ESC-50 file name ({fold}-{src}-{take}-{target})
    is used as written (re-folding is allowed) but logged, naming the csv and the rows."""
    root = _write_tree(
        tmp_path / "ds",
        "1-100001-A-0.wav,7,0,dog,False,100001,A\n1-100002-A-1.wav,1,1,cat,False,100002,A\n"
        "2-100003-A-0.wav,2,0,dog,False,100003,A\n2-100004-B-1.wav,3,1,cat,False,100004,B\n"
        "my_own_name.wav,4,1,cat,False,1,A\n",
    )
    with caplog.at_level("WARNING", logger="src.data.esc50"):
        index = read_esc50(root)
    assert index.folds() == [1, 2, 3, 4, 7]  # the csv stays authoritative
    (message,) = [r.getMessage() for r in caplog.records if "file name" in r.getMessage()]
    assert str(root / "meta" / "esc50.csv") in message and "2 row(s)" in message
    assert "1-100001-A-0.wav (row 2: fold 7)" in message
    assert "2-100004-B-1.wav (row 5: fold 3)" in message
    assert "1-100002-A-1.wav" not in message and "my_own_name.wav" not in message


def test_folds_matching_the_file_names_give_no_warning(tree, caplog):
    with caplog.at_level("WARNING", logger="src.data.esc50"):
        read_esc50(tree)
    assert not [r for r in caplog.records if "file name" in r.getMessage()]
