"""Reader for FSD50K (Fonseca et al. 2022): 51,197 clips of 0.3-30 s, 200 classes, multi-label.

Layout of the release (Zenodo record 4060432, after joining and extracting the zips)::

    ROOT/FSD50K.ground_truth/vocabulary.csv   # no header: index,label,mid
    ROOT/FSD50K.ground_truth/dev.csv          # fname,labels,mids,split  (split: train | val)
    ROOT/FSD50K.ground_truth/eval.csv         # fname,labels,mids
    ROOT/FSD50K.dev_audio/{fname}.wav
    ROOT/FSD50K.eval_audio/{fname}.wav

Folds: 1 = train, 2 = val, 3 = eval (the test split). The protocol selects on val and
reports mAP on eval. Labels come from the ``mids`` column; the ``labels`` column must name
the same classes (checked through the vocabulary). Class names are the vocabulary's labels
in index order.

The folders are configurable (``data.ground_truth_dir``, ``data.dev_audio_dir``,
``data.eval_audio_dir``, relative to ``data.root``) for copies resampled elsewhere. Clips
listed but missing on disk are counted as for AudioSet; ``data.max_missing_fraction``
defaults to 0 because FSD50K is a fixed download, so any missing file is an error.

Row numbers in messages count the header as row 1 (as a spreadsheet shows them);
``Record.source`` keeps them (``"eval.csv row 17"``) and ``Record.key`` is the fname.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from src.data.audioset import DirectoryListing, missing_report
from src.data.index import DatasetError, DatasetIndex, Record

__all__ = [
    "DEFAULT_AUDIO_DIRS",
    "DEFAULT_GROUND_TRUTH_DIR",
    "FOLD_NAMES",
    "read_fsd50k",
    "read_vocabulary",
]

log = logging.getLogger(__name__)

TRAIN_FOLD, VAL_FOLD, EVAL_FOLD = 1, 2, 3
FOLD_NAMES = {TRAIN_FOLD: "train", VAL_FOLD: "val", EVAL_FOLD: "eval"}
DEFAULT_GROUND_TRUTH_DIR = "FSD50K.ground_truth"
DEFAULT_AUDIO_DIRS = {"dev": "FSD50K.dev_audio", "eval": "FSD50K.eval_audio"}
_COLUMNS = {"dev": ("fname", "labels", "mids", "split"), "eval": ("fname", "labels", "mids")}
_DEV_SPLITS = {"train": TRAIN_FOLD, "val": VAL_FOLD}


def _download_hint(root: Path) -> str:
    return (
        "Download FSD50K from https://zenodo.org/record/4060432 (join the split zips with "
        "`zip -s 0 FSD50K.dev_audio.zip --out dev.zip` before unzipping) and set "
        f"data.root=... to the folder that holds FSD50K.ground_truth/ (now {root})"
    )


def read_vocabulary(csv_file: Path) -> tuple[tuple[str, ...], dict[str, int], dict[str, int]]:
    """``vocabulary.csv`` -> (labels in index order, mid -> index, label -> index)."""
    if not csv_file.is_file():
        raise DatasetError(
            f"FSD50K vocabulary not found at {csv_file}; the ground truth is incomplete. "
            f"{_download_hint(csv_file.parent.parent)}"
        )
    names: list[str] = []
    by_mid: dict[str, int] = {}
    by_name: dict[str, int] = {}
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        for row in reader:
            row_no = reader.line_num
            if not row or not any(f.strip() for f in row):
                continue
            if len(row) != 3:
                raise DatasetError(
                    f"{csv_file}: row {row_no} has {len(row)} fields, expected 3 "
                    "(index,label,mid; the file has no header)"
                )
            index, name, mid = (f.strip() for f in row)
            if index != str(len(names)):
                raise DatasetError(
                    f"{csv_file}: row {row_no} has index {index!r}, expected {len(names)}; "
                    "indices must count 0, 1, 2, ... in order (the file has no header)"
                )
            if not name or not mid:
                raise DatasetError(f"{csv_file}: row {row_no} has an empty label or mid")
            for value, seen, what in ((mid, by_mid, "mid"), (name, by_name, "label")):
                if value in seen:
                    raise DatasetError(
                        f"{csv_file}: row {row_no} repeats {what} {value!r} "
                        f"(already index {seen[value]})"
                    )
                seen[value] = len(names)
            names.append(name)
    if not names:
        raise DatasetError(f"{csv_file} lists no classes")
    return tuple(names), by_mid, by_name


def _split_list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _read_ground_truth(csv_file: Path, part: str, by_mid, by_name, seen: dict):
    """Yield ``(row_no, fname, fold, labels)`` for every row of dev.csv or eval.csv."""
    if not csv_file.is_file():
        raise DatasetError(
            f"FSD50K ground truth not found at {csv_file}. {_download_hint(csv_file.parent.parent)}"
        )
    name = csv_file.name
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        for column in _COLUMNS[part]:
            if column not in header:
                raise DatasetError(
                    f"{csv_file} is missing the required column {column!r} (found columns: "
                    f"{header}); expected the header {','.join(_COLUMNS[part])}"
                )
        rows = 0
        # row numbers count the header as row 1, as a spreadsheet would show them
        for row_no, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            extra, short = row.get(None) or [], [k for k, v in row.items() if v is None]
            if extra or short:
                raise DatasetError(
                    f"{csv_file}: row {row_no} has {len(header) + len(extra) - len(short)} "
                    f"field(s), expected {len(header)} ({','.join(header)}); several labels "
                    'or mids in one field need quotes, e.g. "Bark,Dog"'
                )
            fname = (row.get("fname") or "").strip()
            if not fname or any(c in fname for c in "/\\"):
                raise DatasetError(
                    f"{csv_file}: row {row_no} has fname {fname!r}; expected a clip id such "
                    "as 64760 (its audio file is <fname>.wav)"
                )
            mids, names = _split_list(row.get("mids")), _split_list(row.get("labels"))
            if not mids:
                raise DatasetError(
                    f"{csv_file}: row {row_no} (fname {fname}) has an empty 'mids' list; "
                    "every clip needs at least one label: fix or remove that row"
                )
            if not names:
                raise DatasetError(
                    f"{csv_file}: row {row_no} (fname {fname}) has an empty 'labels' column "
                    f"but mids {mids}; the two columns name the same classes: fill in the "
                    "labels (vocabulary.csv gives each mid's name) or remove the row"
                )
            unknown = [m for m in mids if m not in by_mid] + [n for n in names if n not in by_name]
            if unknown:
                raise DatasetError(
                    f"{csv_file}: row {row_no} (fname {fname}) has label(s) {unknown} that are "
                    "not in vocabulary.csv; use the vocabulary that belongs to this ground "
                    "truth or remove the row"
                )
            labels = tuple(sorted({by_mid[m] for m in mids}))
            if tuple(sorted({by_name[n] for n in names})) != labels:
                raise DatasetError(
                    f"{csv_file}: row {row_no} (fname {fname}) has labels {names} but mids "
                    f"{mids}, which name other classes in vocabulary.csv; the two columns "
                    "must agree: fix the row"
                )
            if part == "dev":
                split = (row.get("split") or "").strip()
                if split not in _DEV_SPLITS:
                    raise DatasetError(
                        f"{csv_file}: row {row_no} (fname {fname}) has split={split!r}; "
                        "expected train or val"
                    )
                fold = _DEV_SPLITS[split]
            else:
                fold = EVAL_FOLD
            other = seen.get(fname)
            if other is not None:
                raise DatasetError(
                    f"{csv_file}: fname {fname} (row {row_no}) is already listed in "
                    f"{other[0]} row {other[1]}; a clip belongs to one split: remove the "
                    "duplicate row"
                )
            seen[fname] = (name, row_no)
            rows += 1
            yield row_no, fname, fold, labels
    if not rows:
        raise DatasetError(f"{csv_file} has no rows; the FSD50K index would be empty")


def read_fsd50k(
    root: str | os.PathLike,
    *,
    ground_truth_dir: str | os.PathLike | None = None,
    dev_audio_dir: str | os.PathLike | None = None,
    eval_audio_dir: str | os.PathLike | None = None,
    max_missing_fraction: float = 0.0,
) -> DatasetIndex:
    """Index an FSD50K tree: folds 1/2/3 = train/val/eval, multi-label records.

    Folders default to the release's names under ``root``. Clips listed but absent on disk
    are left out and counted; more than ``max_missing_fraction`` of a split missing (by
    default any) is an error naming the clips.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(f"FSD50K data not found at {root} (no such directory). "
                           f"{_download_hint(root)}")
    limit = float(max_missing_fraction)
    if not 0.0 <= limit <= 1.0:
        raise DatasetError(
            f"data.max_missing_fraction={limit} must be between 0 and 1 (0: every clip "
            "listed must exist)"
        )
    truth = root / (ground_truth_dir or DEFAULT_GROUND_TRUTH_DIR)
    audio = {
        "dev": root / (dev_audio_dir or DEFAULT_AUDIO_DIRS["dev"]),
        "eval": root / (eval_audio_dir or DEFAULT_AUDIO_DIRS["eval"]),
    }
    class_names, by_mid, by_name = read_vocabulary(truth / "vocabulary.csv")

    listing = DirectoryListing()
    records: list[Record] = []
    missing: dict[str, list[tuple[str, str]]] = {s: [] for s in FOLD_NAMES.values()}
    totals: dict[str, int] = dict.fromkeys(FOLD_NAMES.values(), 0)
    seen: dict[str, tuple[str, int]] = {}
    for part in ("dev", "eval"):
        folder = str(audio[part])
        csv_file = truth / f"{part}.csv"
        for row_no, fname, fold, labels in _read_ground_truth(
            csv_file, part, by_mid, by_name, seen
        ):
            split = FOLD_NAMES[fold]
            totals[split] += 1
            path = os.path.join(folder, f"{fname}.wav")
            source = f"{csv_file.name} row {row_no}"
            if listing.find(path) is None:
                missing[split].append((path, source))
                continue
            records.append(Record(path=path, label=labels, fold=fold, key=fname, source=source))

    info = {
        "missing": missing_report(
            missing, totals, limit, dataset="FSD50K",
            where=f"{audio['dev']} and {audio['eval']}", listing=listing,
            fix=(
                "FSD50K is a fixed download: re-extract the audio zips, or set "
                "data.max_missing_fraction to train on the clips you have."
            ),
        ),
        "splits": {s: totals[s] - len(missing[s]) for s in totals},
    }
    log.info(
        "FSD50K: %d clips (%s), %d classes", len(records),
        ", ".join(f"{s} {n}" for s, n in info["splits"].items()), len(class_names),
    )
    return DatasetIndex(
        records=tuple(records),
        class_names=class_names,
        root=str(root),
        multi_label=True,
        fold_names=dict(FOLD_NAMES),
        info=info,
    )
