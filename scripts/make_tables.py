"""Tables (and a plot) from finished runs.

    python -m scripts.make_tables SWEEP_DIR... [--format md|latex|csv]
        [--by model.num_heads[,other.key]] [--plot out.png] [--reference FILE]
        [--expect model.num_heads=1,2,4,8,16] [--wandb ENTITY/PROJECT --group G]

Reads every run-level ``results.json`` under the given directories (fold-level
files are ignored), groups runs by setting (default: the config keys that differ
between runs; seeds are repeats) and prints one row per setting: the test split's
primary metric (accuracy in percent, or mAP) as mean ± std over all (fold, seed)
pairs of the setting, the validation metric, AST's optimistic paper-protocol
number when the runs recorded it (marked †, with a footnote), parameters, runs,
folds, train time and throughput. A table holds one metric: accuracy (single-label)
and mAP (multi-label) runs given together are an error (exit status 2); tabulate
them separately. A row of a single value (one run of one fold) shows its mean
alone (CSV: an empty ``test_<metric>_std``). Warnings (incomplete settings, rows
pooling runs on different ``data.root`` paths or data sets, mixed commits or
versions, runs whose folds mix commits, unreadable files) go to stderr. A setting
is incomplete when a run lacks folds that other runs on the same data set
(``data.name``) have. Options may come before, between or after the directories.

``--expect KEY=V1,V2,...`` lists the values a sweep should have: values without
a run appear as "missing" rows. Without it, a Hydra sweep directory among the
directories (its ``multirun.yaml``; one sweep, Hydra's basic sweeper) gives the
values its command swept (``model.num_heads=1,2,4``), so that the jobs of a killed
or failed sweep that left no results show as missing rows; seeds, folds and
run-invariant keys are not settings, and an explicit ``--by`` keeps its own keys.
``--reference FILE`` (YAML or JSON, see ``references/``) adds a "paper" column. ``--wandb ENTITY/PROJECT --group G``
reads the runs of a W&B group instead of (or besides) local files.

Exit status: 0 when a table was printed (even with incomplete settings), 2 when
no results were found or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from src.evaluation.tables import (
    METRICS,
    Run,
    format_table,
    group_runs,
    is_setting_key,
    load_runs,
    plot,
    provenance_warnings,
    run_config,
    setting_of,
)

log = logging.getLogger("scripts.make_tables")


def _parse_value(text: str) -> Any:
    """A command-line value as Hydra would read it: ``4`` -> 4, ``1e-3`` -> 0.001,
    ``null`` -> None (as ``model.pretrained=null`` is no pretrained weights)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip():
        return None
    return value if isinstance(value, int | float | str | bool) else text


def parse_expect(items: list[str]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--expect {item!r}: use KEY=V1,V2,... (e.g. model.num_heads=1,2,4)")
        out.setdefault(key.strip(), []).extend(_parse_value(v.strip()) for v in values.split(","))
    return out


def multirun_sweeps(path: str | Path) -> dict[str, list[Any]]:
    """The discrete sweeps of the command behind a Hydra ``multirun.yaml``, by key
    (``model.num_heads=1,2,4`` and ``x=range(1,4)`` give their values; ``interval(...)``,
    config groups' packages and ``hydra.*`` do not), or ``{}`` when another sweeper
    (Optuna samples its space) ran it or the file cannot be read."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra_cfg = (yaml.safe_load(Path(path).read_text()) or {}).get("hydra") or {}
        task = list(hydra_cfg["overrides"]["task"])
        sweeper = str((hydra_cfg.get("sweeper") or {}).get("_target_", ""))
        overrides = OverridesParser.create().parse_overrides([str(t) for t in task])
    except Exception as err:  # noqa: BLE001  (an unreadable file only loses the expectation)
        log.warning("%s: not read (%s); no rows are expected from it", path, err)
        return {}
    if not sweeper.endswith("BasicSweeper"):
        return {}
    out: dict[str, list[Any]] = {}
    for o in overrides:
        if o.is_hydra_override() or o.package or not o.is_sweep_override():
            continue
        if o.is_discrete_sweep():
            out[o.key_or_group] = [_parse_value(v) for v in o.sweep_string_iterator()]
    return out


def swept_settings(paths: list[str], runs: list[Run], by: list[str] | None
                   ) -> tuple[dict[str, list[Any]], Path | None]:
    """What :func:`multirun_sweeps` gives for the one sweep among ``paths`` (none or
    several: nothing), keeping the keys that are settings of these runs: in their config,
    not a seed, the folds or a run-invariant key, and in ``by`` when it is given."""
    found = sorted({m.resolve() for p in map(Path, paths) if p.is_dir()
                    for m in p.rglob("multirun.yaml")})
    if len(found) != 1:
        return {}, None
    known = {k for r in runs for k in r.config}
    swept = {k: v for k, v in multirun_sweeps(found[0]).items()
             if k in known and is_setting_key(k, runs) and (by is None or k in by)}
    return swept, found[0]


def load_reference(path: str | Path) -> tuple[dict[Any, str], str | None]:
    """A reference file: ``{key: KEY, values: {value: text}}`` or a plain ``{value: text}``."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting values to paper numbers")
    if "values" in data and isinstance(data["values"], dict):
        return {k: str(v) for k, v in data["values"].items()}, data.get("key")
    return {k: str(v) for k, v in data.items()}, None


def _fold_metric(summary: dict) -> str | None:
    """The primary metric a fold run logged (``test/<metric>``), or None."""
    return next((m for m in METRICS if f"test/{m}" in summary), None)


def _cv_summary_metric(summary: dict) -> tuple[str, str] | None:
    """``(metric, key prefix)`` of a cv_summary run: ``cv/test_<metric>_mean`` as
    ``src.train`` logs it, or the older ``cv/accuracy_mean``."""
    for m in METRICS:
        if f"cv/test_{m}_mean" in summary:
            return m, f"cv/test_{m}"
    if "cv/accuracy_mean" in summary:
        return "accuracy", "cv/accuracy"
    return None


def runs_from_wandb_records(path: str, records) -> list[Run]:
    """:class:`Run` s from W&B runs given as ``(id, job_type, config, summary)``: one
    per config, from its fold runs and its cv_summary run.

    Fold runs (job type ``fold<k>``) give ``test/<metric>`` (``accuracy`` or
    ``mAP``), the last epoch's ``val_<metric>``, ``parameters`` and
    ``train_time_s``; a run's ``cv_summary`` gives ``cv/test_<metric>_mean`` and
    ``_std`` (older runs: ``cv/accuracy_mean`` and ``_std``), used when the fold
    runs are not all there, and the paper-protocol mean
    (``cv/paper_protocol_test_<metric>_mean``; older ``cv/best_epoch_accuracy_mean``).
    """
    by_config: dict[str, dict] = {}
    for run_id, job, raw_config, summary in records:
        config = run_config({k: v for k, v in dict(raw_config).items()
                             if not k.startswith("_")})
        summary = dict(summary or {})
        # One run per setting: the folds of a cross-validation split over several
        # commands (data.folds=[1,2], then [3]) are one run, as in the local files.
        entry = by_config.setdefault(
            json.dumps(sorted(setting_of(config).items()), default=str),
            {"config": config, "folds": {}, "cv": None, "ids": [], "wanted": set()},
        )
        entry["ids"].append(run_id)
        entry["wanted"].update(int(f) for f in config.get("data.folds") or ())
        job = str(job or "")
        if job == "cv_summary":
            entry["cv"] = summary
        elif job.startswith("fold") and job[4:].isdigit() and _fold_metric(summary):
            entry["folds"][int(job[4:])] = summary

    runs = []
    for entry in by_config.values():
        config, folds, cv = dict(entry["config"]), entry["folds"], entry["cv"]
        wanted = tuple(sorted(entry["wanted"]))
        if wanted:
            config["data.folds"] = list(wanted)
        name = f"wandb:{path}/{'+'.join(entry['ids'])}"
        cv_metric = _cv_summary_metric(cv) if cv is not None else None
        metrics = {_fold_metric(s) for s in folds.values()}
        if cv_metric:
            metrics.add(cv_metric[0])
        if len(metrics) > 1:
            log.warning("W&B %s: its runs log different metrics (%s), skipped",
                        name, ", ".join(sorted(metrics)))
            continue
        if not metrics:
            log.warning("W&B %s: no finished fold or cv_summary run, skipped", name)
            continue
        (metric,) = metrics
        params = next((s.get("parameters") for s in folds.values() if "parameters" in s), None)
        times = [s["train_time_s"] for s in folds.values() if "train_time_s" in s]
        vals = [folds[f].get(f"val_{metric}") for f in sorted(folds)]
        paper = None
        if cv is not None:
            paper = cv.get(f"cv/paper_protocol_test_{metric}_mean")
            if paper is None and metric == "accuracy":
                paper = cv.get("cv/best_epoch_accuracy_mean")
        common = {
            "path": name,
            "config": config,
            "metric": metric,
            "parameters": params,
            "train_time_s": sum(times) if times else None,
            "seed": config.get("seed"),
            "paper_protocol": None if paper is None else float(paper),
        }
        if cv_metric and (not folds or len(folds) < len(wanted)):
            prefix = cv_metric[1]
            runs.append(Run(folds=wanted or tuple(sorted(folds)),
                            test_mean=float(cv[f"{prefix}_mean"]),
                            test_std=float(cv.get(f"{prefix}_std") or 0.0), **common))
        else:
            runs.append(Run(
                folds=tuple(sorted(folds)),
                test_per_fold=[float(folds[f][f"test/{metric}"]) for f in sorted(folds)],
                val_mean=float(np.mean(vals)) if vals and None not in vals else None,
                **common,
            ))
    return runs


def runs_from_wandb(path: str, group: str) -> list[Run]:
    """Runs of a W&B group as :class:`Run` s (see :func:`runs_from_wandb_records`)."""
    import wandb

    records = (
        (wr.id, wr.job_type, dict(wr.config), dict(wr.summary_metrics or {}))
        for wr in wandb.Api().runs(path, filters={"group": group})
    )
    return runs_from_wandb_records(path, records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_tables",
        description="Tables and plots from run-level results.json files (or a W&B group).",
    )
    parser.add_argument("paths", nargs="*", help="sweep/run directories or results.json files")
    parser.add_argument("--format", choices=("md", "latex", "csv"), default="md")
    parser.add_argument("--by", action="append", default=[],
                        help="config keys defining a setting, comma-separated (default: "
                             "the keys that differ between runs, seed excepted)")
    parser.add_argument("--plot", metavar="PNG",
                        help="also plot the test metric vs the first --by key")
    parser.add_argument("--reference", metavar="FILE",
                        help="YAML/JSON mapping setting values to paper numbers")
    parser.add_argument("--expect", action="append", default=[], metavar="KEY=V1,V2",
                        help="values the sweep should have; absent ones show as missing rows")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B")
    parser.add_argument("--group", help="W&B group (with --wandb)")
    parser.add_argument("--log-wandb", metavar="PROJECT",
                        help="also log the table and the plot to a W&B run in PROJECT "
                             "(job_type=table; offline without credentials, as training)")
    parser.add_argument("--name", default=None, help="W&B run name/group for --log-wandb")
    args = parser.parse_intermixed_args(argv)  # directories after options, too

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not args.paths and not args.wandb:
        return fail("give sweep directories (or --wandb ENTITY/PROJECT --group G)")
    if args.wandb and not args.group:
        return fail("--wandb needs --group")
    try:
        expected = parse_expect(args.expect)
        reference, reference_key = (
            load_reference(args.reference) if args.reference else (None, None)
        )
    except (OSError, ValueError) as err:
        return fail(str(err))

    runs = load_runs(args.paths) if args.paths else []
    if args.wandb:
        runs += runs_from_wandb(args.wandb, args.group)
    if not runs:
        where = ", ".join(args.paths) if args.paths else ""
        if args.wandb:
            where = ", ".join(filter(None, [where, f"W&B {args.wandb} group {args.group}"]))
        return fail(f"no run-level results.json found under: {where}")

    by = [k.strip() for item in args.by for k in item.split(",") if k.strip()] or None
    swept, multirun = swept_settings(args.paths, runs, by) if args.paths else ({}, None)
    swept = {k: v for k, v in swept.items() if k not in expected}
    try:
        rows = group_runs(runs, by=by, expected={**expected, **swept})
    except ValueError as err:
        return fail(str(err))

    keys = list(rows[0].key) if rows else []
    if reference is not None and reference_key and reference_key not in keys:
        log.warning("%s is keyed by %s, which is not a column here (columns: %s); "
                    "the paper column stays empty", args.reference, reference_key,
                    ", ".join(keys) or "none")
    sys.stdout.write(format_table(rows, args.format, reference=reference,
                                  reference_key=reference_key))

    for row in rows:
        if row.status == "missing":
            log.warning("%s: no run", row.label())
        elif row.status == "incomplete":
            log.warning("%s: incomplete (%s folds)", row.label(), row.folds_label)
        for note in row.notes:
            log.warning("%s: %s", row.label(), note)
    for msg in provenance_warnings(rows):
        log.warning("%s", msg)
    unfinished = [r for r in rows if r.status == "missing"] if swept else []
    if unfinished:
        log.warning("%s: %d job(s) of this sweep (%s) left no results (killed, failed, or "
                    "still running); the same command finishes them and reuses the others",
                    multirun, len(unfinished),
                    ", ".join(f"{k}={','.join(map(str, v))}" for k, v in swept.items()))

    plot_path = None
    if args.plot:
        if not keys:
            log.warning("--plot: all runs share one setting, nothing to plot against")
        else:
            plot_path = plot(rows, keys[0], args.plot)
            print(f"plot: {plot_path}", file=sys.stderr)
    if args.log_wandb:
        log_to_wandb(args.log_wandb, args.name, rows, plot_path, args.paths)
    return 0


def log_to_wandb(project, name, rows, plot_path, paths) -> None:
    """The table (as a W&B Table) and the plot (as an image) in one run of its own."""
    from src.training.wandb_logger import WandbLogger

    logger = WandbLogger(project=project, name=name and f"{name}-table", group=name,
                         job_type="table", dir=paths[0] if paths else None)
    if not logger.start():
        return
    try:
        import csv
        import io

        import wandb

        header, *data = list(csv.reader(io.StringIO(format_table(rows, "csv"))))
        logger.log({"table": wandb.Table(columns=header, data=data)})
    except Exception as err:  # noqa: BLE001  (a table must never fail the script)
        log.warning("could not log the table to W&B: %s", err)
    if plot_path is not None:
        logger.log_image("plot", str(plot_path))
    logger.finish(stream=sys.stderr)  # stdout is the table (experiments/sweep.sh: table.md)


if __name__ == "__main__":
    sys.exit(main())
