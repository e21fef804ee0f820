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
"""

from __future__ import annotations

import logging
import os
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

    counters: dict = {}
    records = []
    for rel, label in zip(files, labels):
        position = counters.get(label, 0)  # round-robin per class: stratified, stable
        counters[label] = position + 1
        records.append(
            Record(path=str(root / rel), label=label, fold=1 + position % num_folds, key=rel)
        )
    if num_folds > len(files):
        log.warning("%s: %d file(s) for %d folds; some folds are empty", root, len(files),
                    num_folds)
    return DatasetIndex(
        records=tuple(records),
        class_names=class_names,
        root=str(root),
        multi_label=not labels_from_subdirs,
        info={"files": len(records), "extensions": list(exts)},
    )
