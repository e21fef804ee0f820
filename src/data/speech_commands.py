"""Reader for Speech Commands V2 (Warden 2018): 35 words, ~105k one-second clips at 16 kHz.

Layout of the release (``speech_commands_v0.02.tar.gz``)::

    ROOT/<word>/<speaker>_nohash_<n>.wav
    ROOT/validation_list.txt      # relative paths, e.g. right/bb05582b_nohash_3.wav
    ROOT/testing_list.txt
    ROOT/_background_noise_/*.wav # long noise recordings, not a word

The official split is expressed as folds: 1 = train (every clip in neither list),
2 = validation (``validation_list.txt``), 3 = test (``testing_list.txt``). Train on fold 1,
select on fold 2 and report on fold 3: ``data.train_folds=[1] data.val_folds=[2]
data.folds=[3]`` (conf/data/speech_commands.yaml).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from src.data.esc50 import DatasetError, DatasetIndex, Record

__all__ = [
    "BACKGROUND_DIR",
    "LISTS",
    "TEST_FOLD",
    "TRAIN_FOLD",
    "VALIDATION_FOLD",
    "read_speech_commands",
]

TRAIN_FOLD, VALIDATION_FOLD, TEST_FOLD = 1, 2, 3
LISTS = (("validation_list.txt", VALIDATION_FOLD), ("testing_list.txt", TEST_FOLD))
BACKGROUND_DIR = "_background_noise_"


def _download_hint(root: Path) -> str:
    return (
        f"Download it with `python -m scripts.download speech_commands --root {root}` "
        "or set data.root=... to an extracted speech_commands_v0.02 tree "
        "(<word>/*.wav + validation_list.txt + testing_list.txt)"
    )


def _wav_files(folder: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(".wav")
    )


def _read_list(list_file: Path, existing: set[str]) -> list[str]:
    """The relative paths named in a split list, each checked against the files on disk."""
    entries: list[str] = []
    seen: set[str] = set()
    text = list_file.read_text(encoding="utf-8")
    for line_no, line in enumerate(text.splitlines(), start=1):
        raw = line.strip()
        if not raw:
            continue
        rel = posixpath.normpath(raw.replace("\\", "/"))
        if rel not in existing:
            raise DatasetError(
                f"{list_file} line {line_no} names {raw!r}, but {list_file.parent / rel} does "
                "not exist (or is not a word folder's .wav file); the dataset is incomplete: "
                "re-download or re-extract it"
            )
        if rel not in seen:
            seen.add(rel)
            entries.append(rel)
    return entries


def read_speech_commands(
    root: str | os.PathLike, *, include_background: bool = False
) -> DatasetIndex:
    """Index a Speech Commands V2 tree; folds 1/2/3 = train/validation/test.

    Class names are the word folders in sorted order (folders starting with ``_`` are not
    words). Every path in ``validation_list.txt`` and ``testing_list.txt`` must exist, and
    no clip may be in both lists. With ``include_background`` the recordings in
    ``_background_noise_/`` are added to the training fold as one extra class, appended
    after the words so that word labels do not change. Record paths are absolute.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"Speech Commands data not found at {root} (no such directory). {_download_hint(root)}"
        )
    list_files = [(root / name, fold) for name, fold in LISTS]
    for list_file, _fold in list_files:
        if not list_file.is_file():
            raise DatasetError(
                f"Speech Commands split list not found at {list_file}; {root} is not a complete "
                f"speech_commands_v0.02 tree. {_download_hint(root)}"
            )

    words = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(("_", "."))
    )
    files = {word: _wav_files(root / word) for word in words}
    words = [w for w in words if files[w]]  # a folder without clips is not a class
    if not words:
        raise DatasetError(
            f"no word folders with .wav files under {root}; expected <word>/*.wav. "
            f"{_download_hint(root)}"
        )
    existing = {f"{w}/{name}" for w in words for name in files[w]}

    fold_of: dict[str, int] = {}
    for list_file, fold in list_files:
        for rel in _read_list(list_file, existing):
            other = fold_of.setdefault(rel, fold)
            if other != fold:
                raise DatasetError(
                    f"{rel} is listed in both {root / LISTS[0][0]} and {root / LISTS[1][0]}; "
                    "a clip belongs to one split"
                )

    label_of = {w: i for i, w in enumerate(words)}
    # A speaker's clips share a group: a validation split carved from the training fold
    # (data.val_folds=null) then holds speakers unseen in training, as the official lists do.
    records = [
        Record(
            path=str(root / w / name),
            label=label_of[w],
            fold=fold_of.get(f"{w}/{name}", TRAIN_FOLD),
            group=_speaker(name),
        )
        for w in words
        for name in files[w]
    ]
    class_names = list(words)
    if include_background:
        background = root / BACKGROUND_DIR
        noise = _wav_files(background) if background.is_dir() else []
        if not noise:
            raise DatasetError(
                f"include_background is set but {background} has no .wav files. "
                f"{_download_hint(root)}"
            )
        class_names.append(BACKGROUND_DIR)
        records += [
            Record(path=str(background / name), label=len(words), fold=TRAIN_FOLD) for name in noise
        ]
    return DatasetIndex(
        records=tuple(records), class_names=tuple(class_names), root=str(root),
        fold_names={TRAIN_FOLD: "train", VALIDATION_FOLD: "validation", TEST_FOLD: "test"},
    )


def _speaker(name: str) -> str | None:
    """The speaker id of ``<speaker>_nohash_<n>.wav``; None for other names."""
    speaker, sep, _rest = name.partition("_nohash_")
    return speaker if sep else None
