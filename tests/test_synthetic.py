import collections
import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from src.data.synthetic import CLASSES, ESC10_CLASSES, ensure_dataset, generate_dataset

SMALL = dict(clips_per_class=5, num_folds=5, sample_rate=16000, duration=0.5)
COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def _rows(root):
    with open(root / "meta" / "esc50.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", seed=3, **SMALL)


def test_classes():
    assert len(CLASSES) >= 10
    assert len(set(CLASSES)) == len(CLASSES)
    assert len(ESC10_CLASSES) == 10 and ESC10_CLASSES <= set(CLASSES)


def test_layout_and_csv(small_tree):
    wavs = sorted(p.name for p in (small_tree / "audio").iterdir())
    assert len(wavs) == len(CLASSES) * SMALL["clips_per_class"]
    assert all(w.endswith(".wav") for w in wavs)

    header, rows = _rows(small_tree)
    assert header == COLUMNS
    assert sorted(r["filename"] for r in rows) == wavs
    assert [r["filename"] for r in rows] == sorted(r["filename"] for r in rows)
    for r in rows:
        fold, clip_id, take, target = r["filename"][: -len(".wav")].split("-")
        assert (fold, target, take) == (r["fold"], r["target"], r["take"]) and take == "A"
        assert clip_id == r["src_file"]
        assert r["category"] == CLASSES[int(r["target"])]
        assert r["esc10"] == str(r["category"] in ESC10_CLASSES)
    assert len({r["src_file"] for r in rows}) == len(rows)

    marker = json.loads((small_tree / ".complete").read_text())
    assert marker["seed"] == 3 and marker["clips_per_class"] == 5


def test_folds_balanced(small_tree):
    _, rows = _rows(small_tree)
    counts = collections.Counter((int(r["fold"]), int(r["target"])) for r in rows)
    folds = sorted({f for f, _ in counts})
    assert folds == [1, 2, 3, 4, 5]
    per_cell = SMALL["clips_per_class"] // SMALL["num_folds"]
    assert counts == {(f, t): per_cell for f in folds for t in range(len(CLASSES))}


def test_wav_format(small_tree):
    for path in sorted((small_tree / "audio").iterdir())[:: len(CLASSES)]:
        info = sf.info(path)
        assert (info.format, info.subtype) == ("WAV", "PCM_16")
        assert info.samplerate == 16000 and info.channels == 1
        assert info.frames == 8000
        x, _ = sf.read(path, dtype="float32")
        assert 0.05 < np.max(np.abs(x)) < 1.0
        assert np.isfinite(x).all()


def test_other_sample_rate(tmp_path):
    root = generate_dataset(
        tmp_path / "ds44", clips_per_class=2, num_folds=2, sample_rate=44100, duration=0.3
    )
    paths = sorted((root / "audio").iterdir())
    assert len(paths) == 2 * len(CLASSES)
    info = sf.info(paths[0])
    assert info.samplerate == 44100 and info.frames == round(0.3 * 44100)
    assert info.subtype == "PCM_16"


def test_deterministic(tmp_path, small_tree):
    again = generate_dataset(tmp_path / "again", seed=3, **SMALL)
    other = generate_dataset(tmp_path / "other", seed=4, **SMALL)
    assert (again / "meta" / "esc50.csv").read_bytes() == (
        small_tree / "meta" / "esc50.csv"
    ).read_bytes()
    names = sorted(p.name for p in (small_tree / "audio").iterdir())
    for name in names[:: len(names) // 6]:
        ref = (small_tree / "audio" / name).read_bytes()
        assert (again / "audio" / name).read_bytes() == ref
        assert (other / "audio" / name).read_bytes() != ref


def test_no_partial_or_temp_leftovers(tmp_path):
    generate_dataset(tmp_path / "ds", **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_generate_refuses_existing_unless_overwrite(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_dataset(root, **SMALL)
    assert (root / "keep.txt").exists()
    generate_dataset(root, overwrite=True, **SMALL)
    assert not (root / "keep.txt").exists()
    assert (root / "meta" / "esc50.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_invalid_params(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        generate_dataset(tmp_path / "x", clips_per_class=7, num_folds=5)
    assert not (tmp_path / "x").exists()


def test_ensure_dataset_cached_and_regenerated(tmp_path):
    root = tmp_path / "ds"
    assert ensure_dataset(root, **SMALL) == root
    csv_path = root / "meta" / "esc50.csv"
    wav = sorted((root / "audio").iterdir())[0]
    stamps = (csv_path.stat().st_mtime_ns, wav.stat().st_mtime_ns)

    ensure_dataset(root, **SMALL)  # same params: nothing rewritten
    assert (csv_path.stat().st_mtime_ns, wav.stat().st_mtime_ns) == stamps

    ensure_dataset(root, **{**SMALL, "duration": 0.25})  # new params: regenerated
    assert json.loads((root / ".complete").read_text())["duration"] == 0.25
    assert sf.info(sorted((root / "audio").iterdir())[0]).frames == 4000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ensure_dataset_ignores_incomplete_tree(tmp_path):
    root = generate_dataset(tmp_path / "ds", **SMALL)
    os.remove(root / ".complete")  # e.g. a tree left behind by an interrupted copy
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_dataset(root, **SMALL)
    (root / ".complete").write_text("{not json")
    with pytest.raises(FileExistsError):
        ensure_dataset(root, **SMALL)


def test_ensure_dataset_in_empty_dir(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    ensure_dataset(root, **SMALL)
    assert (root / ".complete").is_file()
