"""Reader for datasets in ESC-50 layout.

Layout (the real ESC-50 release and the synthetic generator in ``src.data.synthetic``)::

    ROOT/audio/*.wav
    ROOT/meta/esc50.csv   # filename,fold,target,category[,esc10,src_file,take]

Only the index is read here; whether the audio files exist and decode is checked later,
when the input pipeline is built.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "REQUIRED_COLUMNS",
    "DatasetError",
    "DatasetIndex",
    "Record",
    "read_esc50",
]

REQUIRED_COLUMNS = ("filename", "fold", "target", "category")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


class DatasetError(RuntimeError):
    """The dataset is missing or its metadata is malformed; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: str  # absolute path of the audio file
    label: int  # 0..num_classes-1
    fold: int


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    records: tuple[Record, ...]
    class_names: tuple[str, ...]  # index = label
    root: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.records})

    def split(self, test_folds: Sequence[int]) -> tuple[list[Record], list[Record]]:
        """Return ``(train, test)``: records in ``test_folds`` vs. all other records."""
        if isinstance(test_folds, int):
            test_folds = [test_folds]
        wanted = {int(f) for f in test_folds}
        if not wanted:
            raise DatasetError("split() needs at least one test fold")
        available = self.folds()
        missing = sorted(wanted - set(available))
        if missing:
            raise DatasetError(
                f"Requested test fold(s) {missing} have no records in the dataset at "
                f"{self.root}; available folds: {available}"
            )
        train = [r for r in self.records if r.fold not in wanted]
        test = [r for r in self.records if r.fold in wanted]
        return train, test


def _parse_int(value: str | None, column: str, row_no: int, row: dict, csv_path: Path) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(
            f"{csv_path}: row {row_no} (filename={row.get('filename')!r}) has a non-integer "
            f"{column!r} value {value!r}; fix or remove that row"
        ) from None


def _parse_bool(value: str | None, row_no: int, row: dict, csv_path: Path) -> bool:
    text = str(value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(
        f"{csv_path}: row {row_no} (filename={row.get('filename')!r}) has esc10={value!r}; "
        "expected True or False"
    )


def _resolve(root: Path, path: str | os.PathLike | None, default: str) -> Path:
    """``path`` if absolute, else relative to ``root``; ``root/default`` when not given."""
    return (root / (default if path is None else Path(path))).absolute()


def read_esc50(
    root: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    audio_dir: str | os.PathLike | None = None,
    esc10_only: bool = False,
) -> DatasetIndex:
    """Index a dataset in ESC-50 layout.

    ``csv_path`` defaults to ``ROOT/meta/esc50.csv`` and ``audio_dir`` to ``ROOT/audio``;
    relative values are taken relative to ``root``. Class names come from the csv
    (target -> category). With ``esc10_only`` only rows whose ``esc10`` column is true are
    kept and their targets are remapped to ``0..K-1`` in order of the original target.
    Record paths are absolute; their existence is not checked here.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"ESC-50 data not found at {root} (no such directory). "
            f"Download it with `python -m scripts.download esc50 --root {root}` "
            "or set data.root=... to a tree in ESC-50 layout (audio/*.wav + meta/esc50.csv)"
        )
    csv_file = _resolve(root, csv_path, "meta/esc50.csv")
    audio = _resolve(root, audio_dir, "audio")
    if not csv_file.is_file():
        raise DatasetError(
            f"ESC-50 metadata csv not found at {csv_file}. A dataset root needs "
            "audio/*.wav + meta/esc50.csv; re-download or regenerate the dataset, or pass "
            "the csv location explicitly (data.csv_path=...)"
        )

    with open(csv_file, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        required = REQUIRED_COLUMNS + (("esc10",) if esc10_only else ())
        for column in required:
            if column not in header:
                raise DatasetError(
                    f"{csv_file} is missing the required column {column!r} "
                    f"(found columns: {header}); expected the ESC-50 header "
                    "filename,fold,target,category,esc10,src_file,take"
                )
        rows = []  # (row_no, filename, fold, target, category)
        # row numbers count the header as row 1, as a spreadsheet would show them
        for row_no, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            if esc10_only and not _parse_bool(row.get("esc10"), row_no, row, csv_file):
                continue
            filename = (row.get("filename") or "").strip()
            if not filename:
                raise DatasetError(f"{csv_file}: row {row_no} has an empty 'filename'")
            fold = _parse_int(row.get("fold"), "fold", row_no, row, csv_file)
            target = _parse_int(row.get("target"), "target", row_no, row, csv_file)
            category = (row.get("category") or "").strip()
            rows.append((row_no, filename, fold, target, category))

    if not rows:
        which = "rows with esc10=True" if esc10_only else "rows"
        raise DatasetError(f"{csv_file} has no {which}; the dataset index is empty")

    names: dict[int, str] = {}
    for row_no, _filename, _fold, target, category in rows:
        known = names.setdefault(target, category)
        if known != category:
            raise DatasetError(
                f"{csv_file}: inconsistent class names for target {target}: {known!r} and "
                f"{category!r} (row {row_no}); every target must map to one category"
            )
    by_name: dict[str, int] = {}
    for target, category in sorted(names.items()):
        other = by_name.setdefault(category, target)
        if other != target:
            raise DatasetError(
                f"{csv_file}: category {category!r} is used by targets {other} and {target}; "
                "every category must map to one target"
            )

    original = sorted(names)
    if esc10_only:
        remap = {t: i for i, t in enumerate(original)}
    else:
        if original != list(range(len(original))):
            raise DatasetError(f"{csv_file}: targets must be contiguous 0..K-1, found {original}")
        remap = {t: t for t in original}

    records = tuple(
        Record(path=str(audio / filename), label=remap[target], fold=fold)
        for _row_no, filename, fold, target, _category in rows
    )
    class_names = tuple(names[t] for t in original)
    return DatasetIndex(records=records, class_names=class_names, root=str(root))
