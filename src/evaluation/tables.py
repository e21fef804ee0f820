"""Tables and plots from finished runs (pure Python + NumPy; matplotlib for plots).

``python -m src.train`` writes a run-level ``results.json`` per run (and one per
fold under ``fold_<k>/``, which is ignored here). This module reads the run-level
files of one or more sweeps and summarises them:

* :func:`load_runs` finds the run-level files and turns each into a :class:`Run`
  (flattened config with dotted keys + the metrics a table needs).
* :func:`varying_keys` lists the config keys whose values differ between runs.
* :func:`group_runs` groups runs by setting (seeds are repeats) into :class:`Row` s.
* :func:`format_table` renders rows as Markdown, LaTeX (booktabs) or CSV.
* :func:`provenance_warnings` flags rows mixing commits, dirty trees or versions,
  and runs whose folds do.
* :func:`plot` draws the test metric against a swept value with error bars.

Every run reports one primary metric, read on the test split once per fold:
``accuracy`` (single-label) or ``mAP`` (multi-label). A table holds one metric:
runs of different metrics raise a ``ValueError`` (tabulate them separately).
Accuracy is shown in percent with one decimal (``77.5 ± 1.7``), mAP as AST
reports it, three decimals without the leading zero (``.459 ± .003``).

Statistics of a row (documented once, used everywhere): the test mean and std
are the mean and *population* std (NumPy's default, ``ddof=0``) of the pooled
per-fold test values of every run in the group, i.e. over all (fold, seed)
pairs. With one seed this is exactly the run's ``cv.last_epoch`` mean and std.
A row of a single value (one run of one fold) has no std (``None``): the tables
show its mean alone (the runs and folds columns say it is one value) and the CSV
leaves ``test_<metric>_std`` empty.
The validation column is the mean of the runs' ``val_<metric>`` (each the mean
over its folds of the final model's validation metric). The paper-protocol
column (AST's: the epoch is chosen by the test folds' mean, so it is
optimistic) is the mean of the runs' ``cv.paper_protocol_best_mean_epoch``.

Older results files (``accuracy`` / ``accuracy_std`` at the top,
``cv.best_mean_epoch``, no validation metric) still load, as accuracy runs.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import io
import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RESULTS = "results.json"

METRICS = ("accuracy", "mAP")  # primary metrics: single-label, multi-label
DAGGER = "†"
PAPER_PROTOCOL_NOTE = f"{DAGGER} AST's protocol: epoch chosen by the test folds' mean; optimistic."

# Config keys that never define a setting: where things are written (data.root
# included: one data set lives at different paths on different machines), how a
# run is logged or resumed, which folds were requested (checked separately, see
# Row.status), and the seed (seeds of one setting are repeats).
DEFAULT_IGNORE = (
    "paths",
    "logger",
    "hydra",
    "tags",
    "seed",
    "data.root",
    "data.folds",
    "trainer.verbose",
    "trainer.resume",
    "trainer.save_model",
    "_*",
    "*._*",
)

# The key naming a run's data set: rows judge their folds against the runs on the
# same data set only (see Row.status).
DATASET_KEY = "data.name"

# Config keys that say which data a run saw. Runs pooled in one row that differ in
# one of them get a note (Row.notes): data.root is ignored when grouping (the same
# data set at another path), data.name only pools when --by leaves it out.
DATA_KEYS = {
    "data.name": "different data sets in one row",
    "data.root": "fine if these are copies of one data set",
}


@dataclass
class Run:
    """One run (all its folds): where it came from, its config, its metrics.

    ``metric`` is the primary metric (``"accuracy"`` or ``"mAP"``); the values
    are fractions: ``test_per_fold`` the last-epoch model's test metric per fold,
    ``test_mean`` / ``test_std`` their mean and population std, ``val_mean`` the
    mean over folds of the final model's validation metric, ``paper_protocol``
    AST's optimistic number (the epoch chosen by the test folds' mean).
    """

    path: str
    config: dict[str, Any]  # flattened: {"model.num_heads": 4, ...}
    metric: str = "accuracy"
    test_per_fold: list[float] = field(default_factory=list)
    folds: tuple[int, ...] = ()
    test_mean: float | None = None
    test_std: float | None = None
    val_mean: float | None = None
    paper_protocol: float | None = None
    parameters: int | None = None
    train_time_s: float | None = None  # sum over folds
    train_clips_per_s: float | None = None  # mean over folds
    eval_clips_per_s: float | None = None  # mean over folds
    seed: int | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    provenance: list[str] = field(default_factory=list)  # cv.provenance.warnings

    @property
    def num_folds(self) -> int:
        return len(self.folds) if self.folds else len(self.test_per_fold)


@dataclass
class Row:
    """One setting: the values of the grouping keys and the statistics of its runs.

    ``status`` is ``""`` (complete), ``"incomplete"`` (a run lacks folds that
    other runs on its data set have, see ``folds_label``) or ``"missing"`` (an
    expected setting with no run). ``test_std`` is ``None`` for a single value
    (one run of one fold): there is no spread to show.
    """

    key: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    metric: str = "accuracy"
    test_mean: float | None = None
    test_std: float | None = None
    val_mean: float | None = None  # mean of the runs' val_mean, if every run has one
    paper_protocol: float | None = None  # mean of the runs' paper_protocol, if every run has one
    parameters: int | None = None
    num_runs: int = 0
    num_folds: int = 0  # folds per run (the fewest, if runs differ)
    folds_label: str = ""  # "5", or "3/5" when incomplete
    train_time_s: float | None = None  # mean per run
    train_clips_per_s: float | None = None  # mean over runs
    eval_clips_per_s: float | None = None
    seeds: list[Any] = field(default_factory=list)
    status: str = ""
    notes: list[str] = field(default_factory=list)  # anything else odd (parameter counts)

    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.key.items()) or "all runs"


# --------------------------------------------------------------------------- loading


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay values (as tuples, hashable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = _hashable(v)
    return out


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config as the tables read it: :func:`flatten`, and a folder data set
    (``data.format=folder``) keeping the default ``data.name=folder`` named after its
    folder, ``folder:<last part of data.root>``. Every folder set has that default name,
    so without this two sets would pool into one row and judge each other's folds; the
    same folder at two paths (two machines) still shares a name."""
    flat = flatten(config)
    root = flat.get("data.root")
    if flat.get("data.format") == "folder" and flat.get(DATASET_KEY) == "folder" and root:
        flat[DATASET_KEY] = f"folder:{PurePath(str(root)).name or root}"
    return flat


def _hashable(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def run_from_results(data: Mapping[str, Any], path: str) -> Run:
    """A :class:`Run` from the contents of a run-level results.json (KeyError if partial).

    Reads the current layout (``primary_metric``, ``val_<metric>``,
    ``cv.paper_protocol_best_mean_epoch``, ``cv.provenance``) and the older one
    (accuracy only, ``cv.best_mean_epoch``).
    """
    cv = data["cv"]
    per_fold = list(data.get("per_fold") or [])
    metric = str(data.get("primary_metric") or cv.get("primary_metric") or "accuracy")
    if metric not in METRICS:
        raise ValueError(f"primary_metric {metric!r} is not one of {METRICS}")
    last = cv["last_epoch"]
    values = [float(a) for a in last["per_fold"]]
    folds = tuple(int(f) for f in cv.get("folds") or [r["fold"] for r in per_fold])
    paper = cv.get("paper_protocol_best_mean_epoch") or cv.get("best_mean_epoch")
    val = data.get(f"val_{metric}")
    if val is None:  # else the per-fold values, when every fold has one
        fold_vals = [r.get(f"val_{metric}") for r in per_fold]
        val = _mean(fold_vals) if fold_vals and None not in fold_vals else None
    git = data.get("git") or {}
    # What trained the folds: a rerun that only skips finished folds rewrites the run's
    # own git and versions, the folds keep theirs (cv.provenance: their commits).
    trained = (cv.get("provenance") or {}).get("commits") or []
    fold_versions = [r.get("versions") for r in per_fold if r.get("versions")]
    config = run_config(data.get("config") or {})
    return Run(
        path=path,
        config=config,
        metric=metric,
        test_per_fold=values,
        folds=folds,
        test_mean=float(last["mean"]),
        test_std=float(last["std"]),
        val_mean=_float(val),
        paper_protocol=float(paper["mean"]) if paper else None,
        parameters=data.get("parameters"),
        train_time_s=data.get("train_time_s"),
        train_clips_per_s=_mean(r.get("train_clips_per_s") for r in per_fold),
        eval_clips_per_s=_mean(r.get("eval_clips_per_s") for r in per_fold),
        seed=config.get("seed"),
        git_commit=trained[0] if len(trained) == 1 else git.get("commit"),
        git_dirty=(bool((cv.get("provenance") or {}).get("dirty_folds"))
                   if trained else git.get("dirty")),
        versions=dict(fold_versions[0] if fold_versions else data.get("versions") or {}),
        provenance=[str(w) for w in (cv.get("provenance") or {}).get("warnings") or []],
    )


def _is_run_level(path: Path) -> bool:
    if path.parent.name.startswith("fold_"):
        return False
    # trainer.resume=false moves earlier results to <run dir>/previous/<time>/
    return path.parent.parent.name != "previous"


def find_results(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Run-level results.json files under ``paths`` (dirs or files); and paths not found."""
    found: set[Path] = set()
    absent: list[str] = []
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(f for f in p.rglob(RESULTS) if f.is_file() and _is_run_level(f))
            _warn_unfinished(p)
        else:
            absent.append(str(p))
    return sorted(found), absent


def _warn_unfinished(root: Path) -> None:
    """Run dirs with finished folds but no run-level results.json: interrupted or running."""
    dirs = {f.parent.parent for f in root.rglob(f"fold_*/{RESULTS}")}
    for d in sorted(dirs):
        if not (d / RESULTS).exists() and d.parent.name != "previous":
            n = len(list(d.glob(f"fold_*/{RESULTS}")))
            log.warning("%s: %d finished fold(s) but no %s (still running or interrupted)",
                        d, n, RESULTS)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run-level results.json under ``paths``, as :class:`Run` s.

    Fold-level files (``fold_<k>/results.json``) and earlier attempts moved to
    ``previous/`` are skipped; so are files that cannot be read or lack the
    run-level keys (a warning is logged for each, nothing is raised).
    """
    files, absent = find_results(paths)
    for p in absent:
        log.warning("%s does not exist", p)
    runs = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("skipping %s: cannot read it (%s)", f, err)
            continue
        if not isinstance(data, dict) or "cv" not in data:
            if f.parent.name.startswith("fold_"):
                continue  # a fold-level file named explicitly
            log.warning("skipping %s: not a run-level results.json (no 'cv')", f)
            continue
        try:
            runs.append(run_from_results(data, str(f)))
        except (KeyError, TypeError, ValueError) as err:
            log.warning("skipping %s: incomplete results (%s: %s)", f, type(err).__name__, err)
    return runs


# --------------------------------------------------------------------------- grouping


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(
        key == pat or key.startswith(pat + ".") or fnmatch.fnmatchcase(key, pat) for pat in ignore
    )


_ABSENT = object()


def _with_run_invariant(ignore: Sequence[str], runs: Sequence[Run]) -> list[str]:
    """``ignore`` and the keys the runs' own configs call run-invariant (``run_invariant_keys``
    in ``conf/train.yaml``: how a run is resumed or logged, not what a fold computes), and
    that list itself, which grows between versions. ``name`` and ``experiment`` stay
    keys: they label the runs."""
    extra = {"run_invariant_keys"}
    for r in runs:
        listed = r.config.get("run_invariant_keys")
        if isinstance(listed, list | tuple):
            extra.update(str(k) for k in listed)
    extra -= {"name", "experiment"}
    return [*ignore, *sorted(extra - set(ignore))]


# Never part of a setting, whatever a run's config lists: which folds a command ran, and
# how it was logged, resumed or written.
_SETTING_IGNORE = ("data.folds", "trainer.verbose", "trainer.resume", "logger", "hydra",
                   "paths", "tags", "_*", "*._*")


def setting_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened run config without its run-invariant keys: what the folds computed.
    The fold runs of one cross-validation split over several commands (``data.folds=``)
    share it."""
    ignore = _with_run_invariant(_SETTING_IGNORE, [Run(path="", config=dict(config))])
    return {k: v for k, v in config.items() if not _ignored(k, ignore)}


def is_setting_key(key: str, runs: Sequence[Run], ignore: Sequence[str] = DEFAULT_IGNORE) -> bool:
    """Whether ``key`` can tell settings apart: not one of ``ignore`` (seeds, folds,
    paths, logging) nor a run-invariant key of ``runs``."""
    return not _ignored(key, _with_run_invariant(ignore, runs))


def varying_keys(runs: Sequence[Run], ignore: Sequence[str] = DEFAULT_IGNORE) -> list[str]:
    """Config keys whose values differ between runs (a key some runs lack counts), sorted;
    not those of ``ignore``, nor the runs' run-invariant keys."""
    keys = sorted({k for r in runs for k in r.config})
    ignore = _with_run_invariant(ignore, runs)
    out = []
    for k in keys:
        if _ignored(k, ignore):
            continue
        values = {_sort_token(r.config.get(k, _ABSENT)) for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


def _same(a: Any, b: Any) -> bool:
    """Config value equality, lenient about types from the command line ("4" == 4)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _sort_token(v: Any) -> tuple:
    if v is _ABSENT or v is None:
        return (2, "")
    if isinstance(v, bool):
        return (1, str(v))
    if isinstance(v, int | float):
        return (0, float(v), "")
    return (1, str(v))


def _check_keys(runs: Sequence[Run], keys: Iterable[str]) -> None:
    known = {k for r in runs for k in r.config}
    for k in keys:
        if runs and k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{k!r} is in no run's config{hint}")


def _check_one_metric(runs: Sequence[Run]) -> str:
    """The runs' common primary metric; a ValueError naming the runs when they differ."""
    by_metric: dict[str, list[Run]] = {}
    for r in runs:
        by_metric.setdefault(r.metric, []).append(r)
    if len(by_metric) > 1:
        parts = "; ".join(
            f"{m}: {len(rs)} run(s), e.g. {rs[0].path}" for m, rs in sorted(by_metric.items())
        )
        raise ValueError(
            f"the runs mix primary metrics ({parts}); a table holds one metric: "
            "tabulate the single-label (accuracy) and multi-label (mAP) runs separately"
        )
    return next(iter(by_metric), "accuracy")


def _pooled(runs: Sequence[Run]) -> tuple[float | None, float | None]:
    """Mean and population std over every (fold, seed) test value of ``runs``; the std
    is None when there is a single value (no spread to speak of)."""
    if all(r.test_per_fold for r in runs):
        values = np.concatenate([np.asarray(r.test_per_fold, np.float64) for r in runs])
        return float(values.mean()), float(values.std()) if len(values) > 1 else None
    # Runs known only by their mean/std over n folds (e.g. W&B summaries): the same
    # pooled statistics from the moments, sum_i n_i (s_i^2 + (m_i - M)^2) / N.
    parts = []
    for r in runs:
        if r.test_per_fold:
            v = np.asarray(r.test_per_fold, np.float64)
            parts.append((len(v), float(v.mean()), float(v.std())))
        elif r.test_mean is not None:
            parts.append((max(r.num_folds, 1), r.test_mean, r.test_std or 0.0))
    if not parts:
        return None, None
    n = np.array([p[0] for p in parts], np.float64)
    m = np.array([p[1] for p in parts])
    s = np.array([p[2] for p in parts])
    mean = float((n * m).sum() / n.sum())
    if n.sum() < 2:
        return mean, None
    var = float((n * (s**2 + (m - mean) ** 2)).sum() / n.sum())
    return mean, math.sqrt(max(var, 0.0))


def group_runs(
    runs: Sequence[Run],
    by: Sequence[str] | None = None,
    expected: Mapping[str, Sequence[Any]] | None = None,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> list[Row]:
    """Group runs by setting; rows sorted by the key values.

    ``by``: the config keys that define a setting; default: :func:`varying_keys`
    minus ``seed`` (runs that differ only in seed are repeats of one setting).
    Keys of ``expected`` are added to ``by``; every combination of expected
    values without a run gets a row with status ``"missing"``.

    Per row: pooled test mean and population std (ddof=0) over the per-fold
    test values of every run in the group; the mean of the runs' validation
    metric and of their paper-protocol number (each if every run has it);
    number of runs; folds per run; mean train time per run; mean train/eval
    throughput (clips/s). A row is ``"incomplete"`` when one of its runs lacks
    folds of the largest folds set among the runs on its data set (``data.name``;
    a one-fold quickstart run does not judge ESC-50 runs, nor they it), and
    ``folds_label`` then reads e.g. ``"3/5"``. A row whose runs differ in a key of
    :data:`DATA_KEYS` (e.g. ``data.root``, which is not a grouping key) gets a note
    naming the values and the ``--by`` that splits them. Runs of different primary
    metrics raise ``ValueError``.
    """
    metric = _check_one_metric(runs)
    expected = dict(expected or {})
    if by is None:
        keys = [k for k in varying_keys(runs, ignore) if k != "seed"]
    else:
        keys = list(by)
    keys += [k for k in expected if k not in keys]
    _check_keys(runs, keys)

    groups: dict[tuple, list[Run]] = {}
    values: dict[tuple, tuple] = {}
    for r in runs:
        vals = tuple(r.config.get(k) for k in keys)
        token = tuple(_sort_token(v) for v in vals)
        groups.setdefault(token, []).append(r)
        values.setdefault(token, vals)

    references = _fold_references(runs)
    rows = [_make_row(dict(zip(keys, values[t])), groups[t], references) for t in groups]

    if expected:
        exp_keys = list(expected)
        for combo in itertools.product(*(expected[k] for k in exp_keys)):
            want = dict(zip(exp_keys, combo))
            if not any(all(_same(r.key.get(k), v) for k, v in want.items()) for r in rows):
                key = {k: want.get(k) for k in keys}
                rows.append(Row(key=key, metric=metric, status="missing"))

    rows.sort(key=lambda row: tuple(_sort_token(row.key.get(k)) for k in keys))
    return rows


def _mean_if_all(values: Sequence[float | None]) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _dataset(run: Run) -> tuple:
    return _sort_token(run.config.get(DATASET_KEY))


def _fold_references(runs: Sequence[Run]) -> dict[tuple, frozenset]:
    """Per data set (:data:`DATASET_KEY`): the folds a complete run has, i.e. the
    largest folds set among its runs (the most common one on a tie)."""
    by_dataset: dict[tuple, Counter] = {}
    for r in runs:
        if r.folds:
            by_dataset.setdefault(_dataset(r), Counter())[frozenset(r.folds)] += 1
    return {d: max(sets, key=lambda s: (len(s), sets[s])) for d, sets in by_dataset.items()}


def _data_notes(key: Mapping[str, Any], runs: Sequence[Run]) -> list[str]:
    """Notes on runs of one row that differ in a key of :data:`DATA_KEYS`: the values
    (with their number of runs) and the ``--by`` that splits them."""
    notes = []
    for k, hint in DATA_KEYS.items():
        counts = Counter(r.config[k] for r in runs if k in r.config)
        if len(counts) < 2:
            continue
        shown = [f"{_show(v)} ({n} run{'s' if n > 1 else ''})"
                 for v, n in sorted(counts.items(), key=lambda item: _sort_token(item[0]))]
        if len(shown) > 4:
            shown = shown[:3] + [f"{len(shown) - 3} more"]
        by = ",".join([*key, k])
        notes.append(f"runs differ in {k}: {', '.join(shown)}; {hint}, "
                     f"else split them with --by {by}")
    return notes


def _repeat_notes(runs: Sequence[Run]) -> list[str]:
    """A note on runs of one row that are the same run twice: the same config, seed and
    data root (one run alone and again in a sweep): they count as two repeats, which
    narrows the std without new information."""
    ignore = _with_run_invariant([k for k in DEFAULT_IGNORE if k not in ("seed", "data.root")],
                                 runs)
    same: dict[tuple, list[Run]] = {}
    for r in runs:
        token = tuple(sorted((k, _sort_token(v)) for k, v in r.config.items()
                             if not _ignored(k, ignore)))
        same.setdefault(token, []).append(r)
    notes = []
    for group in same.values():
        if len(group) > 1:
            shown = ", ".join(str(Path(r.path).parent) for r in group[:3])
            more = f" and {len(group) - 3} more" if len(group) > 3 else ""
            notes.append(
                f"{len(group)} runs have the same config and seed ({group[0].seed}): "
                f"{shown}{more}; they count as {len(group)} repeats, so the std is too "
                "narrow: give the tables one of them, or run the repeats with other seeds")
    return notes


def _make_row(key: dict[str, Any], runs: list[Run],
              references: Mapping[tuple, frozenset]) -> Row:
    metric = _check_one_metric(runs)
    mean, std = _pooled(runs)
    params = {r.parameters for r in runs if r.parameters is not None}
    notes = []
    if len(params) > 1:
        notes.append(f"parameter counts differ: {sorted(params)}")
    notes += _data_notes(key, runs)
    notes += _repeat_notes(runs)
    row = Row(
        key=key,
        runs=list(runs),
        metric=metric,
        test_mean=mean,
        test_std=std,
        val_mean=_mean_if_all([r.val_mean for r in runs]),
        paper_protocol=_mean_if_all([r.paper_protocol for r in runs]),
        parameters=min(params) if len(params) == 1 else None,
        num_runs=len(runs),
        num_folds=min(r.num_folds for r in runs),
        train_time_s=_mean(r.train_time_s for r in runs),
        train_clips_per_s=_mean(r.train_clips_per_s for r in runs),
        eval_clips_per_s=_mean(r.eval_clips_per_s for r in runs),
        seeds=sorted({r.seed for r in runs if r.seed is not None}, key=_sort_token),
        notes=notes,
    )
    row.folds_label = str(row.num_folds)
    worst: tuple[int, int] | None = None  # (folds of the reference it has, reference size)
    for r in runs:
        reference = references.get(_dataset(r))
        if not reference:
            continue
        have = len(set(r.folds) & reference)
        if have < len(reference) or set(r.folds) - reference:
            if worst is None or have * worst[1] < worst[0] * len(reference):
                worst = (have, len(reference))
    if worst is not None:
        row.status = "incomplete"
        row.folds_label = f"{worst[0]}/{worst[1]}"
    return row


# --------------------------------------------------------------------------- formatting


def _show(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


def format_accuracy(mean: float | None, std: float | None, pm: str = "±") -> str:
    """``77.5 ± 1.7``: percent with one decimal."""
    if mean is None:
        return ""
    if std is None:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} {pm} {100 * std:.1f}"


def _three(x: float) -> str:
    """``.459``: three decimals, no leading zero (``1.000`` and ``-.012`` as such)."""
    text = f"{x:.3f}"
    if text.startswith("0."):
        return text[1:]
    if text.startswith("-0."):
        return "-" + text[2:]
    return text


def format_map(mean: float | None, std: float | None, pm: str = "±") -> str:
    """``.459 ± .003``: three decimals without the leading zero, as AST reports mAP."""
    if mean is None:
        return ""
    if std is None:
        return _three(mean)
    return f"{_three(mean)} {pm} {_three(std)}"


def format_metric(mean: float | None, std: float | None, metric: str, pm: str = "±") -> str:
    """A metric's value as the tables show it (see :func:`format_accuracy`, :func:`format_map`)."""
    return format_map(mean, std, pm) if metric == "mAP" else format_accuracy(mean, std, pm)


def _unit(metric: str) -> str:
    return " (%)" if metric == "accuracy" else ""


def _lookup(reference: Mapping[Any, Any], row: Row, key: str | None) -> str:
    """The paper's text for ``row``: its value of ``key`` (or of each key column, in
    order) in ``reference``. A ``null`` entry matches an unset value only under an
    explicit ``key`` (e.g. ``model.pretrained: null``, no pretraining)."""
    keys = [key] if key else list(row.key)
    for k in keys:
        v = row.key.get(k)
        for ref_value, text in reference.items():
            if v is None:
                if key and ref_value is None:
                    return str(text)
            elif ref_value is not None and _same(ref_value, v):
                return str(text)
    return ""


def _columns(rows: Sequence[Row], reference, metric: str) -> list[tuple[str, str]]:
    """(id, header) per column; the id is the CSV header."""
    keys = list(dict.fromkeys(k for r in rows for k in r.key))
    unit = _unit(metric)
    cols = [(k, k) for k in keys]
    cols += [("parameters", "params"), (f"test_{metric}", f"test {metric}{unit}")]
    if any(r.val_mean is not None for r in rows):
        cols.append((f"val_{metric}", f"val {metric}{unit}"))
    if any(r.paper_protocol is not None for r in rows):
        cols.append((f"paper_protocol_{metric}", f"paper protocol{unit}{DAGGER}"))
    cols += [
        ("runs", "runs"),
        ("folds", "folds"),
        ("train_time_s", "train time (s)"),
        ("train_clips_per_s", "train clips/s"),
    ]
    if reference is not None:
        cols.append(("paper", "paper"))
    if any(r.status for r in rows):
        cols.append(("status", "status"))
    return cols


def _num(v: float | None, digits: int = 0) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _cell(row: Row, col: str, fmt: str, reference, reference_key) -> str:
    if col in row.key:
        return _show(row.key[col])
    m = row.metric
    if col == "parameters":
        if row.parameters is None:
            return ""
        return str(row.parameters) if fmt == "csv" else f"{row.parameters:,}"
    if col == f"test_{m}":
        return format_metric(row.test_mean, row.test_std, m)
    if col == f"val_{m}":
        return format_metric(row.val_mean, None, m)
    if col == f"paper_protocol_{m}":
        return format_metric(row.paper_protocol, None, m)
    if col == "runs":
        return str(row.num_runs) if row.status != "missing" else "0"
    if col == "folds":
        return row.folds_label
    if col == "train_time_s":
        return _num(row.train_time_s, 1)
    if col == "train_clips_per_s":
        return _num(row.train_clips_per_s)
    if col == "paper":
        return _lookup(reference or {}, row, reference_key)
    if col == "status":
        if row.status == "incomplete":
            return f"incomplete ({row.folds_label} folds)"
        return row.status
    raise KeyError(col)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(c, c) for c in text)
    return out.replace("±", r"$\pm$").replace("—", "---").replace(DAGGER, r"$^\dagger$")


def _raw(v: float | None) -> str:
    return "" if v is None else repr(v)


def format_table(
    rows: Sequence[Row],
    fmt: str = "md",
    reference: Mapping[Any, Any] | None = None,
    reference_key: str | None = None,
) -> str:
    """Render rows: ``"md"`` (pipe table), ``"latex"`` (booktabs tabular) or ``"csv"``.

    Columns: the key columns, ``params``, ``test <metric>`` (mean ± population
    std over the pooled folds and seeds; the mean alone for a single value, and
    CSV's ``test_<metric>_std`` empty), ``val <metric>`` (when the runs have
    it), ``paper protocol†`` (AST's optimistic protocol, when the runs have it;
    Markdown and LaTeX add the footnote line), runs, folds, train time and
    throughput. Accuracy reads ``77.5 ± 1.7`` (percent, one decimal), mAP
    ``.459 ± .003``. ``reference`` maps a setting value to a published number
    (text), shown in a ``paper`` column; the value is looked up in
    ``reference_key`` or, by default, in the row's key columns in order.
    CSV adds the raw fractions ``test_<metric>_mean``, ``test_<metric>_std``,
    ``val_<metric>_mean`` (and ``paper_protocol_<metric>_mean`` with that
    column), the eval throughput and the seeds. Rows of different metrics:
    ``ValueError``.
    """
    if fmt not in ("md", "latex", "csv"):
        raise ValueError(f"unknown format {fmt!r}: use md, latex or csv")
    metrics = sorted({r.metric for r in rows})
    if len(metrics) > 1:
        raise ValueError(f"the rows mix primary metrics ({', '.join(metrics)}); "
                         "a table holds one metric: format them separately")
    metric = metrics[0] if metrics else "accuracy"
    cols = _columns(rows, reference, metric)
    cells = [[_cell(r, c, fmt, reference, reference_key) for c, _ in cols] for r in rows]
    text_cols = {k for r in rows for k in r.key} | {"paper", "status"}
    left = [c in text_cols for c, _ in cols]
    footnote = any(c == f"paper_protocol_{metric}" for c, _ in cols)
    if fmt == "md":
        lines = ["| " + " | ".join(h for _, h in cols) + " |"]
        lines.append("| " + " | ".join("---" if a else "---:" for a in left) + " |")
        for line in cells:
            lines.append("| " + " | ".join(x.replace("|", r"\|") for x in line) + " |")
        if footnote:
            lines += ["", PAPER_PROTOCOL_NOTE]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        spec = "".join("l" if a else "r" for a in left)
        lines = [
            rf"\begin{{tabular}}{{{spec}}}",
            r"\toprule",
            " & ".join(latex_escape(h) for _, h in cols) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(latex_escape(x) for x in line) + r" \\" for line in cells]
        lines.append(r"\bottomrule")
        if footnote:
            note = latex_escape(PAPER_PROTOCOL_NOTE)
            lines.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\footnotesize {note}}} \\")
        lines.append(r"\end{tabular}")
        return "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = [f"test_{metric}_mean", f"test_{metric}_std", f"val_{metric}_mean"]
    if footnote:
        extra.append(f"paper_protocol_{metric}_mean")
    writer.writerow([c for c, _ in cols] + extra + ["eval_clips_per_s", "seeds"])
    for r, line in zip(rows, cells):
        raw = [_raw(r.test_mean), _raw(r.test_std), _raw(r.val_mean)]
        if footnote:
            raw.append(_raw(r.paper_protocol))
        writer.writerow(line + raw + [
            _num(r.eval_clips_per_s),
            " ".join(str(s) for s in r.seeds),
        ])
    return buf.getvalue()


# --------------------------------------------------------------------------- checks, plots


def _run_name(run: Run) -> str:
    path = Path(run.path)
    return str(path.parent) if path.name == RESULTS else run.path


def provenance_warnings(rows: Sequence[Row]) -> list[str]:
    """Rows whose runs differ in git commit or package versions, or ran on a dirty tree;
    and runs whose own folds do (the run's ``cv.provenance.warnings``)."""
    out = []
    commits_by_row = []
    for row in rows:
        if not row.runs:
            continue
        name = row.label()
        commits = sorted({r.git_commit for r in row.runs if r.git_commit})
        commits_by_row.append(commits)
        if len(commits) > 1:
            out.append(f"{name}: runs from {len(commits)} git commits "
                       f"({', '.join(c[:7] for c in commits)})")
        dirty = sum(bool(r.git_dirty) for r in row.runs)
        if dirty:
            out.append(f"{name}: {dirty} of {len(row.runs)} run(s) from a dirty git tree "
                       "(uncommitted changes)")
        packages = sorted({p for r in row.runs for p in r.versions})
        differ = []
        for p in packages:
            vs = {str(r.versions.get(p)) for r in row.runs}
            if len(vs) > 1:
                differ.append(f"{p} {'/'.join(sorted(vs))}")
        if differ:
            out.append(f"{name}: runs differ in package versions: {', '.join(differ)}")
        for r in row.runs:
            out += [f"{name}: run {_run_name(r)}: {w}" for w in r.provenance]
    all_commits = {c for cs in commits_by_row for c in cs}
    if len(all_commits) > 1 and all(len(cs) <= 1 for cs in commits_by_row):
        out.append(f"rows come from {len(all_commits)} git commits "
                   f"({', '.join(sorted(c[:7] for c in all_commits))})")
    return out


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def plot(rows: Sequence[Row], key: str, path: str | Path, title: str | None = None) -> Path:
    """PNG of the test metric (accuracy in %, or mAP) against ``key`` with ±std error
    bars; returns ``path``.

    Numeric values go on a numeric axis (log2 when they span 8x or more, as
    1, 2, 4, 8, 16 do), others are categories in row order.
    Rows that also differ in other keys become one line each. Missing rows are
    left out. Rows of different metrics: ``ValueError``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({r.metric for r in rows})
    if len(metrics) > 1:
        raise ValueError(f"the rows mix primary metrics ({', '.join(metrics)}); plot them apart")
    metric = metrics[0] if metrics else "accuracy"
    scale = 100.0 if metric == "accuracy" else 1.0
    done = [r for r in rows if r.test_mean is not None]
    numeric = all(_numeric(r.key.get(key)) for r in done)
    categories = list(dict.fromkeys(_show(r.key.get(key)) for r in done))
    series: dict[str, list[Row]] = {}
    for r in done:
        rest = ", ".join(f"{k}={_show(v)}" for k, v in r.key.items() if k != key)
        series.setdefault(rest, []).append(r)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, rs in series.items():
        xs = [r.key.get(key) if numeric else categories.index(_show(r.key.get(key))) for r in rs]
        ys = [scale * r.test_mean for r in rs]
        es = [scale * (r.test_std or 0.0) for r in rs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=label or None)
    if numeric:
        xs = sorted({r.key.get(key) for r in done})
        if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:  # 1, 2, 4, ..., 16: even spacing
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([_show(x) for x in xs])
    else:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories)
    ax.set_xlabel(key)
    ax.set_ylabel(f"test {metric}{_unit(metric)}, mean ± std")
    ax.set_title(title or f"test {metric} vs {key}")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
