"""What every dataset reader returns: an index of records (path, labels, fold).

A reader says whether its labels are single-label (``Record.label`` is a class index) or
multi-label (``Record.label`` is a tuple of class indices, turned into a multi-hot vector
by the pipeline); everything downstream (loss, outputs, metrics) follows from
``DatasetIndex.multi_label``. Folds are integers; datasets with named splits map them in
``fold_names`` (Speech Commands: 1 train, 2 validation, 3 test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["DatasetError", "DatasetIndex", "Record"]


class DatasetError(RuntimeError):
    """The dataset is missing or its metadata is malformed; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Record:
    path: str  # absolute path of the audio file
    label: int | tuple[int, ...]  # single-label: 0..K-1; multi-label: sorted class indices
    fold: int
    key: str | None = None  # the dataset's own id (YTID, fname); None: the path
    source: str | None = None  # where the record came from, for messages ("eval.csv row 17")
    # The recording the clip was cut from (ESC-50's src_file, UrbanSound8K's fsID, a
    # speaker): clips that share it stay on one side of every split. None: the clip alone.
    group: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    records: tuple[Record, ...]
    class_names: tuple[str, ...]  # index = label
    root: str
    multi_label: bool = False
    fold_names: dict | None = dataclasses.field(default=None, compare=False)
    # What the reader did that a results file should show (target remapping, clips
    # listed in the metadata but missing on disk, ...).
    info: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_type(self) -> str:
        return "multi" if self.multi_label else "single"

    def folds(self) -> list[int]:
        return sorted({r.fold for r in self.records})

    def fold_name(self, fold: int) -> str:
        return str((self.fold_names or {}).get(int(fold), f"fold {fold}"))

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

    def groups(self) -> np.ndarray:
        """Every record's source group as an integer id; a record without one is a group of
        its own. Ids are dense, in order of first appearance."""
        if all(r.group is None for r in self.records):  # AudioSet, FSD50K: no sources
            return np.arange(len(self.records), dtype=np.int64)
        ids: dict = {}
        out = np.empty(len(self.records), np.int64)
        for i, r in enumerate(self.records):
            key = ("g", r.group) if r.group is not None else ("r", i)
            out[i] = ids.setdefault(key, len(ids))
        return out

    def label_lists(self) -> list[tuple[int, ...]]:
        """Every record's labels as a tuple (one element for single-label data)."""
        if self.multi_label:
            return [tuple(r.label) for r in self.records]
        return [(int(r.label),) for r in self.records]

    def label_counts(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Clips per class (a clip counts once for each of its labels)."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        lists = self.label_lists()
        for i in range(len(lists)) if indices is None else indices:
            for c in lists[int(i)]:
                counts[c] += 1
        return counts
