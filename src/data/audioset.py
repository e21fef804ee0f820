"""Reader for AudioSet (Gemmeke et al. 2017): 527 classes, multi-label, 10 s YouTube segments.

The official metadata (``http://research.google.com/audioset/download.html``)::

    CSV_DIR/class_labels_indices.csv         # index,mid,display_name (with a header)
    CSV_DIR/balanced_train_segments.csv      # ~20k segments       -> fold 1
    CSV_DIR/unbalanced_train_segments.csv    # ~2M segments        -> fold 2
    CSV_DIR/eval_segments.csv                # ~20k segments       -> fold 3

A segment csv starts with three ``#`` comment lines, then one row per segment::

    --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"

``CSV_DIR`` is ``data.csv_dir``, relative to ``data.root`` unless absolute (default
``ROOT/metadata``). ``data.splits`` says which segment csvs are read (the balanced recipe
never needs to read the 2M-row unbalanced csv). Class names are the display names in index
order; a segment's labels are the sorted indices of its mids.

The audio is not distributed with the metadata; every lab has its own copy and its own
file names. ``data.file_pattern`` locates a segment's file under ``data.root``, with the
placeholders of ``str.format``:

    ``{ytid}``                 the YouTube id (``{ytid[0]}``: its first character)
    ``{split}``                balanced_train | unbalanced_train | eval
    ``{start}``, ``{end}``     the times exactly as written in the csv (``30.000``)
    ``{start_int}``, ``{end_int}``   whole seconds, truncated (``30``)
    ``{start_ms}``, ``{end_ms}``     milliseconds (``30000``; ``{start_ms:07d}`` pads)

Common layouts::

    audio/{split}/{ytid}.wav                 # the default
    {split}/Y{ytid}.wav                      # Y-prefixed names
    audio/{ytid}_{start_int}.wav             # --PJHxphWEs_30.wav, all splits in one folder
    flac/{ytid}_{start}_{end}.flac           # --PJHxphWEs_30.000_40.000.flac
    audios/{split}_segments/**/Y{ytid}.wav   # PANNs: unbalanced split in part00..part40

Wildcards (``*``, ``?``, ``**``) may appear in the folder part only: each distinct folder
pattern is expanded once and every folder it matches is listed once, so a file name is
found in whichever of them holds it (the first in sorted order if several do). A mapping
``{split: pattern}`` gives each split its own pattern.

Files are found with one directory listing per folder (no per-row ``glob`` or ``stat``),
which keeps the 2M-row unbalanced csv cheap. Clips whose file is missing are left out and
counted: every copy of AudioSet misses videos that were taken down. When more than
``data.max_missing_fraction`` of a split is missing the reader stops, since a wrong
``data.root`` or ``data.file_pattern`` looks exactly like that. The count, fraction and the
first few missing clips go to ``DatasetIndex.info["missing"]`` and from there to
results.json.

Row numbers in messages are line numbers of the csv file (comment lines count), as an
editor shows them; ``Record.source`` keeps them (``"eval_segments.csv row 17"``) so later
errors about a clip can name its row. ``Record.key`` is the YTID.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from src.data.index import DatasetError, DatasetIndex, Record

__all__ = [
    "DEFAULT_CSV_DIR",
    "DEFAULT_FILE_PATTERN",
    "DEFAULT_MAX_MISSING_FRACTION",
    "DEFAULT_SPLITS",
    "FOLD_NAMES",
    "LABELS_CSV",
    "PLACEHOLDERS",
    "SPLITS",
    "DirectoryListing",
    "check_splits",
    "missing_report",
    "read_audioset",
    "read_class_labels",
]

log = logging.getLogger(__name__)

# split -> (fold, csv file name)
SPLITS: dict[str, tuple[int, str]] = {
    "balanced_train": (1, "balanced_train_segments.csv"),
    "unbalanced_train": (2, "unbalanced_train_segments.csv"),
    "eval": (3, "eval_segments.csv"),
}
FOLD_NAMES = {fold: split for split, (fold, _csv) in SPLITS.items()}
LABELS_CSV = "class_labels_indices.csv"
DEFAULT_SPLITS = ("balanced_train", "eval")
DEFAULT_CSV_DIR = "metadata"
DEFAULT_FILE_PATTERN = "audio/{split}/{ytid}.wav"
DEFAULT_MAX_MISSING_FRACTION = 0.2
PLACEHOLDERS = ("ytid", "split", "start", "end", "start_int", "end_int", "start_ms", "end_ms")
_EXAMPLES = 5  # missing clips named in messages and in info["missing"]
_SEGMENT_HEADER = "YTID, start_seconds, end_seconds, positive_labels"
_GLOB_CHARS = frozenset("*?[")
_BAD_ID = re.compile(r"[\s/\\]").search  # would break a path


# ------------------------------------------------------------------------ file lookup


class DirectoryListing:
    """Finds files by listing each folder once (``os.scandir``), not one ``stat`` per file.

    ``files(folder)`` maps the names of the files in ``folder`` to the folder that holds
    them. A folder with wildcards (``*``, ``?``, ``[``; ``**`` for any depth) is expanded
    once with ``glob`` and every folder it matches is listed, the first in sorted order
    winning a name found in several. ``find(path)`` is the existing file or None.
    """

    def __init__(self) -> None:
        self._files: dict[str, dict[str, str]] = {}

    def names(self, folder: str) -> list[str]:
        """Names of the non-directory entries of ``folder`` (empty if it does not exist)."""
        try:
            with os.scandir(folder) as entries:
                return [e.name for e in entries if not e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def files(self, folder: str) -> dict[str, str]:
        found = self._files.get(folder)
        if found is None:
            if _GLOB_CHARS.isdisjoint(folder):
                found = dict.fromkeys(self.names(folder), folder)
            else:
                found = {}
                # the trailing separator makes glob return folders only
                matches = sorted({os.path.normpath(m)
                                  for m in glob.glob(folder + os.sep, recursive=True)})
                for match in reversed(matches):  # the first in sorted order wins
                    found.update(dict.fromkeys(self.names(match), match))
            self._files[folder] = found
        return found

    def find(self, path: str) -> str | None:
        folder, sep, name = path.rpartition(os.sep)
        where = self.files(folder if sep else ".").get(name)
        if where is None:
            return None
        return path if where == folder else where + os.sep + name


def missing_report(
    missing: Mapping[str, Sequence[tuple[str, str]]],
    totals: Mapping[str, int],
    max_fraction: float,
    *,
    dataset: str,
    where: str,
    fix: str,
    listing: DirectoryListing | None = None,
) -> dict:
    """Count the clips listed in the metadata but absent on disk; stop above the limit.

    ``missing`` maps a split to its missing clips as ``(expected path, source)``;
    ``totals`` to the number of clips its metadata lists. Any split with more than
    ``max_fraction`` missing raises a DatasetError naming the count, examples and
    ``data.max_missing_fraction``. Returns the summary for ``DatasetIndex.info["missing"]``
    and logs it once when anything is missing.
    """
    count = sum(len(v) for v in missing.values())
    total = sum(totals.values())
    examples = [f"{path} ({source})" for split in totals
                for path, source in missing[split][:_EXAMPLES]][:_EXAMPLES]
    info = {
        "count": count,
        "total": total,
        "fraction": round(count / total, 6) if total else 0.0,
        "max_fraction": float(max_fraction),
        "by_split": {s: {"missing": len(missing[s]), "total": totals[s]} for s in totals},
        "examples": examples,
    }
    for split, n in totals.items():
        gone = missing[split]
        if n and len(gone) / n > max_fraction:
            shown = "; ".join(f"{p} ({src})" for p, src in gone[:_EXAMPLES])
            msg = (
                f"{dataset}: {len(gone)} of {n} clips of the {split} split "
                f"({100.0 * len(gone) / n:.1f}%) are missing under {where}, more than "
                f"data.max_missing_fraction={max_fraction:g} allows; e.g. {shown}. "
            )
            if len(gone) == n:
                msg += _nothing_found_hint(gone[0][0], listing)
            msg += fix
            raise DatasetError(msg)
    if count:
        log.warning(
            "%s: %d of %d listed clips (%.2f%%) are missing on disk and left out "
            "(limit data.max_missing_fraction=%g); e.g. %s",
            dataset, count, total, 100.0 * info["fraction"], max_fraction,
            "; ".join(examples[:3]),
        )
    return info


def _nothing_found_hint(expected: str, listing: DirectoryListing | None) -> str:
    folder = os.path.dirname(expected)
    if not _GLOB_CHARS.isdisjoint(folder):
        return f"None was found in the folders that match {folder}. "
    if not os.path.isdir(folder):
        return f"None was found: the folder {folder} does not exist. "
    present = sorted(listing.names(folder) if listing else os.listdir(folder))[:3]
    if not present:
        return f"None was found: {folder} is empty. "
    return f"None was found; {folder} holds files such as {present}. "


# --------------------------------------------------------------------------- metadata


def read_class_labels(csv_file: Path) -> tuple[tuple[str, ...], dict[str, int]]:
    """``class_labels_indices.csv`` -> (display names in index order, mid -> index)."""
    if not csv_file.is_file():
        raise DatasetError(
            f"AudioSet class list not found at {csv_file}. It comes with the segment csvs "
            "(http://research.google.com/audioset/download.html); put it there or set "
            "data.csv_dir=... to the folder that holds the csvs"
        )
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        header = [c.strip() for c in next(reader, [])]
        if header[:3] != ["index", "mid", "display_name"]:
            raise DatasetError(
                f"{csv_file}: row 1 is {header}, expected the header index,mid,display_name"
            )
        names: list[str] = []
        mids: dict[str, int] = {}
        for row in reader:
            row_no = reader.line_num
            if not row or not any(f.strip() for f in row):
                continue
            if len(row) != 3:
                raise DatasetError(
                    f"{csv_file}: row {row_no} has {len(row)} fields, expected 3 "
                    "(index,mid,display_name; quote a display name that contains a comma)"
                )
            index, mid, name = (f.strip() for f in row)
            if index != str(len(names)):
                raise DatasetError(
                    f"{csv_file}: row {row_no} has index {index!r}, expected {len(names)}; "
                    "indices must count 0, 1, 2, ... in order"
                )
            if not mid or not name:
                raise DatasetError(f"{csv_file}: row {row_no} has an empty mid or display_name")
            if mid in mids:
                raise DatasetError(
                    f"{csv_file}: row {row_no} repeats mid {mid!r} (already index {mids[mid]})"
                )
            mids[mid] = len(names)
            names.append(name)
    if not names:
        raise DatasetError(f"{csv_file} lists no classes")
    return tuple(names), mids


def _parse_time(text: str, what: str, csv_file: Path, row_no: int) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DatasetError(
            f"{csv_file}: row {row_no} has {what}={text!r}; expected a non-negative number "
            f"of seconds (rows read: {_SEGMENT_HEADER})"
        )
    return value


class _PathMaker:
    """Formats a segment's file path from the pattern, computing only the fields it uses."""

    def __init__(self, pattern: str, key: str) -> None:
        used = set()
        try:
            for _text, field, _spec, _conv in string.Formatter().parse(pattern):
                if field is not None:
                    used.add(field.split(".")[0].split("[")[0])
        except ValueError as err:
            raise DatasetError(f"{key}={pattern!r} is not a valid pattern: {err}") from None
        unknown = sorted(used - set(PLACEHOLDERS))
        if unknown or "" in used:
            raise DatasetError(
                f"{key}={pattern!r} uses unknown placeholder(s) {unknown or ['{}']}; "
                f"available: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )
        if "ytid" not in used:
            raise DatasetError(
                f"{key}={pattern!r} has no {{ytid}}, so every segment would map to the same "
                "file; e.g. audio/{split}/{ytid}.wav"
            )
        name = pattern.replace("\\", "/").rsplit("/", 1)[-1]
        if not _GLOB_CHARS.isdisjoint(name.replace("{", "").replace("}", "")):
            raise DatasetError(
                f"{key}={pattern!r} has a wildcard in the file name; wildcards may appear "
                "in the folder part only (e.g. audios/{split}/**/Y{ytid}.wav)"
            )
        self.pattern = pattern
        self.prefix = ""  # set by the reader: ROOT + separator, unless the pattern is absolute
        self.times = bool(used & {"start", "end", "start_int", "end_int", "start_ms", "end_ms"})

    def __call__(self, ytid: str, split: str, start: str, end: str, t0: float, t1: float) -> str:
        if not self.times:
            return self.prefix + self.pattern.format(ytid=ytid, split=split)
        return self.prefix + self.pattern.format(
            ytid=ytid, split=split, start=start, end=end,
            start_int=int(t0), end_int=int(t1),
            start_ms=int(round(t0 * 1000)), end_ms=int(round(t1 * 1000)),
        )


def _read_segments(
    csv_file: Path,
    split: str,
    mids: Mapping[str, int],
    labels_csv: Path,
    seen: dict[str, tuple[str, int]],
) -> Iterable[tuple[int, str, str, str, float, float, tuple[int, ...]]]:
    """Yield ``(row_no, ytid, start, end, t0, t1, labels)`` for every segment row."""
    cache: dict[str, tuple[int, ...]] = {}
    name = csv_file.name
    with open(csv_file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        first = True
        for row in reader:
            row_no = reader.line_num
            if not row or (row[0].lstrip().startswith("#")):
                continue
            if len(row) == 1 and not row[0].strip():
                continue
            if first:
                first = False
                if row[0].strip().upper() == "YTID":
                    continue  # a header line without the leading '#'
            if len(row) != 4:
                raise DatasetError(
                    f"{csv_file}: row {row_no} has {len(row)} field(s), expected 4: "
                    f'{_SEGMENT_HEADER}, with the label list quoted ("/m/a,/m/b"); '
                    "fix or remove that row"
                )
            ytid, start, end, label_text = row[0].strip(), row[1].strip(), row[2].strip(), row[3]
            if not ytid or _BAD_ID(ytid):
                raise DatasetError(
                    f"{csv_file}: row {row_no} has YTID {ytid!r}; expected a YouTube id such "
                    "as --PJHxphWEs (no spaces or slashes)"
                )
            try:
                t0, t1 = float(start), float(end)
            except ValueError:
                t0 = t1 = math.nan
            if not 0.0 <= t0 < t1 < math.inf:  # the slow path names what is wrong
                t0 = _parse_time(start, "start_seconds", csv_file, row_no)
                t1 = _parse_time(end, "end_seconds", csv_file, row_no)
                raise DatasetError(
                    f"{csv_file}: row {row_no} ({ytid}) ends at {end} s, not after its start "
                    f"{start} s; fix or remove that row"
                )
            labels = cache.get(label_text)
            if labels is None:
                wanted = [m.strip() for m in label_text.split(",") if m.strip()]
                if not wanted:
                    raise DatasetError(
                        f"{csv_file}: row {row_no} ({ytid}) has an empty label list; every "
                        "segment needs at least one label: fix or remove that row"
                    )
                unknown = [m for m in wanted if m not in mids]
                if unknown:
                    raise DatasetError(
                        f"{csv_file}: row {row_no} ({ytid}) has label(s) {unknown} that are "
                        f"not in {labels_csv}; use the class list that belongs to these "
                        "segment csvs (data.csv_dir) or remove the row"
                    )
                labels = tuple(sorted({mids[m] for m in wanted}))
                cache[label_text] = labels
            other = seen.get(ytid)
            if other is not None:
                other_split, other_row = other
                if other_split == split:
                    raise DatasetError(
                        f"{csv_file}: YTID {ytid} appears twice in the {split} split, rows "
                        f"{other_row} and {row_no}; AudioSet has one segment per video: "
                        "remove the duplicate row"
                    )
                raise DatasetError(
                    f"YTID {ytid} is in both {SPLITS[other_split][1]} (row {other_row}) and "
                    f"{name} (row {row_no}); the official splits share no video, so the same "
                    "clip would be in training and test data. Remove it from the training "
                    "csv (keep eval as published, so results stay comparable)"
                )
            seen[ytid] = (split, row_no)
            yield row_no, ytid, start, end, t0, t1, labels


# ----------------------------------------------------------------------------- reader


def check_splits(splits: Iterable[str] | str | None) -> list[str]:
    if splits is None:
        return list(DEFAULT_SPLITS)
    if isinstance(splits, str):
        splits = [splits]
    wanted = [str(s) for s in splits]
    unknown = [s for s in wanted if s not in SPLITS]
    if unknown or not wanted:
        raise DatasetError(
            f"data.splits={wanted} is not a list of AudioSet splits; use some of "
            f"{list(SPLITS)} (e.g. [balanced_train, eval])"
        )
    return [s for s in SPLITS if s in wanted]  # fold order, each once


def read_audioset(
    root: str | os.PathLike,
    *,
    splits: Iterable[str] | str | None = None,
    csv_dir: str | os.PathLike | None = None,
    file_pattern: str | Mapping[str, str] | None = None,
    max_missing_fraction: float | None = None,
    dataset: str = "AudioSet",
) -> DatasetIndex:
    """Index an AudioSet copy: one multi-label record per segment whose file exists.

    ``splits`` (default balanced_train and eval) selects the segment csvs; folds are
    1 = balanced_train, 2 = unbalanced_train, 3 = eval. ``csv_dir`` defaults to
    ``ROOT/metadata`` (relative values are relative to ``root``); ``file_pattern`` (default
    ``audio/{split}/{ytid}.wav``, or one pattern per split) locates the audio, see the
    module docstring. Segments without a file are left out and counted; more than
    ``max_missing_fraction`` (default 0.2) of any split missing is an error.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"{dataset} data not found at {root} (no such directory). AudioSet audio is not "
            "distributed as an archive: point data.root=... at your copy (the segment csvs in "
            "data.csv_dir, the audio found by data.file_pattern)"
        )
    split_list = check_splits(splits)
    csv_root = root / (DEFAULT_CSV_DIR if csv_dir is None else Path(csv_dir))
    limit = DEFAULT_MAX_MISSING_FRACTION if max_missing_fraction is None else max_missing_fraction
    limit = float(limit)
    if not 0.0 <= limit <= 1.0:
        raise DatasetError(
            f"data.max_missing_fraction={limit} must be between 0 and 1 (0: every clip "
            "listed must exist)"
        )
    pattern = DEFAULT_FILE_PATTERN if file_pattern is None else file_pattern
    if isinstance(pattern, Mapping):
        lacking = [s for s in split_list if s not in pattern]
        if lacking:
            raise DatasetError(
                f"data.file_pattern has no pattern for split(s) {lacking}; give one per split "
                f"read (data.splits={split_list}) or a single string"
            )
        makers = {s: _PathMaker(str(pattern[s]), f"data.file_pattern.{s}") for s in split_list}
    else:
        maker = _PathMaker(str(pattern), "data.file_pattern")
        makers = dict.fromkeys(split_list, maker)

    labels_csv = csv_root / LABELS_CSV
    class_names, mids = read_class_labels(labels_csv)
    for split in split_list:
        csv_file = csv_root / SPLITS[split][1]
        if not csv_file.is_file():
            raise DatasetError(
                f"{dataset} segment csv for the {split} split not found at {csv_file}; put "
                f"{SPLITS[split][1]} in {csv_root} (data.csv_dir), or leave {split} out of "
                f"data.splits (now {split_list})"
            )

    for make in set(makers.values()):
        make.prefix = "" if os.path.isabs(make.pattern) else str(root) + os.sep
    listing = DirectoryListing()
    records: list[Record] = []
    missing: dict[str, list[tuple[str, str]]] = {}
    totals: dict[str, int] = {}
    seen: dict[str, tuple[str, int]] = {}
    for split in split_list:
        fold, csv_name = SPLITS[split]
        csv_file = csv_root / csv_name
        make = makers[split]
        gone: list[tuple[str, str]] = []
        total = 0
        for row_no, ytid, start, end, t0, t1, labels in _read_segments(
            csv_file, split, mids, labels_csv, seen
        ):
            total += 1
            expected = make(ytid, split, start, end, t0, t1)
            source = f"{csv_name} row {row_no}"
            path = listing.find(expected)
            if path is None:
                gone.append((expected, source))
                continue
            records.append(Record(path=path, label=labels, fold=fold, key=ytid, source=source))
        if not total:
            raise DatasetError(
                f"{csv_file} lists no segments; expected rows like "
                '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"'
            )
        missing[split], totals[split] = gone, total

    where = f"{root} (data.file_pattern={pattern!r})"
    info = {
        "missing": missing_report(
            missing, totals, limit, dataset=dataset, where=where, listing=listing,
            fix=(
                "Raise data.max_missing_fraction to train on the clips you have, or fix "
                "data.root / data.file_pattern if the files are there under other names."
            ),
        ),
        "splits": {s: totals[s] - len(missing[s]) for s in split_list},
    }
    log.info(
        "%s: %d clips (%s), %d classes",
        dataset, len(records), ", ".join(f"{s} {n}" for s, n in info["splits"].items()),
        len(class_names),
    )
    return DatasetIndex(
        records=tuple(records),
        class_names=class_names,
        root=str(root),
        multi_label=True,
        fold_names=dict(FOLD_NAMES),
        info=info,
    )
