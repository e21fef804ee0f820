"""Speech Commands V2 and UrbanSound8K: readers on small trees in the real layouts, their
configs, and one training run on an UrbanSound8K tree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, TINY_MODEL, train_env
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.config import DATA_FORMATS, validate_config
from src.data.datasets import load_index
from src.data.esc50 import DatasetError, Record
from src.data.speech_commands import read_speech_commands
from src.data.urbansound8k import REQUIRED_COLUMNS, read_urbansound8k

CONF = ROOT / "conf"

# --- Speech Commands ------------------------------------------------------------------

WORDS = ("down", "go", "left", "yes", "zero")  # written out of order below
SPEAKERS = ("0a7c2a8d", "3b4f8f24", "bb05582b", "f2e59fea")
VALIDATION_SPEAKER, TEST_SPEAKER = "3b4f8f24", "bb05582b"


def _wav(path, seconds, rate, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * noise
    sf.write(path, wave.astype("float32"), rate, subtype="PCM_16")
    return path


def make_speech_commands(root):
    """ROOT/<word>/<speaker>_nohash_<n>.wav (16 kHz, 1 s) + split lists, like the release."""
    validation, testing = [], []
    for w, word in enumerate(reversed(WORDS)):
        for speaker in SPEAKERS:
            for n in range(2):
                rel = f"{word}/{speaker}_nohash_{n}.wav"
                _wav(root / rel, 1.0, 16000, seed=w)
                if speaker == VALIDATION_SPEAKER:
                    validation.append(rel)
                elif speaker == TEST_SPEAKER:
                    testing.append(rel)
    _wav(root / "_background_noise_" / "white_noise.wav", 2.0, 16000, seed=9)
    _wav(root / "_background_noise_" / "running_tap.wav", 2.0, 16000, seed=8)
    (root / "_background_noise_" / "README.md").write_text("noise\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    (root / "empty_folder").mkdir()  # no clips: not a class
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    return root


@pytest.fixture(scope="module")
def sc_tree(tmp_path_factory):
    return make_speech_commands(tmp_path_factory.mktemp("sc") / "speech_commands_v0.02")


def _rel(rec, root):
    return Path(rec.path).relative_to(root).as_posix()


def test_speech_commands_classes_labels_and_splits(sc_tree):
    index = read_speech_commands(sc_tree)
    assert index.root == str(sc_tree)
    assert index.class_names == WORDS  # sorted folder names; _background_noise_ excluded
    assert len(index.records) == len(WORDS) * len(SPEAKERS) * 2
    assert index.folds() == [1, 2, 3]
    for rec in index.records:
        assert isinstance(rec, Record) and os.path.isabs(rec.path) and os.path.isfile(rec.path)
        word, name = _rel(rec, sc_tree).split("/")
        assert index.class_names[rec.label] == word
        speaker = name.split("_nohash_")[0]
        expected = {VALIDATION_SPEAKER: 2, TEST_SPEAKER: 3}.get(speaker, 1)
        assert rec.fold == expected, rec
    train, test = index.split([3])
    assert len(test) == len(WORDS) * 2 and all(r.fold == 3 for r in test)
    assert {r.fold for r in train} == {1, 2}


def test_speech_commands_list_handling(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    # blank lines, CRLF, a duplicate line and a leading ./ are tolerated
    (root / "testing_list.txt").write_text(
        "\r\n./yes/bb05582b_nohash_0.wav\r\nyes/bb05582b_nohash_0.wav\r\n\r\n"
    )
    (root / "validation_list.txt").write_text("")
    index = read_speech_commands(root)
    folds = {_rel(r, root): r.fold for r in index.records}
    assert folds.pop("yes/bb05582b_nohash_0.wav") == 3
    assert set(folds.values()) == {1}


def test_speech_commands_include_background(sc_tree):
    index = read_speech_commands(sc_tree, include_background=True)
    assert index.class_names == (*WORDS, "_background_noise_")  # word labels unchanged
    noise = [r for r in index.records if r.label == len(WORDS)]
    assert sorted(Path(r.path).name for r in noise) == ["running_tap.wav", "white_noise.wav"]
    assert {r.fold for r in noise} == {1}
    assert len(index.records) == len(read_speech_commands(sc_tree).records) + 2


def test_speech_commands_missing_root_names_path_and_download(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        read_speech_commands(missing)
    assert str(missing) in str(err.value)
    assert f"python -m scripts.download speech_commands --root {missing}" in str(err.value)


@pytest.mark.parametrize("name", ["validation_list.txt", "testing_list.txt"])
def test_speech_commands_missing_list(tmp_path, name):
    root = make_speech_commands(tmp_path / "sc")
    (root / name).unlink()
    with pytest.raises(DatasetError) as err:
        read_speech_commands(root)
    assert str(root / name) in str(err.value)
    assert "python -m scripts.download speech_commands" in str(err.value)


def test_speech_commands_list_names_a_missing_file(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with open(root / "validation_list.txt", "a") as fh:
        fh.write("right/bb05582b_nohash_3.wav\n")
    with pytest.raises(DatasetError) as err:
        read_speech_commands(root)
    msg = str(err.value)
    assert "right/bb05582b_nohash_3.wav" in msg and str(root / "validation_list.txt") in msg


def test_speech_commands_clip_in_both_lists(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with open(root / "testing_list.txt", "a") as fh:
        fh.write(f"go/{VALIDATION_SPEAKER}_nohash_1.wav\n")
    with pytest.raises(DatasetError, match=f"go/{VALIDATION_SPEAKER}_nohash_1.wav.*both"):
        read_speech_commands(root)


def test_speech_commands_without_words(tmp_path):
    root = tmp_path / "sc"
    root.mkdir()
    (root / "validation_list.txt").write_text("")
    (root / "testing_list.txt").write_text("")
    with pytest.raises(DatasetError, match="no word folders"):
        read_speech_commands(root)


# --- UrbanSound8K ---------------------------------------------------------------------

US8K_CLASSES = ("air_conditioner", "car_horn", "dog_bark")
US8K_HEADER = "slice_file_name,fsID,start,end,salience,fold,classID,class\n"


def make_urbansound8k(root, folds=3, per_class=2):
    """ROOT/audio/fold<k>/<fsID>-<classID>-<occ>-<slice>.wav + metadata csv, mixed rates and
    lengths like the release (rows grouped by source recording, not by fold)."""
    rows = []
    i = 0
    for class_id, name in enumerate(US8K_CLASSES):
        for fold in range(1, folds + 1):
            for k in range(per_class):
                fs_id = 100000 + 37 * i
                filename = f"{fs_id}-{class_id}-0-{k}.wav"
                rate = (44100, 22050)[i % 2]
                seconds = (0.6, 1.3, 2.5)[i % 3]
                _wav(root / "audio" / f"fold{fold}" / filename, seconds, rate, seed=class_id)
                start = 1.5 * k
                rows.append(
                    f"{filename},{fs_id},{start},{start + seconds},{1 + i % 2},{fold},"
                    f"{class_id},{name}\n"
                )
                i += 1
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text(US8K_HEADER + "".join(rows))
    return root


@pytest.fixture(scope="module")
def us8k_tree(tmp_path_factory):
    return make_urbansound8k(tmp_path_factory.mktemp("us8k") / "UrbanSound8K")


def test_urbansound8k_classes_labels_and_folds(us8k_tree):
    index = read_urbansound8k(us8k_tree)
    assert index.root == str(us8k_tree)
    assert index.class_names == US8K_CLASSES
    assert len(index.records) == 3 * 3 * 2
    assert index.folds() == [1, 2, 3]
    for rec in index.records:
        assert os.path.isabs(rec.path) and os.path.isfile(rec.path)
        assert Path(rec.path).parent == us8k_tree / "audio" / f"fold{rec.fold}"
        assert int(Path(rec.path).name.split("-")[1]) == rec.label
    rates = {sf.info(r.path).samplerate for r in index.records}
    assert rates == {44100, 22050}
    train, test = index.split([2])
    assert len(test) == 6 and len(train) == 12


def _us8k_csv(tmp_path, header, body):
    root = tmp_path / "us8k"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text(header + body)
    return root


def test_urbansound8k_missing_root_names_path_and_download(tmp_path):
    missing = tmp_path / "UrbanSound8K"
    with pytest.raises(DatasetError) as err:
        read_urbansound8k(missing)
    assert str(missing) in str(err.value)
    assert f"python -m scripts.download urbansound8k --root {missing}" in str(err.value)


def test_urbansound8k_missing_csv(tmp_path):
    (tmp_path / "us8k" / "audio").mkdir(parents=True)
    with pytest.raises(DatasetError) as err:
        read_urbansound8k(tmp_path / "us8k")
    assert str(tmp_path / "us8k" / "metadata" / "UrbanSound8K.csv") in str(err.value)


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_urbansound8k_missing_column(tmp_path, column):
    cols = US8K_HEADER.strip().split(",")
    values = "100032-3-0-0.wav,100032,0.0,0.3,1,5,3,dog_bark".split(",")
    keep = [i for i, c in enumerate(cols) if c != column]
    root = _us8k_csv(
        tmp_path,
        ",".join(cols[i] for i in keep) + "\n",
        ",".join(values[i] for i in keep) + "\n",
    )
    with pytest.raises(DatasetError) as err:
        read_urbansound8k(root)
    msg = str(err.value)
    assert repr(column) in msg and str(root / "metadata" / "UrbanSound8K.csv") in msg


@pytest.mark.parametrize(
    "body,match",
    [
        ("a.wav,1,0,1,1,x,0,dog_bark\n", r"row 2 \(slice_file_name='a.wav'\).*'fold'"),
        ("a.wav,1,0,1,1,1,0,dog_bark\nb.wav,1,0,1,1,1,0,siren\n", "inconsistent class names"),
        ("a.wav,1,0,1,1,1,0,dog_bark\nb.wav,1,0,1,1,1,2,siren\n", "contiguous"),
        ("a.wav,1,0,1,1,0,0,dog_bark\n", "fold=0"),
        ("", "no rows"),
    ],
)
def test_urbansound8k_bad_rows(tmp_path, body, match):
    with pytest.raises(DatasetError, match=match):
        read_urbansound8k(_us8k_csv(tmp_path, US8K_HEADER, body))


def test_load_index_dispatches(sc_tree, us8k_tree, caplog):
    assert {"speech_commands", "urbansound8k"} <= set(DATA_FORMATS)
    sc = load_index(OmegaConf.create({"format": "speech_commands", "root": str(sc_tree)}))
    assert sc.class_names == WORDS
    for variable in (False, True):
        caplog.clear()
        sc_bg = load_index(OmegaConf.create({
            "format": "speech_commands", "root": str(sc_tree), "include_background": True,
            "variable_length": variable}))
        assert sc_bg.num_classes == len(WORDS) + 1
        # Fixed-length clips keep the first second of a noise recording: said, with the fix.
        assert ("data.variable_length=true to train on a random crop" in caplog.text) == (
            not variable)
    us = load_index(OmegaConf.create({"format": "urbansound8k", "root": str(us8k_tree)}))
    assert us.class_names == US8K_CLASSES


# --- configs --------------------------------------------------------------------------


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def test_speech_commands_experiment_config(monkeypatch):
    monkeypatch.setenv("AUDIO_DATA_DIR", "/datasets")
    cfg = make_cfg("experiment=speech_commands")
    validate_config(cfg)
    assert cfg.name == "speech_commands" and cfg.logger.name == "wandb"
    d = cfg.data
    assert (d.format, d.root) == ("speech_commands", "/datasets/speech_commands_v0.02")
    assert (d.sample_rate, d.clip_seconds) == (16000, 1.0)
    assert list(d.folds) == [3] and list(d.train_folds) == [1]
    assert "esc10" not in d
    t = cfg.trainer
    assert (t.optimizer.lr, t.batch_size, t.epochs) == (2.5e-4, 128, 30)
    assert (t.schedule.name, t.schedule.decay_start, t.schedule.decay_factor) == (
        "step_decay", 5, 0.85,
    )
    assert (cfg.augment.freq_mask_param, cfg.augment.time_mask_param) == (48, 48)


def test_urbansound8k_experiment_config(monkeypatch):
    monkeypatch.setenv("AUDIO_DATA_DIR", "/datasets")
    cfg = make_cfg("experiment=urbansound8k")
    validate_config(cfg)
    assert cfg.name == "urbansound8k" and cfg.logger.name == "wandb"
    d = cfg.data
    assert (d.format, d.root) == ("urbansound8k", "/datasets/UrbanSound8K")
    assert d.clip_seconds == 4.0 and list(d.folds) == list(range(1, 11))
    assert not d.get("train_folds") and "esc10" not in d


def test_esc10_data_config():
    cfg = make_cfg("data=esc10")
    validate_config(cfg)
    esc50 = make_cfg("data=esc50").data
    assert cfg.data.name == "esc10" and cfg.name == "base-esc10"  # no experiment: base-
    assert cfg.data.esc10 is True and cfg.data.format == "esc50"
    assert (cfg.data.root, list(cfg.data.folds)) == (esc50.root, list(esc50.folds))


# --- end to end -----------------------------------------------------------------------

TINY = [*TINY_MODEL, "trainer.epochs=2"]


@pytest.mark.slow  # end to end training (~40 s); the readers are tested above
def test_urbansound8k_trains_end_to_end(tmp_path, us8k_tree):
    env = train_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "data=urbansound8k", f"data.root={us8k_tree}",
         "data.folds=[1]", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    runs = (tmp_path / "runs").rglob("results.json")
    (results,) = [p for p in runs if not p.parent.name.startswith("fold_")]
    r = json.loads(results.read_text())
    assert r["dataset"] == "urbansound8k" and r["class_names"] == list(US8K_CLASSES)
    (fold,) = r["per_fold"]
    # Folds 2-3 train (12 clips, 4 per class); one clip per class is carved off to validate.
    assert (fold["fold"], fold["num_train"], fold["num_val"], fold["num_test"]) == (1, 9, 3, 6)
    assert "carved from the training folds" in fold["splits"]["val_source"]


@pytest.mark.slow  # end to end training (~40 s); the readers are tested above
def test_fixed_train_validation_and_test_lists_train_end_to_end(tmp_path, sc_tree):
    """data.train_folds / data.val_folds: Speech Commands' lists are the splits, exactly."""
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "data=speech_commands", f"data.root={sc_tree}",
         *TINY_MODEL, "trainer.epochs=1", "trainer.attention_maps=0"],
        cwd=ROOT, env=train_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (run_dir,) = {p.parent for p in (tmp_path / "runs").rglob("results.json")
                  if not p.parent.name.startswith("fold_")}
    fold = json.loads((run_dir / "fold_3" / "results.json").read_text())
    listed = {name: set((sc_tree / name).read_text().split())
              for name in ("validation_list.txt", "testing_list.txt")}
    clips = {f"{w}/{s}_nohash_{n}.wav" for w in WORDS for s in SPEAKERS for n in range(2)}
    train = clips - listed["validation_list.txt"] - listed["testing_list.txt"]
    assert fold["splits"] == {
        "num_train": len(train), "num_val": len(listed["validation_list.txt"]),
        "num_test": len(listed["testing_list.txt"]), "val_source": "fixed: validation",
    }
    assert (len(train), len(listed["validation_list.txt"])) == (20, 10)
    # The test split is the testing list: its clips are the ones scored.
    keys = np.load(run_dir / "fold_3" / "predictions" / "test_last.npz")["keys"]
    assert {Path(k).relative_to(sc_tree).as_posix() for k in keys} == listed["testing_list.txt"]
    assert json.loads((run_dir / "results.json").read_text())["cv"]["folds"] == [3]
