"""Multi-label and unlabeled data: the AudioSet, FSD50K and folder readers on small trees in
the real layouts, the generated tagging set, and their configs."""

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import src.data.synthetic_tagging as tagging
from src.config import DATA_FORMATS, validate_config
from src.data.audioset import read_audioset
from src.data.datasets import load_index
from src.data.folder import DEFAULT_EXTENSIONS, read_folder
from src.data.fsd50k import read_fsd50k
from src.data.index import DatasetError
from src.data.synthetic import CLASSES

CONF = ROOT / "conf"


def _wav(path, seconds=0.1, rate=16000, seed=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * rate))
    sf.write(path, wave.astype("float32"), rate, format=fmt, subtype="PCM_16")
    return path


# --- AudioSet -------------------------------------------------------------------------

# (mid, display name): names with commas are quoted in the csv, as in the release
AS_CLASSES = [
    ("/m/09x0r", "Speech"),
    ("/m/05zppz", "Male speech, man speaking"),
    ("/m/0ytgt", "Child speech, kid speaking"),
    ("/t/dd00088", "Gush"),
    ("/m/068hy", "Domestic animals, pets"),
]
AS_NAMES = tuple(name for _mid, name in AS_CLASSES)
# split -> [(ytid, start, end, mids)]
AS_SEGMENTS = {
    "balanced_train": [
        ("--PJHxphWEs", "30.000", "40.000", "/m/09x0r,/t/dd00088"),
        ("--ZhevVpy1s", "50.000", "60.000", "/m/068hy"),
        ("-0BIyqJj9ZU", "30.000", "40.000", "/m/0ytgt,/m/09x0r"),
        ("-0RWZT-miFs", "420.000", "430.000", "/m/05zppz"),
        ("-0bzKaPzqCQ", "2.700", "12.700", "/t/dd00088,/m/068hy,/m/09x0r"),
    ],
    "unbalanced_train": [
        ("---1_cCGK4M", "0.000", "10.000", "/m/068hy"),
        ("---2_BBVHAA", "30.000", "40.000", "/m/09x0r"),
    ],
    "eval": [
        ("--4gqARaEJE", "0.000", "10.000", "/m/068hy,/m/0ytgt"),
        ("--BfvyPmVMo", "20.000", "30.000", "/m/05zppz"),
        ("--U7joUcTCo", "0.000", "10.000", "/t/dd00088"),
    ],
}
CSV_NAMES = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}


def write_class_labels(meta, classes=AS_CLASSES):
    meta.mkdir(parents=True, exist_ok=True)
    lines = ["index,mid,display_name"]
    lines += [f'{i},{mid},"{name}"' for i, (mid, name) in enumerate(classes)]
    (meta / "class_labels_indices.csv").write_text("\n".join(lines) + "\n")


def write_segments(meta, split, rows, raw_lines=()):
    """The official layout: three comment lines, spaces after commas, quoted label lists."""
    lines = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=5, "
        "num_positive_labels=9",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{y}, {s}, {e}, "{m}"' for y, s, e, m in rows]
    lines += list(raw_lines)
    (meta / CSV_NAMES[split]).write_text("\n".join(lines) + "\n")


def make_audioset(root, pattern="audio/{split}/{ytid}.wav", missing=(), segments=None):
    """csvs in ROOT/metadata and a tiny WAV per segment (except the ``missing`` YTIDs)."""
    segments = AS_SEGMENTS if segments is None else segments
    meta = root / "metadata"
    write_class_labels(meta)
    for n, (split, rows) in enumerate(segments.items()):
        write_segments(meta, split, rows)
        for i, (ytid, start, end, _mids) in enumerate(rows):
            if ytid in missing:
                continue
            t0, t1 = float(start), float(end)
            rel = pattern.format(
                ytid=ytid, split=split, start=start, end=end, start_int=int(t0),
                end_int=int(t1), start_ms=int(round(t0 * 1000)),
                end_ms=int(round(t1 * 1000)),
            )
            fmt = "FLAC" if rel.endswith(".flac") else None
            _wav(root / rel, seed=10 * n + i, fmt=fmt)
    return root


@pytest.fixture(scope="module")
def as_tree(tmp_path_factory):
    return make_audioset(tmp_path_factory.mktemp("as") / "audioset")


def _mids_to_labels(mids):
    index = {mid: i for i, (mid, _name) in enumerate(AS_CLASSES)}
    return tuple(sorted(index[m] for m in mids.split(",")))


def test_audioset_reads_the_official_layout(as_tree):
    index = read_audioset(as_tree)  # default: balanced_train + eval, ROOT/metadata
    assert index.multi_label and index.label_type == "multi"
    assert index.class_names == AS_NAMES
    assert index.folds() == [1, 3]
    assert index.fold_name(1) == "balanced_train" and index.fold_name(3) == "eval"
    expected = [
        (split, n, row) for split in ("balanced_train", "eval")
        for n, row in enumerate(AS_SEGMENTS[split])
    ]
    assert len(index.records) == len(expected)
    for rec, (split, n, (ytid, _s, _e, mids)) in zip(index.records, expected):
        assert rec.key == ytid
        assert rec.fold == {"balanced_train": 1, "eval": 3}[split]
        assert rec.label == _mids_to_labels(mids)
        assert rec.source == f"{CSV_NAMES[split]} row {4 + n}"  # after 3 comment lines
        assert rec.path == str(as_tree / "audio" / split / f"{ytid}.wav")
        assert os.path.isfile(rec.path)
    assert index.info["missing"]["count"] == 0
    assert index.info["splits"] == {"balanced_train": 5, "eval": 3}
    train, test = index.split([3])
    assert len(train) == 5 and len(test) == 3


def test_audioset_reads_only_the_splits_asked_for(tmp_path):
    root = make_audioset(tmp_path / "as")
    # a broken unbalanced csv is never opened when the recipe does not read that split
    (root / "metadata" / CSV_NAMES["unbalanced_train"]).write_text("garbage\n")
    assert read_audioset(root, splits=["balanced_train", "eval"]).folds() == [1, 3]
    assert read_audioset(root, splits="eval").folds() == [3]
    write_segments(root / "metadata", "unbalanced_train", AS_SEGMENTS["unbalanced_train"])
    full = read_audioset(root, splits=["eval", "unbalanced_train", "balanced_train"])
    assert full.folds() == [1, 2, 3]
    assert [r.fold for r in full.records] == sorted(r.fold for r in full.records)
    assert full.fold_name(2) == "unbalanced_train"
    with pytest.raises(DatasetError, match=r"data\.splits=\['train'\].*balanced_train"):
        read_audioset(root, splits=["train"])


def test_audioset_csv_dir_and_missing_csv(tmp_path):
    root = make_audioset(tmp_path / "as")
    os.rename(root / "metadata", root / "csvs")
    with pytest.raises(DatasetError, match=r"class_labels_indices\.csv.*data\.csv_dir"):
        read_audioset(root)
    assert len(read_audioset(root, csv_dir="csvs").records) == 8
    assert len(read_audioset(root, csv_dir=root / "csvs").records) == 8
    (root / "csvs" / CSV_NAMES["eval"]).unlink()
    with pytest.raises(DatasetError, match=r"eval_segments\.csv.*data\.splits"):
        read_audioset(root, csv_dir="csvs")
    with pytest.raises(DatasetError, match="no such directory"):
        read_audioset(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "pattern",
    [
        "{split}/Y{ytid}.wav",
        "audio/{ytid}_{start_int}.wav",
        "flac/{ytid}_{start}_{end}.flac",
        "clips/{ytid[0]}/{ytid}_{start_ms:07d}-{end_ms:07d}.wav",
    ],
)
def test_audioset_file_patterns(tmp_path, pattern):
    root = make_audioset(tmp_path / "as", pattern=pattern)
    index = read_audioset(root, splits=["balanced_train", "unbalanced_train", "eval"],
                          file_pattern=pattern, max_missing_fraction=0.0)
    assert len(index.records) == 10
    for rec in index.records:
        assert os.path.isfile(rec.path) and rec.key in os.path.basename(rec.path)
    if "start_int" in pattern:
        assert index.records[4].path.endswith("/audio/-0bzKaPzqCQ_2.wav")  # 2.7 s: truncated
    if "{start}" in pattern:
        assert index.records[0].path.endswith("/flac/--PJHxphWEs_30.000_40.000.flac")
    if "ms" in pattern:
        assert index.records[0].path.endswith("/clips/-/--PJHxphWEs_0030000-0040000.wav")
        assert index.records[4].path.endswith("/clips/-/-0bzKaPzqCQ_0002700-0012700.wav")


def test_audioset_wildcard_folders_and_per_split_patterns(tmp_path):
    # PANNs' layout: the unbalanced split spread over part folders
    root = tmp_path / "as"
    make_audioset(root, pattern="audios/{split}_segments/Y{ytid}.wav",
                  segments={k: v for k, v in AS_SEGMENTS.items() if k != "unbalanced_train"})
    meta = root / "metadata"
    write_segments(meta, "unbalanced_train", AS_SEGMENTS["unbalanced_train"])
    for part, (ytid, *_rest) in enumerate(AS_SEGMENTS["unbalanced_train"]):
        _wav(root / f"audios/unbalanced_train_segments/part{part:02d}/Y{ytid}.wav")
    everything = ["balanced_train", "unbalanced_train", "eval"]
    index = read_audioset(root, splits=everything, max_missing_fraction=0.0,
                          file_pattern="audios/{split}_segments/**/Y{ytid}.wav")
    assert len(index.records) == 10
    unbalanced = [r for r in index.records if r.fold == 2]
    assert [Path(r.path).parent.name for r in unbalanced] == ["part00", "part01"]
    assert index.records[0].path == str(root / "audios/balanced_train_segments/Y--PJHxphWEs.wav")
    per_split = {
        "balanced_train": "audios/balanced_train_segments/Y{ytid}.wav",
        "unbalanced_train": "audios/unbalanced_train_segments/part*/Y{ytid}.wav",
        "eval": "audios/eval_segments/Y{ytid}.wav",
    }
    assert len(read_audioset(root, splits=everything, file_pattern=per_split,
                             max_missing_fraction=0.0).records) == 10
    del per_split["eval"]
    with pytest.raises(DatasetError, match=r"no pattern for split\(s\) \['eval'\]"):
        read_audioset(root, splits=everything, file_pattern=per_split)


@pytest.mark.parametrize(
    "pattern, match",
    [
        ("audio/{video}.wav", r"unknown placeholder\(s\) \['video'\]"),
        ("audio/{split}/clip.wav", r"has no \{ytid\}"),
        ("audio/{split}/{ytid}*.wav", "wildcards may appear in the folder part only"),
        ("audio/{ytid", "not a valid pattern"),
    ],
)
def test_audioset_bad_file_pattern(as_tree, pattern, match):
    with pytest.raises(DatasetError, match=match):
        read_audioset(as_tree, file_pattern=pattern)


def test_audioset_missing_clips_below_the_limit_are_counted(tmp_path, caplog):
    root = make_audioset(tmp_path / "as", missing={"--ZhevVpy1s"})  # 1 of 5 balanced
    with caplog.at_level(logging.WARNING, logger="src.data.audioset"):
        index = read_audioset(root, max_missing_fraction=0.2)
    assert "--ZhevVpy1s" not in {r.key for r in index.records}
    assert len(index.records) == 7
    missing = index.info["missing"]
    assert (missing["count"], missing["total"]) == (1, 8)
    assert missing["fraction"] == pytest.approx(1 / 8)
    assert missing["by_split"] == {"balanced_train": {"missing": 1, "total": 5},
                                   "eval": {"missing": 0, "total": 3}}
    assert len(missing["examples"]) == 1
    assert "--ZhevVpy1s.wav (balanced_train_segments.csv row 5)" in missing["examples"][0]
    warnings = [r for r in caplog.records if "missing" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 8" in warnings[0].getMessage()
    json.dumps(index.info)  # goes to results.json as is


def test_audioset_missing_clips_above_the_limit_stop(tmp_path):
    # 1 of 3 eval clips missing: 33% > 20%, although only 1 of 8 overall
    root = make_audioset(tmp_path / "as", missing={"--BfvyPmVMo"})
    with pytest.raises(DatasetError) as err:
        read_audioset(root, max_missing_fraction=0.2)
    msg = str(err.value)
    assert "1 of 3 clips of the eval split" in msg and "data.max_missing_fraction=0.2" in msg
    assert "--BfvyPmVMo.wav (eval_segments.csv row 5)" in msg
    assert len(read_audioset(root, max_missing_fraction=0.5).records) == 7
    with pytest.raises(DatasetError, match="between 0 and 1"):
        read_audioset(root, max_missing_fraction=1.5)


def test_audioset_nothing_found_says_where_it_looked(as_tree):
    with pytest.raises(DatasetError) as err:
        read_audioset(as_tree, file_pattern="audio/{split}/Y{ytid}.wav")
    msg = str(err.value)
    assert "5 of 5 clips of the balanced_train split (100.0%)" in msg
    assert "holds files such as ['--PJHxphWEs.wav'" in msg and "data.file_pattern" in msg
    with pytest.raises(DatasetError, match="folder .*/wav/balanced_train does not exist"):
        read_audioset(as_tree, file_pattern="wav/{split}/{ytid}.wav")


ROW = "--PJHxphWEs, 30.000, 40.000"


@pytest.mark.parametrize(
    "lines, match",
    [
        ([f'{ROW}, "/m/09x0r,/m/nope"'],
         r"row 4 \(--PJHxphWEs\) has label\(s\) \['/m/nope'\] that are not in .*class_labels"),
        ([f'{ROW}, ""'], r"row 4 \(--PJHxphWEs\) has an empty label list"),
        ([f'{ROW}, "/m/09x0r"', '-0BIyqJj9ZU, 0.000, 10.000, "/m/068hy"',
          f'{ROW}, "/m/068hy"'],
         r"YTID --PJHxphWEs appears twice in the balanced_train split, rows 4 and 6"),
        (['--PJHxphWEs, 30.000, "/m/09x0r"'], r"row 4 has 3 field\(s\), expected 4"),
        ([f"{ROW}, /m/09x0r,/m/068hy"], r"row 4 has 5 field\(s\).*label list quoted"),
        (['--PJHxphWEs, 3O.000, 40.000, "/m/09x0r"'], r"row 4 has start_seconds='3O.000'"),
        (['--PJHxphWEs, 40.000, 30.000, "/m/09x0r"'], r"row 4 \(--PJHxphWEs\) ends at 30.000"),
        (['a/b, 0.000, 10.000, "/m/09x0r"'], r"row 4 has YTID 'a/b'"),
        ([], r"balanced_train_segments\.csv lists no segments"),
    ],
)
def test_audioset_bad_segment_rows(tmp_path, lines, match):
    root = make_audioset(tmp_path / "as")
    write_segments(root / "metadata", "balanced_train", [], raw_lines=lines)
    with pytest.raises(DatasetError, match=match) as err:
        read_audioset(root, max_missing_fraction=1.0)
    assert "balanced_train_segments.csv" in str(err.value)


def test_audioset_same_video_in_two_splits(tmp_path):
    segments = dict(AS_SEGMENTS)
    segments["eval"] = [*AS_SEGMENTS["eval"], AS_SEGMENTS["balanced_train"][2]]
    root = make_audioset(tmp_path / "as", segments=segments)
    with pytest.raises(DatasetError) as err:
        read_audioset(root)
    msg = str(err.value)
    assert "YTID -0BIyqJj9ZU is in both balanced_train_segments.csv (row 6)" in msg
    assert "eval_segments.csv (row 7)" in msg and "Remove it from the training csv" in msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("mid,index,display_name\n", "expected the header index,mid,display_name"),
        ('index,mid,display_name\n0,/m/a,"A"\n2,/m/b,"B"\n', r"row 3 has index '2', expected 1"),
        ('index,mid,display_name\n0,/m/a,"A"\n1,/m/a,"B"\n', r"row 3 repeats mid '/m/a'"),
        ("index,mid,display_name\n0,/m/a,Dog, bark\n", r"row 2 has 4 fields.*quote"),
        ("index,mid,display_name\n", "lists no classes"),
    ],
)
def test_audioset_bad_class_labels(tmp_path, text, match):
    root = make_audioset(tmp_path / "as")
    (root / "metadata" / "class_labels_indices.csv").write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_audioset(root)


def test_audioset_header_without_comment_and_blank_lines(tmp_path):
    root = make_audioset(tmp_path / "as")
    rows = AS_SEGMENTS["eval"]
    text = "YTID,start_seconds,end_seconds,positive_labels\n\n"
    text += "".join(f'{y},{s},{e},"{m}"\n\n' for y, s, e, m in rows)
    (root / "metadata" / CSV_NAMES["eval"]).write_text(text)
    index = read_audioset(root, splits=["eval"])
    assert [r.key for r in index.records] == [r[0] for r in rows]
    assert [r.source for r in index.records] == [f"eval_segments.csv row {n}" for n in (3, 5, 7)]


# --- FSD50K ---------------------------------------------------------------------------

VOCAB = [
    ("Accelerating_and_revving_and_vroom", "/m/07q2z82"),
    ("Accordion", "/m/0mkg"),
    ("Acoustic_guitar", "/m/042v_gx"),
    ("Guitar", "/m/0342h"),
    ("Music", "/m/04rlf"),
]
FSD_DEV = [  # fname, label indices, split
    ("64760", (2, 3, 4), "train"),
    ("16399", (0,), "train"),
    ("16401", (1, 4), "val"),
    ("101983", (3,), "train"),
]
FSD_EVAL = [("37199", (4,)), ("175151", (0, 1))]


def _names_mids(labels):
    names = ",".join(VOCAB[i][0] for i in labels)
    mids = ",".join(VOCAB[i][1] for i in labels)
    return f'"{names}","{mids}"'


def make_fsd50k(root, dev_lines=None, eval_lines=None, missing=()):
    truth = root / "FSD50K.ground_truth"
    truth.mkdir(parents=True)
    (truth / "vocabulary.csv").write_text(
        "".join(f"{i},{name},{mid}\n" for i, (name, mid) in enumerate(VOCAB))
    )
    if dev_lines is None:
        dev_lines = [f"{f},{_names_mids(lab)},{split}" for f, lab, split in FSD_DEV]
    if eval_lines is None:
        eval_lines = [f"{f},{_names_mids(lab)}" for f, lab in FSD_EVAL]
    (truth / "dev.csv").write_text("\n".join(["fname,labels,mids,split", *dev_lines]) + "\n")
    (truth / "eval.csv").write_text("\n".join(["fname,labels,mids", *eval_lines]) + "\n")
    for f, *_rest in FSD_DEV:
        if f not in missing:
            _wav(root / "FSD50K.dev_audio" / f"{f}.wav")
    for f, _lab in FSD_EVAL:
        if f not in missing:
            _wav(root / "FSD50K.eval_audio" / f"{f}.wav")
    return root


def test_fsd50k_reads_the_release_layout(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    index = read_fsd50k(root)
    assert index.multi_label and index.class_names == tuple(n for n, _m in VOCAB)
    assert index.folds() == [1, 2, 3]
    assert [index.fold_name(f) for f in (1, 2, 3)] == ["train", "val", "eval"]
    expected = [(f, lab, {"train": 1, "val": 2}[s], "dev") for f, lab, s in FSD_DEV]
    expected += [(f, lab, 3, "eval") for f, lab in FSD_EVAL]
    assert len(index.records) == len(expected)
    for rec, (fname, labels, fold, part) in zip(index.records, expected):
        assert (rec.key, rec.label, rec.fold) == (fname, labels, fold)
        assert rec.path == str(root / f"FSD50K.{part}_audio" / f"{fname}.wav")
    assert index.records[2].source == "dev.csv row 4"  # the header is row 1
    assert index.records[-1].source == "eval.csv row 3"
    assert index.info["missing"]["count"] == 0
    assert index.info["splits"] == {"train": 3, "val": 1, "eval": 2}


def test_fsd50k_configurable_folders(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    os.rename(root / "FSD50K.dev_audio", root / "dev_16k")
    with pytest.raises(DatasetError, match="3 of 3 clips of the train split.*dev_audio does not"):
        read_fsd50k(root)
    assert len(read_fsd50k(root, dev_audio_dir="dev_16k").records) == 6


def test_fsd50k_missing_files(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K", missing={"16399"})
    with pytest.raises(DatasetError) as err:
        read_fsd50k(root)  # default limit 0: a fixed download
    msg = str(err.value)
    assert "1 of 3 clips of the train split" in msg and "data.max_missing_fraction=0" in msg
    assert "16399.wav (dev.csv row 3)" in msg and "re-extract" in msg
    index = read_fsd50k(root, max_missing_fraction=0.5)
    assert len(index.records) == 5 and index.info["missing"]["count"] == 1


M = _names_mids


@pytest.mark.parametrize(
    "dev_lines, eval_lines, match",
    [
        (['1,"Accordion","/m/nope",train'], None,
         r"dev\.csv: row 2 \(fname 1\) has label\(s\) \['/m/nope'\] that are not in vocab"),
        (['1,"Guitar","/m/0mkg",train'], None,
         r"dev\.csv: row 2 \(fname 1\) has labels \['Guitar'\] but mids \['/m/0mkg'\]"),
        (['1,"","",train'], None, r"dev\.csv: row 2 \(fname 1\) has an empty 'mids' list"),
        (['1,"","/m/0mkg",train'], None,
         r"dev\.csv: row 2 \(fname 1\) has an empty 'labels' column but mids \['/m/0mkg'\]"),
        ([f"1,{M((1,))},test"], None, r"dev\.csv: row 2 \(fname 1\) has split='test'"),
        ([f"1,{M((1,))},train", f"1,{M((2,))},val"], None,
         r"dev\.csv: fname 1 \(row 3\) is already listed in dev\.csv row 2"),
        ([f"1,{M((1,))},train"], [f"1,{M((2,))}"],
         r"eval\.csv: fname 1 \(row 2\) is already listed in dev\.csv row 2"),
        ([f"a/b,{M((1,))},train"], None, r"dev\.csv: row 2 has fname 'a/b'"),
        ([], None, r"dev\.csv has no rows"),
        ([f"1,{M((1,))},train,extra"], None,
         r"dev\.csv: row 2 has 5 field\(s\), expected 4 \(fname,labels,mids,split\)"),
        (["1,Accordion,Guitar,/m/0mkg,/m/0342h,train"], None,  # lists without quotes
         r'dev\.csv: row 2 has 6 field\(s\), expected 4 .*need quotes, e\.g\. "Bark,Dog"'),
        (["1,Accordion"], None, r"dev\.csv: row 2 has 2 field\(s\), expected 4"),
    ],
)
def test_fsd50k_bad_rows(tmp_path, dev_lines, eval_lines, match):
    root = make_fsd50k(tmp_path / "FSD50K", dev_lines=dev_lines, eval_lines=eval_lines)
    with pytest.raises(DatasetError, match=match):
        read_fsd50k(root, max_missing_fraction=1.0)


def test_fsd50k_bad_metadata_files(tmp_path):
    root = make_fsd50k(tmp_path / "FSD50K")
    truth = root / "FSD50K.ground_truth"
    (truth / "eval.csv").write_text("fname,labels\n1,Music\n")
    with pytest.raises(DatasetError, match=r"eval\.csv is missing the required column 'mids'"):
        read_fsd50k(root)
    (truth / "vocabulary.csv").write_text("index,label,mid\n0,Music,/m/04rlf\n")
    with pytest.raises(DatasetError, match=r"row 1 has index 'index', expected 0.*no header"):
        read_fsd50k(root)
    (truth / "vocabulary.csv").unlink()
    with pytest.raises(DatasetError, match=r"vocabulary not found .*zenodo"):
        read_fsd50k(root)


# --- folder ---------------------------------------------------------------------------


def make_folder(root):
    for rel in ["b.wav", "a/x.FLAC", "a/deep/er/y.ogg", "c/z.aiff", "c/w.Au",
                "c/v.mp3", "c/u.aif"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")  # the reader only lists files
    for rel in [".hidden.wav", "a/.also_hidden.flac", ".git/objects/k.wav", "c/.cache/q.wav",
                "notes.txt", "a/readme.md", "c/song.wav.part"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "empty_dir").mkdir()
    return root


def test_folder_lists_audio_recursively(tmp_path):
    root = make_folder(tmp_path / "unlabeled")
    index = read_folder(root)
    keys = ["a/deep/er/y.ogg", "a/x.FLAC", "b.wav", "c/u.aif", "c/v.mp3", "c/w.Au", "c/z.aiff"]
    assert [r.key for r in index.records] == keys
    assert [r.path for r in index.records] == [str(root / k) for k in keys]
    assert all(r.label == () and r.fold == 1 for r in index.records)
    assert index.class_names == () and index.folds() == [1]
    assert index.info["files"] == 7 and tuple(index.info["extensions"]) == DEFAULT_EXTENSIONS
    only = read_folder(root, extensions=[".WAV", "flac"])
    assert [r.key for r in only.records] == ["a/x.FLAC", "b.wav"]
    assert [r.key for r in read_folder(root, extensions="ogg").records] == ["a/deep/er/y.ogg"]


def test_folder_labels_from_subdirs_and_folds(tmp_path):
    root = tmp_path / "mine"
    for cls, n in (("rain", 4), ("dog", 3)):
        for i in range(n):
            _wav(root / cls / f"{i}.wav")
    (root / ".trash").mkdir()
    _wav(root / ".trash" / "old.wav")
    index = read_folder(root, labels_from_subdirs=True, num_folds=2)
    assert not index.multi_label and index.class_names == ("dog", "rain")
    assert [(r.key, r.label, r.fold) for r in index.records] == [
        ("dog/0.wav", 0, 1), ("dog/1.wav", 0, 2), ("dog/2.wav", 0, 1),
        ("rain/0.wav", 1, 1), ("rain/1.wav", 1, 2), ("rain/2.wav", 1, 1), ("rain/3.wav", 1, 2),
    ]
    _wav(root / "loose.wav")
    with pytest.raises(DatasetError, match=r"1 audio file\(s\) lie directly in .*loose\.wav"):
        read_folder(root, labels_from_subdirs=True)


def test_folder_without_audio(tmp_path):
    root = tmp_path / "empty"
    (root / ".hidden").mkdir(parents=True)
    _wav(root / ".hidden" / "x.wav")
    (root / "notes.txt").write_text("no audio here\n")
    with pytest.raises(DatasetError) as err:
        read_folder(root)
    msg = str(err.value)
    assert str(root) in msg and "wav, flac, ogg, mp3, aiff, aif, au" in msg
    with pytest.raises(DatasetError, match="does not exist"):
        read_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="is empty"):
        read_folder(root, extensions=[])


# --- generated tagging set ------------------------------------------------------------

SMALL = dict(train_clips=12, eval_clips=6, duration=1.0, seed=3)


def _tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tag_tree(tmp_path_factory):
    return tagging.generate_tagging_dataset(tmp_path_factory.mktemp("tag") / "ds", **SMALL)


def test_tagging_set_reads_as_audioset(tag_tree):
    cfg = OmegaConf.create({"format": "synthetic_tagging", "root": str(tag_tree),
                            "generate": SMALL})
    index = load_index(cfg)
    assert index.multi_label and index.class_names == CLASSES
    assert index.folds() == [1, 3] and index.info["missing"]["count"] == 0
    assert [len([r for r in index.records if r.fold == f]) for f in (1, 3)] == [12, 6]
    assert len({r.key for r in index.records}) == 18
    for i, rec in enumerate(index.records):
        assert len(rec.key) == 11 and 1 <= len(rec.label) <= 3
        assert list(rec.label) == sorted(set(rec.label))
        fold, n = (1, i) if i < 12 else (3, i - 12)
        assert rec.label == tagging.tagging_labels(fold, n, seed=3, max_events=3)
        info = sf.info(rec.path)
        assert (info.samplerate, info.frames, info.subtype) == (16000, 16000, "PCM_16")
    first = (tag_tree / "metadata" / "balanced_train_segments.csv").read_text().splitlines()
    assert first[0].startswith("#") and first[2] == (
        "# YTID, start_seconds, end_seconds, positive_labels")
    assert first[3].startswith(index.records[0].key + ", ") and first[3].endswith('"')


def test_tagging_set_is_deterministic(tmp_path, tag_tree):
    again = tagging.generate_tagging_dataset(tmp_path / "again", **SMALL)
    assert _tree_hash(again) == _tree_hash(tag_tree)
    other = tagging.generate_tagging_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    assert _tree_hash(other) != _tree_hash(tag_tree)
    # a clip depends only on (seed, fold, index), not on how many clips are generated
    more = tagging.generate_tagging_dataset(tmp_path / "more", **{**SMALL, "train_clips": 13})
    a, b = read_audioset(tag_tree, csv_dir="metadata"), read_audioset(more, csv_dir="metadata")
    assert [r.key for r in b.records[:12]] == [r.key for r in a.records[:12]]
    assert Path(b.records[5].path).read_bytes() == Path(a.records[5].path).read_bytes()


def test_tagging_label_frequencies_are_skewed():
    counts = np.zeros(len(CLASSES), dtype=int)
    events = np.zeros(4, dtype=int)
    for i in range(600):
        labels = tagging.tagging_labels(1, i, seed=0, max_events=3)
        counts[list(labels)] += 1
        events[len(labels)] += 1
    assert 3.0 <= counts.max() / counts.min() <= 6.0
    assert events[0] == 0 and events[1] > events[2] > events[3] > 0


def test_tagging_set_marker_logic(tmp_path, monkeypatch):
    root = tmp_path / "tq"
    tagging.ensure_tagging_dataset(root, **SMALL)
    marker = root / ".complete"
    params = json.loads(marker.read_text())
    assert params["generator"] == "synthetic-tagging" and params["train_clips"] == 12
    stamp = marker.stat().st_mtime_ns
    tagging.ensure_tagging_dataset(root, **SMALL)  # same parameters: kept
    assert marker.stat().st_mtime_ns == stamp
    tagging.ensure_tagging_dataset(root, **{**SMALL, "eval_clips": 4})  # regenerated
    assert len(read_audioset(root).records) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tq"]  # no temporary leftovers

    # a tree without our marker is somebody else's data
    marker.unlink()
    with pytest.raises(FileExistsError, match="not a tagging set"):
        tagging.ensure_tagging_dataset(root, **SMALL)
    # nor is the single-label generator's tree
    marker.write_text(json.dumps({"generator": "synthetic-esc50"}))
    with pytest.raises(FileExistsError, match="not a tagging set"):
        tagging.ensure_tagging_dataset(root, **SMALL)

    # a generation killed half-way leaves nothing that looks like a dataset
    calls = []
    real_open = tagging.wave.open

    def dying_open(path, mode):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_open(path, mode)

    monkeypatch.setattr(tagging.wave, "open", dying_open)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        tagging.ensure_tagging_dataset(fresh, **SMALL)
    assert not fresh.exists() and len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tq"]
    monkeypatch.undo()
    assert len(read_audioset(tagging.ensure_tagging_dataset(fresh, **SMALL)).records) == 18


def test_tagging_bad_parameters(tmp_path):
    for bad in ({"max_events": 0}, {"max_events": 13}, {"train_clips": 0},
                {"duration": 0.2}, {"sample_rate": 1000}, {"seed": -1}):
        with pytest.raises(ValueError):
            tagging.generate_tagging_dataset(tmp_path / "x", **{**SMALL, **bad})
    assert not (tmp_path / "x").exists()


# --- registry and configs -------------------------------------------------------------


def test_load_index_dispatches(tmp_path, as_tree):
    assert {"audioset", "fsd50k", "folder", "synthetic_tagging"} <= set(DATA_FORMATS)
    cfg = OmegaConf.create({"format": "audioset", "root": str(as_tree), "csv_dir": "metadata",
                            "splits": ["balanced_train", "eval"], "folds": [3],
                            "train_folds": [1], "val_folds": None,
                            "file_pattern": "audio/{split}/{ytid}.wav",
                            "max_missing_fraction": 0.0})
    assert len(load_index(cfg).records) == 8
    cfg.train_folds = [1, 2]
    with pytest.raises(DatasetError, match=r"fold\(s\) \[2\] \(unbalanced_train\).*data\.splits"):
        load_index(cfg)
    cfg.train_folds, cfg.download = [1], True
    with pytest.raises(DatasetError, match="data.download=true.*no archive"):
        load_index(cfg)
    fsd = make_fsd50k(tmp_path / "FSD50K")
    assert load_index(OmegaConf.create({"format": "fsd50k", "root": str(fsd)})).num_classes == 5
    folder = make_folder(tmp_path / "unlabeled")
    cfg = OmegaConf.create({"format": "folder", "root": str(folder), "extensions": ["wav"]})
    assert [r.key for r in load_index(cfg).records] == ["b.wav"]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def test_data_configs(monkeypatch):
    monkeypatch.setenv("AUDIO_DATA_DIR", "/datasets")
    monkeypatch.setenv("AUDIO_CACHE_DIR", "/cache")
    quick = make_cfg("data=quickstart").data
    tq = make_cfg("data=tagging_quickstart").data
    assert (tq.format, tq.root) == ("synthetic_tagging", "/cache/tagging_quickstart")
    assert list(tq.folds) == [3] and list(tq.train_folds) == [1] and tq.val_folds is None
    assert set(quick) - {"generate"} <= set(tq)
    assert dict(tq.generate) == {"train_clips": 600, "eval_clips": 200, "duration": 2.0,
                                 "max_events": 3, "seed": 0, "sample_rate": 16000}

    bal = make_cfg("data=audioset_balanced").data
    assert (bal.format, bal.root, bal.clip_seconds, bal.target_frames) == (
        "audioset", "/datasets/audioset", 10.0, 1024)
    assert list(bal.splits) == ["balanced_train", "eval"]
    assert (list(bal.train_folds), bal.val_folds, list(bal.folds)) == ([1], None, [3])
    full = make_cfg("data=audioset_full").data
    assert list(full.splits) == ["balanced_train", "unbalanced_train", "eval"]
    assert list(full.train_folds) == [1, 2] and full.name == "audioset_full"
    assert full.file_pattern == bal.file_pattern

    fsd = make_cfg("data=fsd50k").data
    assert (fsd.format, fsd.variable_length, fsd.clip_seconds) == ("fsd50k", True, 10.0)
    assert (list(fsd.train_folds), list(fsd.val_folds), list(fsd.folds)) == ([1], [2], [3])
    assert fsd.max_missing_fraction == 0.0

    folder = make_cfg("data=folder").data
    assert folder.format == "folder" and folder.labels_from_subdirs is False
    assert tuple(folder.extensions) == DEFAULT_EXTENSIONS

    common = set(OmegaConf.load(CONF / "data" / "_common.yaml")) - {"defaults"}
    for data in ("tagging_quickstart", "audioset_balanced", "audioset_full", "fsd50k",
                 "folder"):
        assert common <= set(make_cfg(f"data={data}").data), data
    validate_config(make_cfg("data=audioset_balanced"))


def test_check_data_names_a_bad_clip_with_its_csv_row(tmp_path, capsys):
    """scripts.check_data reports a bad AudioSet clip with its segments csv row, as the
    training error does."""
    from scripts.check_data import main

    root = make_audioset(tmp_path / "audioset")
    index = read_audioset(root)
    bad = index.records[-1]
    Path(bad.path).write_bytes(b"not audio")
    code = main(["data=audioset_balanced", f"data.root={root}", "--no-progress", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"{bad.path}" in out and f"({bad.source})" in out
