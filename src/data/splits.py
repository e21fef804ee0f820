"""Train / validation / test splits of a dataset index, for one held-out fold.

Every run has three disjoint splits. The test split is read once, to report; every
choice (best epoch, early stopping, checkpoint, hyper-parameter search, "best fold")
reads the validation split.

* ``data.folds``: the test folds, held out in turn (one model each).
* ``data.train_folds``: the training folds (null: every fold that is neither the test
  fold nor a validation fold, i.e. cross-validation).
* ``data.val_folds``: a fixed validation split where the dataset has one (Speech
  Commands' validation list, FSD50K's val); null: a validation split is carved from the
  training folds: ``data.val_fraction`` of them, stratified by class, drawn with
  ``data.split_seed`` (the same for every model seed, so that seeds repeat a setting
  on the same data).
* ``data.train_per_class``: keep at most this many training clips per class (after the
  validation split is taken; low-label experiments). null: all.

Single-label data is stratified per class. Multi-label data is stratified greedily by
each clip's rarest label (clips with rare labels are placed first), so every class with
enough clips reaches the validation split in proportion.

Sources: clips cut from one recording (``Record.group``: ESC-50's ``src_file``,
UrbanSound8K's ``fsID``, a Speech Commands speaker, ``data.source_pattern`` of a folder)
are carved as a whole (``data.split_by_source``, default true): otherwise the validation
split hears recordings the model trains on, and the best epoch it picks is the one that
memorises them best. A source the dataset's own folds put in both the test fold and
training is reported as a warning (the folds are the dataset's protocol).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from src.config import ConfigError
from src.data.index import DatasetIndex

__all__ = ["Splits", "check_split_config", "make_splits", "take_whole_groups"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Splits:
    train: np.ndarray  # positions in index.records
    val: np.ndarray
    test: np.ndarray
    val_source: str  # how the validation split was made, for results.json and the log

    def summary(self) -> dict:
        return {
            "num_train": int(len(self.train)),
            "num_val": int(len(self.val)),
            "num_test": int(len(self.test)),
            "val_source": self.val_source,
        }


def fold_list(value) -> list[int] | None:
    """A folds key (``data.folds``, ``data.train_folds``, ``data.val_folds``) as a list:
    one fold may be given as a number (``data.folds=1``); None stays None."""
    if value is None:
        return None
    if isinstance(value, int | str):
        value = [value]
    return [int(f) for f in value]


def check_split_config(data_cfg: Mapping) -> None:
    """Config-time checks of the split keys (no data needed): disjoint folds, a
    validation split of some kind. Raises :class:`ConfigError` naming the keys."""
    test = fold_list(data_cfg.get("folds")) or []
    train = fold_list(data_cfg.get("train_folds"))
    val = fold_list(data_cfg.get("val_folds"))
    for name, a, b in (("data.train_folds", train, test), ("data.val_folds", val, test)):
        overlap = sorted(set(a or []) & set(b))
        if overlap:
            raise ConfigError(
                f"{name}={a} and data.folds={test} (the test folds) share fold(s) {overlap}: "
                "a test fold must never train or select a model. Remove them from one of "
                "the two lists."
            )
    overlap = sorted(set(train or []) & set(val or []))
    if overlap:
        raise ConfigError(
            f"data.train_folds={train} and data.val_folds={val} share fold(s) {overlap}; "
            "the validation split must be disjoint from the training split."
        )
    if val is None:
        frac = data_cfg.get("val_fraction")
        try:
            frac = float(frac)
        except (TypeError, ValueError):
            frac = -1.0
        if not 0.0 < frac < 1.0:
            raise ConfigError(
                f"data.val_fraction={data_cfg.get('val_fraction')!r}: with no fixed "
                "validation folds (data.val_folds=null) a validation split is carved from "
                "the training folds; set data.val_fraction in (0, 1), e.g. 0.1, or "
                "data.val_folds=[...]."
            )


def _carve_single(labels: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``labels``) of a stratified ``frac`` sample: per class, round(frac *
    n) clips (at least one from every class with two or more clips)."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(frac * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)  # keep one to train on
        else:
            n = 0
        chosen.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _carve_single_groups(labels: np.ndarray, groups: np.ndarray, frac: float,
                         rng: np.random.Generator) -> np.ndarray:
    """:func:`_carve_single` over whole groups: each group counts for its most frequent
    class; per class, groups in random order join the split while it is short of
    round(frac * clips) and the group does not overshoot more than it fills, and at least
    one group of every class with two or more stays in training."""
    ids, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    per_group = np.zeros((len(ids), int(labels.max()) + 1), np.int64)
    np.add.at(per_group, (inverse, labels), 1)
    group_class = per_group.argmax(axis=1)
    taken_groups = []
    for c in np.unique(group_class):
        members = np.flatnonzero(group_class == c)
        if len(members) < 2:
            continue
        want = max(int(round(frac * int(sizes[members].sum()))), 1)
        taken_groups += take_whole_groups(rng.permutation(members), sizes, want)
    return np.flatnonzero(np.isin(inverse, taken_groups))


def take_whole_groups(order: np.ndarray, sizes: np.ndarray, want: int) -> list:
    """Groups of ``order`` (drawn in that order) for a split of about ``want`` clips
    (``sizes``: clips per group): each joins while the split is short, unless it would
    overshoot further than the split is short; at least one group (the smallest, when
    every one overshoots) and never all of them."""
    taken, chosen = 0, []
    for g in order:
        if taken >= want or len(chosen) == len(order) - 1:
            break
        if taken + sizes[g] - want > want - taken:
            continue  # it would overshoot further than the split is short
        chosen.append(g)
        taken += int(sizes[g])
    if not chosen and len(order) > 1:  # every group overshoots: the smallest (first on ties)
        chosen.append(order[np.argmin(sizes[order])])
    return chosen


def _carve_multi(
    label_lists: Sequence[tuple[int, ...]], num_classes: int, frac: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Greedy stratification for multi-label data: clips in the order of their rarest
    label (random among equals) go to validation while that rarest label still needs
    clips and the split is not full."""
    n = len(label_lists)
    target_total = int(round(frac * n))
    counts = np.zeros(num_classes, np.int64)
    for labels in label_lists:
        for c in labels:
            counts[c] += 1
    need = np.floor(frac * counts + 0.5).astype(np.int64)
    order = rng.permutation(n)
    rarity = np.array(
        [min((counts[c] for c in label_lists[i]), default=np.iinfo(np.int64).max)
         for i in order]
    )
    order = order[np.argsort(rarity, kind="stable")]
    taken = np.zeros(n, bool)
    total = 0
    for i in order:
        if total >= target_total:
            break
        labels = label_lists[i]
        if not labels:
            continue
        rarest = min(labels, key=lambda c: counts[c])
        if need[rarest] <= 0:
            continue
        taken[i] = True
        total += 1
        for c in labels:
            need[c] -= 1
    # Unlabeled clips (or a shortfall) fill the split up to its size at random.
    if total < target_total:
        rest = rng.permutation(np.flatnonzero(~taken))[: target_total - total]
        taken[rest] = True
    return np.flatnonzero(taken)


def _carve_multi_groups(
    label_lists: Sequence[tuple[int, ...]], groups: np.ndarray, num_classes: int,
    frac: float, rng: np.random.Generator,
) -> np.ndarray:
    """:func:`_carve_multi` over whole groups: a group carries the labels of all its clips
    and counts for as many clips as it holds."""
    ids, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse)
    n = len(label_lists)
    target_total = int(round(frac * n))
    counts = np.zeros(num_classes, np.int64)
    per_group: list[dict] = [{} for _ in ids]  # group -> {class: clips}
    for i, labels in enumerate(label_lists):
        for c in labels:
            counts[c] += 1
            per_group[inverse[i]][c] = per_group[inverse[i]].get(c, 0) + 1
    need = np.floor(frac * counts + 0.5).astype(np.int64)
    order = rng.permutation(len(ids))
    big = np.iinfo(np.int64).max
    rarity = np.array([min((counts[c] for c in per_group[g]), default=big) for g in order])
    order = order[np.argsort(rarity, kind="stable")]
    taken = np.zeros(len(ids), bool)
    left = counts.copy()  # clips of each class still in training
    total = 0

    def fits(g) -> bool:  # no overshoot past the shortfall; every class keeps a clip
        return (total + sizes[g] - target_total <= target_total - total
                and all(left[c] > k for c, k in per_group[g].items()))

    for g in order:
        if total >= target_total:
            break
        if not per_group[g]:
            continue
        rarest = min(per_group[g], key=lambda c: counts[c])
        if need[rarest] <= 0 or not fits(g):
            continue
        taken[g] = True
        total += int(sizes[g])
        for c, k in per_group[g].items():
            need[c] -= k
            left[c] -= k
    for g in rng.permutation(np.flatnonzero(~taken)):  # fill up to the split's size
        if total >= target_total:
            break
        if not fits(g):
            continue
        taken[g] = True
        total += int(sizes[g])
        for c, k in per_group[g].items():
            left[c] -= k
    return np.flatnonzero(taken[inverse])


def _per_class(index: DatasetIndex, train: np.ndarray, k: int, seed: int) -> np.ndarray:
    """At most ``k`` training clips per class (a low-label experiment), drawn with ``seed``
    (the same clips for every model seed)."""
    if index.multi_label:
        raise ConfigError(
            "data.train_per_class needs single-label data (one class per clip); set it to "
            "null for multi-label data."
        )
    rng = np.random.default_rng([seed, 1])
    labels = np.array([int(index.records[i].label) for i in train])
    keep = [rng.permutation(train[labels == c])[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def make_splits(index: DatasetIndex, test_fold: int, data_cfg: Mapping) -> Splits:
    """The three splits of ``index`` for the held-out ``test_fold``."""
    folds = np.array([r.fold for r in index.records])
    all_groups = index.groups()
    train_folds = fold_list(data_cfg.get("train_folds"))
    val_folds = fold_list(data_cfg.get("val_folds"))
    test = np.flatnonzero(folds == int(test_fold))
    if train_folds is None:
        excluded = {int(test_fold), *(val_folds or [])}
        pool = np.flatnonzero(~np.isin(folds, sorted(excluded)))
    else:
        pool = np.flatnonzero(np.isin(folds, train_folds))
    if val_folds is not None:
        val = np.flatnonzero(np.isin(folds, val_folds))
        train = pool
        names = ", ".join(index.fold_name(f) for f in val_folds)
        source = f"fixed: {names}"
    else:
        frac = float(data_cfg.get("val_fraction"))
        seed = int(data_cfg.get("split_seed", 0) or 0)
        # The carve depends on the test fold too, so that each CV fold draws its own.
        rng = np.random.default_rng([seed, int(test_fold)])
        groups = all_groups[pool]
        by_source = bool(data_cfg.get("split_by_source", True))
        grouped = by_source and len(np.unique(groups)) < len(groups)
        if index.multi_label:
            lists = index.label_lists()
            lists = [lists[i] for i in pool]
            picked = (_carve_multi_groups(lists, groups, index.num_classes, frac, rng)
                      if grouped else _carve_multi(lists, index.num_classes, frac, rng))
        else:
            labels = np.array([int(index.records[i].label) for i in pool])
            picked = (_carve_single_groups(labels, groups, frac, rng) if grouped
                      else _carve_single(labels, frac, rng))
        val = pool[picked]
        train = np.setdiff1d(pool, val)
        kind = "stratified by class" if not index.multi_label else "stratified by rarest label"
        if grouped:
            kind += (f", whole source recordings ({len(np.unique(groups))} sources, "
                     "data.split_by_source)")
        source = (
            f"carved from the training folds: {frac:g} of them, {kind}, "
            f"data.split_seed={seed}"
        )
    per_class = data_cfg.get("train_per_class")
    if per_class:
        train = _per_class(index, train, int(per_class), int(data_cfg.get("split_seed", 0) or 0))
    if len(train) == 0:
        raise ConfigError(
            f"no training clips for test fold {test_fold} (data.train_folds={train_folds}, "
            f"data.val_folds={val_folds}); the dataset's folds are {index.folds()}."
        )
    if len(val) == 0 and val_folds is not None:
        raise ConfigError(
            f"the validation split for test fold {test_fold} is empty ({source}: "
            f"data.val_folds={val_folds} holds no clip of the dataset at {index.root}; its "
            f"folds are {index.folds()}). Check the dataset's split files, or set "
            "data.val_folds=null to carve data.val_fraction of the training clips instead."
        )
    if len(val) == 0:
        raise ConfigError(
            f"the validation split for test fold {test_fold} is empty ({source}); raise "
            "data.val_fraction or set data.val_folds"
            + (" (whole sources: no class has two; data.split_by_source=false carves clip "
               "by clip)." if "whole source" in source else ".")
        )
    if len(test) == 0:
        raise ConfigError(
            f"test fold {test_fold} has no clips; the dataset's folds are {index.folds()}."
        )
    paths = np.array([r.path for r in index.records])
    for rows, what in ((train, "training"), (val, "validation"), (test, "test")):
        names, counts = np.unique(paths[rows], return_counts=True)
        if (counts > 1).any():
            raise ConfigError(
                f"the {what} split of test fold {test_fold} lists {int((counts > 1).sum())} "
                f"audio file(s) more than once, e.g. {names[counts > 1][0]}: the metadata has "
                "duplicate rows, which would weigh those clips twice. Remove the duplicates."
            )
    for a, b, what in ((train, val, "training and validation"), (train, test, "training and test"),
                       (val, test, "validation and test")):
        shared = np.intersect1d(paths[a], paths[b])
        if shared.size:
            raise ConfigError(
                f"the {what} splits of test fold {test_fold} share {shared.size} audio "
                f"file(s), e.g. {shared[0]}: the metadata lists them in two splits. Remove "
                "the duplicates from one split's metadata."
            )
    _warn_shared_sources(index, all_groups, train, val, test, test_fold)
    return Splits(train=np.sort(train), val=np.sort(val), test=np.sort(test), val_source=source)


def _warn_shared_sources(index: DatasetIndex, groups: np.ndarray, train: np.ndarray,
                         val: np.ndarray, test: np.ndarray, test_fold: int) -> None:
    """Warn where one source recording is in two splits (the dataset's folds put it there,
    or data.split_by_source=false): its clips are then no longer unseen data."""
    named = np.array([r.group is not None for r in index.records])
    if not named.any():
        return
    for a, b, what in ((train, test, "training and test"), (val, test, "validation and test"),
                       (train, val, "training and validation")):
        a, b = a[named[a]], b[named[b]]
        shared = np.intersect1d(groups[a], groups[b])
        if shared.size:
            example = next(index.records[i] for i in b if groups[i] == shared[0])
            log.warning(
                "test fold %s: %d source recording(s) have clips in both the %s splits, "
                "e.g. %r (%s): those clips are not unseen there. %s", test_fold, shared.size,
                what, example.group, example.path,
                "Keep each source in one fold of the metadata (the folds are the dataset's "
                "own)" if "test" in what else
                "data.split_by_source=true keeps them together in a carved validation split; "
                "fixed data.val_folds must not share sources with the training folds",
            )
