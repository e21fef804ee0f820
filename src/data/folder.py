"""Reader for a folder of audio files: unlabeled audio, or one subfolder per class.

Every audio file under ``data.root`` (recursively, by extension, case-insensitive) becomes a
record, in sorted order of its path relative to the root; hidden files and folders (names
starting with ``.``) are skipped and symbolic links to folders are not followed.

- Unlabeled (the default, for self-supervised pretraining): labels are empty tuples and
  ``class_names`` is empty (the multi-label form with no classes: ``multi_label`` is true).
- ``data.labels_from_subdirs=true``: the first-level subfolder is the (single-label) class,
  classes in sorted order; files directly in the root then have no class and are an error.
  So ``ROOT/dog/*.wav, ROOT/rain/*.wav`` is a dataset with two classes.

Folds: ``data.num_folds`` (default 1) folds assigned round-robin over the sorted files
of each class (of all files when unlabeled), so folds are balanced per class and the same
files always land in the same fold. ``Record.key`` is the path relative to the root.

Sources: ``data.source_pattern``, a regular expression searched in each file's path
relative to the root, names the recording a file was cut from (its first group, or the
whole match without groups); files with the same source go to one fold, and a
validation split carved from the training folds keeps them together too, so no source
is heard both in training and in evaluation. Files it does not match are sources of
their own. E.g. ``'^([^/]+/[^_]+)_'`` for ``dog/rec12_003.wav``: source ``dog/rec12`` (with the class
folder, so that ``cat/rec12_001.wav`` is another recording).
Sources are dealt largest first, each to the fold that holds the fewest files of its
classes so far (ties: the lowest fold), which without a pattern is the round-robin above.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from src.data.index import DatasetError, DatasetIndex, Record

__all__ = ["DEFAULT_EXTENSIONS", "read_folder"]

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = ("wav", "flac", "ogg", "mp3", "aiff", "aif", "au")


def _extensions(extensions: Iterable[str] | str | None) -> tuple[str, ...]:
    if extensions is None:
        return DEFAULT_EXTENSIONS
    if isinstance(extensions, str):
        extensions = extensions.split(",")
    exts = tuple(dict.fromkeys(e.strip().lstrip(".").lower() for e in extensions if e.strip()))
    if not exts:
        raise DatasetError(
            f"data.extensions={list(extensions)} is empty; list the audio file extensions to "
            f"look for, e.g. {list(DEFAULT_EXTENSIONS)}"
        )
    return exts


def _audio_files(root: Path, exts: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the audio files under ``root``, sorted; hidden ones skipped."""
    suffixes = tuple("." + e for e in exts)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(name if rel == "." else f"{Path(rel).as_posix()}/{name}")
    return sorted(found)


def read_folder(
    root: str | os.PathLike,
    *,
    extensions: Iterable[str] | str | None = None,
    labels_from_subdirs: bool = False,
    num_folds: int = 1,
    source_pattern: str | None = None,
) -> DatasetIndex:
    """Index every audio file under ``root`` (see the module docstring)."""
    root = Path(root).expanduser().absolute()
    exts = _extensions(extensions)
    if not root.is_dir():
        raise DatasetError(
            f"audio folder {root} does not exist; set data.root=... to a folder of audio files "
            f"({', '.join(exts)})"
        )
    num_folds = int(num_folds)
    if num_folds < 1:
        raise DatasetError(f"data.num_folds={num_folds} must be at least 1")
    files = _audio_files(root, exts)
    if not files:
        raise DatasetError(
            f"no audio files under {root} (looked recursively for {', '.join(exts)}; hidden "
            "files and folders are skipped); set data.root=... to the folder with your audio "
            "or data.extensions=[...] to its file types"
        )

    if labels_from_subdirs:
        loose = [f for f in files if "/" not in f]
        if loose:
            raise DatasetError(
                f"data.labels_from_subdirs=true but {len(loose)} audio file(s) lie directly in "
                f"{root} with no class folder (e.g. {loose[0]}); move each into a subfolder "
                "named after its class, or remove them"
            )
        class_names = tuple(sorted({f.split("/", 1)[0] for f in files}))
        label_of = {name: i for i, name in enumerate(class_names)}
        labels = [label_of[f.split("/", 1)[0]] for f in files]
    else:
        class_names = ()
        labels = [()] * len(files)

    sources = _sources(files, source_pattern)
    folds = _deal_folds(files, labels, sources, num_folds)
    records = tuple(
        Record(path=str(root / rel), label=label, fold=fold, key=rel, group=source)
        for rel, label, fold, source in zip(files, labels, folds, sources)
    )
    info = {"files": len(records), "extensions": list(exts)}
    if source_pattern:
        named = {s for s in sources if s is not None}
        info["sources"] = len(named) + sum(s is None for s in sources)
        log.info("%s: %d file(s) from %d source(s) (data.source_pattern=%r; %d file(s) "
                 "unmatched, each a source of its own)", root, len(files), info["sources"],
                 source_pattern, sum(s is None for s in sources))
    if num_folds > len(files):
        log.warning("%s: %d file(s) for %d folds; some folds are empty", root, len(files),
                    num_folds)
    return DatasetIndex(
        records=records,
        class_names=class_names,
        root=str(root),
        multi_label=not labels_from_subdirs,
        info=info,
    )


def _sources(files: list[str], pattern: str | None) -> list[str | None]:
    """Each file's source under ``data.source_pattern`` (None: unmatched, or no pattern)."""
    if not pattern:
        return [None] * len(files)
    try:
        regex = re.compile(str(pattern))
    except re.error as err:
        raise DatasetError(
            f"data.source_pattern={pattern!r} is not a valid regular expression ({err}); "
            "give one whose first group names the recording in a file's path relative to "
            "data.root, e.g. '^([^/]+/[^_]+)_' for dog/rec12_003.wav"
        ) from None
    out = []
    for rel in files:
        match = regex.search(rel)
        if match is None:
            out.append(None)
            continue
        source = match.group(1) if regex.groups else match.group(0)
        out.append(source if source else None)
    if all(s is None for s in out):
        log.warning("data.source_pattern=%r matches none of the %d file(s) (e.g. %s): every "
                    "file is a source of its own", pattern, len(files), files[0])
    return out


def _deal_folds(files: list[str], labels: list, sources: list[str | None],
                num_folds: int) -> list[int]:
    """Folds 1..num_folds: each source whole, largest first (then by name), to the fold
    holding the fewest files of its classes so far, the lowest such fold on ties."""
    members: dict = {}
    for i, source in enumerate(sources):
        members.setdefault(("s", source) if source is not None else ("f", files[i]), []).append(i)
    order = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0][1], kv[0][0]))
    counts: dict = {}  # label -> files per fold
    folds = [0] * len(files)
    for _key, rows in order:
        load = [0] * num_folds
        for i in rows:
            per_fold = counts.setdefault(labels[i], [0] * num_folds)
            for f in range(num_folds):
                load[f] += per_fold[f]
        fold = min(range(num_folds), key=lambda f: (load[f], f))
        for i in rows:
            counts[labels[i]][fold] += 1
            folds[i] = fold + 1
    return folds
