"""Reader for UrbanSound8K (Salamon et al. 2014): 8732 clips of up to 4 s, 10 classes, 10 folds.

Layout of the release (``UrbanSound8K.tar.gz``)::

    ROOT/audio/fold1 .. fold10/*.wav
    ROOT/metadata/UrbanSound8K.csv  # slice_file_name,fsID,start,end,salience,fold,classID,class

The clips come at their original rates (mostly 44.1 or 48 kHz, some lower) and lengths;
the input pipeline resamples them and pads or crops them to ``data.clip_seconds``. The
official protocol is 10-fold cross-validation over the predefined folds. The release also
mixes bit depths (16- and 24-bit PCM, a few 8-bit, 32-bit float and ADPCM files); the
decoder (libsndfile through soundfile) reads them all.

Only the index is read here; whether the audio files exist and decode is checked later,
when the input pipeline is built.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from src.data.esc50 import DatasetError, DatasetIndex, Record

__all__ = ["CSV_PATH", "REQUIRED_COLUMNS", "read_urbansound8k"]

CSV_PATH = "metadata/UrbanSound8K.csv"
REQUIRED_COLUMNS = ("slice_file_name", "fold", "classID", "class")
_HEADER = "slice_file_name,fsID,start,end,salience,fold,classID,class"


def _parse_int(value: str | None, column: str, row_no: int, row: dict, csv_file: Path) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(
            f"{csv_file}: row {row_no} (slice_file_name={row.get('slice_file_name')!r}) has a "
            f"non-integer {column!r} value {value!r}; fix or remove that row"
        ) from None


def read_urbansound8k(root: str | os.PathLike) -> DatasetIndex:
    """Index an UrbanSound8K tree: one record per csv row, in ``audio/fold<k>/``.

    Folds come from the csv's ``fold`` column and class names from ``classID`` -> ``class``
    (classIDs must be contiguous ``0..K-1``). Record paths are absolute; their existence
    is not checked here.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"UrbanSound8K data not found at {root} (no such directory). "
            f"Download it with `python -m scripts.download urbansound8k --root {root}` "
            "or set data.root=... to an extracted UrbanSound8K tree "
            "(audio/fold<k>/*.wav + metadata/UrbanSound8K.csv)"
        )
    csv_file = root / CSV_PATH
    if not csv_file.is_file():
        raise DatasetError(
            f"UrbanSound8K metadata csv not found at {csv_file}. A dataset root needs "
            "audio/fold<k>/*.wav + metadata/UrbanSound8K.csv; re-download it with "
            f"`python -m scripts.download urbansound8k --root {root}`"
        )

    with open(csv_file, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        for column in REQUIRED_COLUMNS:
            if column not in header:
                raise DatasetError(
                    f"{csv_file} is missing the required column {column!r} "
                    f"(found columns: {header}); expected the UrbanSound8K header {_HEADER}"
                )
        rows = []  # (row_no, filename, fold, class_id, class_name, fsID)
        # row numbers count the header as row 1, as a spreadsheet would show them
        for row_no, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            filename = (row.get("slice_file_name") or "").strip()
            if not filename:
                raise DatasetError(f"{csv_file}: row {row_no} has an empty 'slice_file_name'")
            fold = _parse_int(row.get("fold"), "fold", row_no, row, csv_file)
            if fold <= 0:
                raise DatasetError(
                    f"{csv_file}: row {row_no} ({filename!r}) has fold={fold}; folds are 1..10"
                )
            class_id = _parse_int(row.get("classID"), "classID", row_no, row, csv_file)
            name = (row.get("class") or "").strip()
            # fsID: the Freesound recording the slice was cut from (several slices each)
            source = (row.get("fsID") or "").strip() or None
            rows.append((row_no, filename, fold, class_id, name, source))

    if not rows:
        raise DatasetError(f"{csv_file} has no rows; the dataset index is empty")

    names: dict[int, str] = {}
    for row_no, _filename, _fold, class_id, name, _source in rows:
        known = names.setdefault(class_id, name)
        if known != name:
            raise DatasetError(
                f"{csv_file}: inconsistent class names for classID {class_id}: {known!r} and "
                f"{name!r} (row {row_no}); every classID must map to one class"
            )
    by_name: dict[str, int] = {}
    for class_id, name in sorted(names.items()):
        other = by_name.setdefault(name, class_id)
        if other != class_id:
            raise DatasetError(
                f"{csv_file}: class {name!r} is used by classIDs {other} and {class_id}; "
                "every class must map to one classID"
            )
    ids = sorted(names)
    if ids != list(range(len(ids))):
        raise DatasetError(f"{csv_file}: classIDs must be contiguous 0..K-1, found {ids}")

    audio = root / "audio"
    records = tuple(
        Record(path=str(audio / f"fold{fold}" / filename), label=class_id, fold=fold,
               group=source)
        for _row_no, filename, fold, class_id, _name, source in rows
    )
    return DatasetIndex(records=records, class_names=tuple(names[i] for i in ids), root=str(root))
