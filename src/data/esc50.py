"""Reader for datasets in ESC-50 layout.

Layout (the real ESC-50 release and the synthetic generator in ``src.data.synthetic``)::

    ROOT/audio/*.wav
    ROOT/meta/esc50.csv   # filename,fold,target,category[,esc10,src_file,take]

Only the index is read here; whether the audio files exist and decode is checked later,
when the input pipeline is built.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from src.data.index import DatasetError, DatasetIndex, Record

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
# ESC-50 file names: {fold}-{src_file}-{take}-{target}.wav, e.g. 1-100032-A-0.wav
_ESC50_NAME = re.compile(r"(\d+)-([^-/\\]+)-[A-Za-z]+-\d+\.wav", re.IGNORECASE)
_SHOWN_MISMATCHES = 5

log = logging.getLogger(__name__)


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
        groups = []  # each row's source recording (src_file), None where unknown
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
            groups.append(_source_of(row, filename))

    if not rows:
        which = "rows with esc10=True" if esc10_only else "rows"
        raise DatasetError(f"{csv_file} has no {which}; the dataset index is empty")
    _warn_fold_mismatch(csv_file, rows)

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

    # Labels are 0..K-1 in the order of the csv's targets. A subset of the classes (the
    # ESC-10 rows, or a user's csv with only some targets) is remapped; the mapping goes
    # to the index's info and from there to results.json.
    original = sorted(names)
    remap = {t: i for i, t in enumerate(original)}
    info = {}
    if original != list(range(len(original))):
        info["target_remap"] = {str(t): i for t, i in remap.items()}
        if not esc10_only:
            log.info(
                "%s: targets %s are not contiguous 0..%d; remapped to 0..%d in order "
                "(the mapping is written to results.json as target_remap)",
                csv_file, _ranges(original), len(original) - 1, len(original) - 1,
            )

    records = tuple(
        Record(path=str(audio / filename), label=remap[target], fold=fold, group=group)
        for (_row_no, filename, fold, target, _category), group in zip(rows, groups)
    )
    class_names = tuple(names[t] for t in original)
    return DatasetIndex(records=records, class_names=class_names, root=str(root), info=info)


def _source_of(row: dict, filename: str) -> str | None:
    """The Freesound recording a clip was cut from: the csv's ``src_file`` column, else
    the one in an ESC-50 file name ({fold}-{src_file}-{take}-{target}.wav); None where
    neither gives it (the clip is then a source of its own)."""
    src = (row.get("src_file") or "").strip()
    if src:
        return src
    match = _ESC50_NAME.fullmatch(Path(filename).name)
    return match.group(2) if match else None


def _warn_fold_mismatch(csv_file: Path, rows: list) -> None:
    """Warn about rows whose csv fold differs from the fold in an ESC-50 file name.

    The csv stays authoritative (a deliberate re-folding keeps the original file names),
    but a typo in the fold column otherwise goes unnoticed: the clip lands in a fold of
    its own, or in the wrong one, and is never tested where the file name says.
    """
    mismatched = []
    for row_no, filename, fold, _target, _category in rows:
        match = _ESC50_NAME.fullmatch(Path(filename).name)
        if match and int(match.group(1)) != fold:
            mismatched.append(f"{filename} (row {row_no}: fold {fold})")
    if mismatched:
        shown = ", ".join(mismatched[:_SHOWN_MISMATCHES])
        more = (f", and {len(mismatched) - _SHOWN_MISMATCHES} more"
                if len(mismatched) > _SHOWN_MISMATCHES else "")
        log.warning(
            "%s: %d row(s) have a 'fold' value that differs from the fold in the file name "
            "({fold}-{src_file}-{take}-{target}.wav): %s%s. The csv's fold is used; if the "
            "dataset was not re-folded on purpose, fix the 'fold' column of those rows",
            csv_file, len(mismatched), shown, more,
        )


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (short enough for a log line)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
