"""Tables from results.json files: src.evaluation.tables and scripts.make_tables."""

import csv
import io
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.make_tables import load_reference, parse_expect, runs_from_wandb_records
from src.evaluation.tables import (
    format_table,
    group_runs,
    load_runs,
    plot,
    provenance_warnings,
    varying_keys,
)

ROOT = Path(__file__).resolve().parents[1]

VERSIONS = {"python": "3.11.7", "tensorflow": "2.17.1", "keras": "3.15.1"}


def write_run(
    run_dir: Path,
    values,
    *,
    metric="accuracy",
    heads=1,
    seed=1,
    folds=None,
    val=None,
    paper=None,
    params=2700,
    commit="a" * 40,
    dirty=False,
    versions=None,
    train_time=10.0,
    train_clips_per_s=(100.0,),
    provenance_warnings=(),
    config=None,
):
    """A minimal valid run-level results.json (as src.train writes it) plus a fold-level one.

    ``values``: the test metric per fold (last epoch); ``val``: the validation metric
    per fold (default: each test value minus 0.05); ``paper``: the mean of AST's
    paper-protocol summary, if any.
    """
    folds = list(folds or range(1, len(values) + 1))
    vals = list(val if val is not None else [v - 0.05 for v in values])
    key = f"test_{metric}"
    per_fold = [
        {
            "fold": f,
            key: a,
            f"val_{metric}": v,
            "best_epoch": 2,
            f"best_val_{metric}": v + 0.01,
            "num_train": 40,
            "num_val": 5,
            "num_test": 10,
            "parameters": params,
            "train_time_s": train_time / len(values),
            "train_clips_per_s": train_clips_per_s[i % len(train_clips_per_s)],
            "eval_clips_per_s": 1000.0,
            "epochs": 3,
            "git": {"commit": commit, "dirty": dirty},
        }
        for i, (f, a, v) in enumerate(zip(folds, values, vals))
    ]

    def summary(xs, name):
        return {"metric": name, "mean": float(np.mean(xs)), "std": float(np.std(xs)),
                "per_fold": list(xs), "folds": folds}

    cv = {
        "folds": folds,
        "num_folds": len(folds),
        "primary_metric": metric,
        "last_epoch": summary(values, key),
        # another checkpoint's numbers: never what a table reads
        "best_val": summary([0.01] * len(values), f"test_best_val.{metric}"),
        "provenance": {"commits": [commit], "dirty_folds": folds if dirty else [],
                       "differing_versions": {},
                       "mixed": bool(provenance_warnings),
                       "warnings": list(provenance_warnings)},
    }
    if paper is not None:
        cv["paper_protocol_best_mean_epoch"] = {
            "metric": key, "epoch": 2, "mean": paper, "std": 0.0,
            "per_fold": [paper] * len(values), "note": "optimistic",
        }
    results = {
        "experiment": "ablate",
        "dataset": "quickstart",
        "label_type": "single" if metric == "accuracy" else "multi",
        "primary_metric": metric,
        key: cv["last_epoch"]["mean"],
        f"{key}_std": cv["last_epoch"]["std"],
        f"val_{metric}": float(np.mean(vals)),
        "cv": cv,
        "per_fold": per_fold,
        "history": {str(f): {"loss": [1.0, 0.5], f"val_{metric}": [0.4, 0.5]} for f in folds},
        "parameters": params,
        "epochs": 3,
        "train_time_s": train_time,
        "wall_time_s": train_time + 1,
        "config": config or {
            "name": "ablate",
            "seed": seed,
            "tags": ["quickstart"],
            # one sweep, one data set: the same data.root for every run of it
            "data": {"name": "quickstart", "folds": folds, "root": str(run_dir.parent / "data")},
            "model": {"name": "small", "embed_dim": 64, "num_heads": heads},
            "trainer": {"epochs": 3, "verbose": 0, "resume": True, "optimizer": {"lr": 0.001}},
            "logger": {"name": "none"},
            "paths": {"runs_dir": str(run_dir.parent), "cache_dir": ".cache"},
        },
        "git": {"commit": commit, "dirty": dirty},
        "versions": dict(versions or VERSIONS),
        "device": {"platform": "test", "cpu_count": 2, "gpus": []},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    # A fold-level file (no "cv" key) with a number that would show if it were read.
    fold_dir = run_dir / f"fold_{folds[0]}"
    fold_dir.mkdir(exist_ok=True)
    (fold_dir / "results.json").write_text(json.dumps({**per_fold[0], key: 0.0}))
    return run_dir / "results.json"


def write_old_run(run_dir: Path, accs, *, heads=1, seed=1, best=None):
    """A run-level results.json in the earlier layout: ``accuracy`` / ``accuracy_std`` at
    the top, ``cv.best_mean_epoch``, per-fold ``accuracy``, no validation metric."""
    folds = list(range(1, len(accs) + 1))
    cv = {"folds": folds, "num_folds": len(folds),
          "last_epoch": {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                         "per_fold": list(accs)}}
    if best is not None:
        cv["best_mean_epoch"] = {"epoch": 2, "mean": best, "std": 0.0,
                                 "per_fold": [best] * len(accs)}
    results = {
        "experiment": "ablate", "dataset": "quickstart",
        "accuracy": cv["last_epoch"]["mean"], "accuracy_std": cv["last_epoch"]["std"],
        "cv": cv,
        "per_fold": [{"fold": f, "accuracy": a, "parameters": 2700, "train_time_s": 1.0,
                      "train_clips_per_s": 50.0, "eval_clips_per_s": 500.0}
                     for f, a in zip(folds, accs)],
        "parameters": 2700, "train_time_s": 3.0,
        "config": {"seed": seed, "model": {"num_heads": heads}, "data": {"folds": folds}},
        "git": {"commit": "c" * 40, "dirty": False}, "versions": dict(VERSIONS),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir / "results.json"


# heads=1: folds [0.5, 0.6, 0.7] (seed 1) and [0.6, 0.7, 0.8] (seed 2)
# heads=2: folds [0.7, 0.8, 0.9] (seed 1) and [0.8, 0.8, 0.8] (seed 2)
# validation: each fold's test value minus 0.05 (row means 0.60 and 0.75)
H1 = [0.5, 0.6, 0.7, 0.6, 0.7, 0.8]
H2 = [0.7, 0.8, 0.9, 0.8, 0.8, 0.8]


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "runs" / "ablate" / "multirun" / "sweep"
    write_run(root / "heads1_seed1", [0.5, 0.6, 0.7], heads=1, seed=1, paper=0.66,
              train_time=10.0, train_clips_per_s=(100.0, 200.0, 300.0))
    write_run(root / "heads1_seed2", [0.6, 0.7, 0.8], heads=1, seed=2, paper=0.70,
              train_time=20.0, train_clips_per_s=(400.0,))
    write_run(root / "heads2_seed1", [0.7, 0.8, 0.9], heads=2, seed=1, paper=0.82, params=2800)
    write_run(root / "heads2_seed2", [0.8, 0.8, 0.8], heads=2, seed=2, paper=0.84, params=2800)
    return root


def audioset_config(run_dir: Path, *, stride=10, pretrained="deit_base_distilled_384",
                    adapt="auto", data="audioset_balanced", seed=1):
    return {
        "name": "audioset", "seed": seed,
        "data": {"name": data, "folds": [3], "root": str(run_dir.parent / "data")},
        "model": {"name": "ast_base384", "stride": stride, "pretrained": pretrained,
                  "pretrained_adapt": adapt},
        "trainer": {"epochs": 25},
        "paths": {"runs_dir": str(run_dir.parent)},
    }


@pytest.fixture
def map_sweep(tmp_path):
    """Multi-label runs (one fixed test split, fold 3): stride 10 with two seeds, stride 16."""
    root = tmp_path / "runs" / "audioset" / "sweep"
    for name, stride, seed, value, val in (("s10_seed1", 10, 1, 0.456, 0.401),
                                           ("s10_seed2", 10, 2, 0.462, 0.405),
                                           ("s16_seed1", 16, 1, 0.4404, 0.3901)):
        write_run(root / name, [value], metric="mAP", folds=[3], val=[val], params=87_000_000,
                  config=audioset_config(root / name, stride=stride, seed=seed))
    return root


def test_load_runs_skips_fold_level(sweep):
    runs = load_runs([sweep])
    assert len(runs) == 4
    assert all(Path(r.path).parent.parent == sweep for r in runs)
    r = next(r for r in runs if r.path.endswith("heads1_seed1/results.json"))
    assert r.metric == "accuracy"
    assert r.test_per_fold == [0.5, 0.6, 0.7] and r.folds == (1, 2, 3) and r.num_folds == 3
    assert r.test_mean == pytest.approx(0.6) and r.test_std == pytest.approx(np.std([.5, .6, .7]))
    assert r.val_mean == pytest.approx(0.55)
    assert r.config["model.num_heads"] == 1 and r.seed == 1
    assert r.parameters == 2700 and r.train_time_s == 10.0
    assert r.train_clips_per_s == pytest.approx(200.0)  # mean over folds
    assert r.eval_clips_per_s == pytest.approx(1000.0)
    assert r.paper_protocol == 0.66
    assert r.git_commit == "a" * 40 and r.git_dirty is False
    assert r.versions["tensorflow"] == "2.17.1"
    assert r.provenance == []
    # a results.json file given directly works too
    assert len(load_runs([r.path])) == 1


def test_old_schema_results_still_load(tmp_path):
    old = tmp_path / "old"
    write_old_run(old / "h1", [0.5, 0.7], heads=1, best=0.65)
    write_old_run(old / "h2", [0.8, 0.9], heads=2)
    runs = load_runs([old])
    assert len(runs) == 2
    h1 = next(r for r in runs if r.config["model.num_heads"] == 1)
    assert h1.metric == "accuracy" and h1.test_per_fold == [0.5, 0.7]
    assert h1.test_mean == pytest.approx(0.6) and h1.paper_protocol == 0.65
    assert h1.val_mean is None and h1.provenance == []
    rows = group_runs(runs)
    assert [r.test_mean for r in rows] == pytest.approx([0.6, 0.85])
    md = format_table(rows, "md")
    assert md.splitlines()[0].startswith("| model.num_heads | params | test accuracy (%) |")
    assert "val accuracy" not in md  # the old layout has no validation metric
    assert "| 1 | 2,700 | 60.0 ± 10.0 |" in md
    # the paper-protocol mean needs every run of the row: h2 has none
    assert rows[0].paper_protocol == 0.65 and rows[1].paper_protocol is None
    # old and new files tabulate together (both accuracy)
    write_run(old / "h3", [0.9, 0.9], heads=3)
    assert len(group_runs(load_runs([old]))) == 3


def test_grouping_detects_keys_and_pools_folds_and_seeds(sweep):
    runs = load_runs([sweep])
    assert varying_keys(runs) == ["model.num_heads"]  # seed, paths, data.root: not settings
    rows = group_runs(runs)
    assert [r.key for r in rows] == [{"model.num_heads": 1}, {"model.num_heads": 2}]
    h1, h2 = rows
    assert h1.metric == h2.metric == "accuracy"
    # pooled over (fold, seed): mean and population std (ddof=0) of the six test values
    assert h1.test_mean == pytest.approx(0.65)
    assert h1.test_std == pytest.approx(np.std(H1))
    assert h1.test_std == pytest.approx(np.sqrt(0.055 / 6))  # by hand: 0.0957
    assert h2.test_mean == pytest.approx(0.8)
    assert h2.test_std == pytest.approx(np.sqrt(0.02 / 6))  # 0.0577
    assert h1.val_mean == pytest.approx(0.60) and h2.val_mean == pytest.approx(0.75)
    assert h1.num_runs == 2 and h1.num_folds == 3 and h1.seeds == [1, 2]
    assert h1.parameters == 2700 and h2.parameters == 2800
    assert h1.train_time_s == pytest.approx(15.0)  # mean per run
    assert h1.train_clips_per_s == pytest.approx(300.0)  # mean of 200 and 400
    assert h1.paper_protocol == pytest.approx(0.68)  # mean of the runs' paper-protocol means
    assert h1.status == "" and h1.folds_label == "3"
    # explicit keys
    (one,) = group_runs(runs, by=[])
    assert one.num_runs == 4 and one.test_mean == pytest.approx(np.mean(H1 + H2))
    with pytest.raises(ValueError, match="model.num_heads"):
        group_runs(runs, by=["model.num_head"])


def test_formats(sweep):
    rows = group_runs(load_runs([sweep]))
    md = format_table(rows, "md")
    lines = md.strip().splitlines()
    assert lines[0] == ("| model.num_heads | params | test accuracy (%) | val accuracy (%) | "
                        "paper protocol (%)† | runs | folds | train time (s) | train clips/s |")
    assert "| 1 | 2,700 | 65.0 ± 9.6 | 60.0 | 68.0 | 2 | 3 |" in md
    assert "| 2 | 2,800 | 80.0 ± 5.8 | 75.0 | 83.0 | 2 | 3 |" in md

    tex = format_table(rows, "latex")
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"model.num\_heads" in tex and r"test accuracy (\%)" in tex
    assert r"val accuracy (\%)" in tex and r"paper protocol (\%)$^\dagger$" in tex
    assert r"1 & 2,700 & 65.0 $\pm$ 9.6 & 60.0 & 68.0 & 2 & 3" in tex

    table = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert [t["model.num_heads"] for t in table] == ["1", "2"]
    assert table[0]["test_accuracy"] == "65.0 ± 9.6" and table[0]["parameters"] == "2700"
    assert table[0]["val_accuracy"] == "60.0" and table[0]["paper_protocol_accuracy"] == "68.0"
    assert float(table[0]["test_accuracy_mean"]) == pytest.approx(0.65)
    assert float(table[1]["test_accuracy_std"]) == pytest.approx(np.std(H2))
    assert float(table[1]["val_accuracy_mean"]) == pytest.approx(0.75)
    assert float(table[0]["paper_protocol_accuracy_mean"]) == pytest.approx(0.68)
    assert table[0]["runs"] == "2" and table[0]["seeds"] == "1 2"
    assert "accuracy_mean" not in table[0]  # the old, unlabelled split

    with_ref = format_table(rows, "md", reference={1: "70.1 ± 1.0", 2: "81.2"})
    assert "| paper |" in with_ref.splitlines()[0]
    assert "70.1 ± 1.0" in with_ref and "81.2" in with_ref
    with pytest.raises(ValueError):
        format_table(rows, "html")


def test_paper_protocol_is_marked_optimistic(sweep, tmp_path):
    rows = group_runs(load_runs([sweep]))
    md = format_table(rows, "md")
    *table, blank, note = md.rstrip("\n").splitlines()
    assert "paper protocol (%)†" in table[0] and blank == ""
    assert note == "† AST's protocol: epoch chosen by the test folds' mean; optimistic."
    assert len(table) == 2 + len(rows)
    tex = format_table(rows, "latex")
    assert r"\multicolumn{9}{l}{\footnotesize $^\dagger$ AST's protocol" in tex
    assert "†" not in format_table(rows, "csv")  # CSV: the column's name says it
    # runs without the paper protocol: no column, no footnote
    plain = tmp_path / "plain"
    write_run(plain / "h1", [0.5, 0.6], heads=1)
    write_run(plain / "h2", [0.7, 0.8], heads=2)
    md = format_table(group_runs(load_runs([plain])), "md")
    assert "paper protocol" not in md and "†" not in md and "optimistic" not in md
    assert "| 1 | 2,700 | 55.0 ± 5.0 | 50.0 | 1 | 2 |" in md


def test_map_table(map_sweep):
    runs = load_runs([map_sweep])
    assert {r.metric for r in runs} == {"mAP"}
    rows = group_runs(runs)
    assert [r.key for r in rows] == [{"model.stride": 10}, {"model.stride": 16}]
    s10, s16 = rows
    assert s10.test_mean == pytest.approx(0.459) and s10.test_std == pytest.approx(0.003)
    assert s10.val_mean == pytest.approx(0.403)
    md = format_table(rows, "md")
    header = md.splitlines()[0]
    assert header.startswith("| model.stride | params | test mAP | val mAP | runs | folds |")
    assert "(%)" not in header and "accuracy" not in md
    assert "| 10 | 87,000,000 | .459 ± .003 | .403 | 2 | 1 |" in md
    assert "| 16 | 87,000,000 | .440 | .390 | 1 | 1 |" in md  # one value: no spread
    assert r".459 $\pm$ .003" in format_table(rows, "latex")
    (t10, t16) = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert t10["test_mAP"] == ".459 ± .003" and t10["val_mAP"] == ".403"
    assert float(t10["test_mAP_mean"]) == pytest.approx(0.459)
    assert float(t10["test_mAP_std"]) == pytest.approx(0.003)
    assert float(t16["val_mAP_mean"]) == pytest.approx(0.3901)
    assert t16["test_mAP"] == ".440" and t16["test_mAP_std"] == ""
    assert "test_accuracy_mean" not in t10
    # the AST Table 5 numbers beside ours
    ref, key = load_reference(ROOT / "references" / "ast_table5.yaml")
    md = format_table(rows, "md", reference=ref, reference_key=key)
    assert "| .459 ± .003 | .403 | 2 | 1 |" in md and "0.347 / 0.459 mAP" in md
    assert "0.336 / 0.451 mAP" in md


def test_mixed_metrics_are_refused(sweep, map_sweep, tmp_path):
    runs = load_runs([sweep, map_sweep])
    with pytest.raises(ValueError, match=r"mix primary metrics \(accuracy: 4 run\(s\).*mAP: 3"):
        group_runs(runs)
    # one setting mixing them (grouped by nothing) is refused the same way
    with pytest.raises(ValueError, match="mix primary metrics"):
        group_runs(runs, by=[])
    # rows built apart cannot be rendered (or plotted) together either
    rows = group_runs(load_runs([sweep])) + group_runs(load_runs([map_sweep]))
    with pytest.raises(ValueError, match="mix primary metrics"):
        format_table(rows, "md")
    with pytest.raises(ValueError, match="mix primary metrics"):
        plot(rows, "model.num_heads", tmp_path / "mixed.png")
    out = make_tables(sweep, map_sweep)
    assert out.returncode == 2 and out.stdout == ""
    assert "mix primary metrics" in out.stderr and "separately" in out.stderr


def test_reference_files():
    ref, key = load_reference(ROOT / "references" / "ast_table5.yaml")
    assert key == "model.stride" and set(ref) == {16, 14, 12, 10}
    assert "0.336" in ref[16] and "0.459" in ref[10]
    ref, key = load_reference(ROOT / "references" / "ast_table7.yaml")
    assert key == "model.pretrained"
    assert ref == {"deit_base_distilled_384": "88.7 ± 0.7 (AST-S)",
                   "ast_audioset": "95.6 ± 0.4 (AST-P)"}
    ref, key = load_reference(ROOT / "references" / "ast_table1.yaml")
    assert key == "data.name"
    assert ref["audioset_balanced"].startswith("0.347")
    assert ref["audioset_full"].startswith("0.459") and "0.485" in ref["audioset_full"]
    ref, key = load_reference(ROOT / "references" / "ast_table2.yaml")
    assert key == "model.pretrained" and set(ref) == {None, "deit_base_distilled_384"}
    assert ref[None].startswith("0.148 / 0.366")
    ref, key = load_reference(ROOT / "references" / "ast_table4.yaml")
    assert key == "model.pretrained_adapt"
    assert ref["auto"].startswith("0.347") and ref["reinitialize"].startswith("0.305")


def test_reference_matches_unset_pretraining(tmp_path):
    """AST Table 2 beside an AudioSet pair: from scratch (model.pretrained unset) and
    from ImageNet weights; Table 4 beside the adaptation methods."""
    root = tmp_path / "t2"
    for name, pretrained, adapt, value in (("scratch", None, "auto", 0.15),
                                           ("imagenet", "deit_base_distilled_384", "auto", .34),
                                           ("bilinear", "deit_base_distilled_384", "bilinear",
                                            .33)):
        write_run(root / name, [value], metric="mAP", folds=[3],
                  config=audioset_config(root / name, pretrained=pretrained, adapt=adapt))
    runs = load_runs([root])
    rows = group_runs([r for r in runs if r.config["model.pretrained_adapt"] == "auto"],
                      by=["model.pretrained"])
    ref, key = load_reference(ROOT / "references" / "ast_table2.yaml")
    (imagenet, scratch) = list(csv.DictReader(io.StringIO(  # unset sorts last
        format_table(rows, "csv", reference=ref, reference_key=key))))
    assert scratch["model.pretrained"] == "—" and scratch["paper"].startswith("0.148 / 0.366")
    assert imagenet["paper"].startswith("0.347 / 0.459")
    # a plain mapping (no key) never matches an unset value
    md = format_table(rows, "md", reference={None: "x", "deit_base_distilled_384": "y"})
    assert "| x |" not in md and "| y |" in md

    rows = group_runs([r for r in runs if r.config["model.pretrained"]],
                      by=["model.pretrained_adapt"],
                      expected={"model.pretrained_adapt": ["auto", "bilinear", "reinitialize"]})
    ref, key = load_reference(ROOT / "references" / "ast_table4.yaml")
    table = list(csv.DictReader(io.StringIO(
        format_table(rows, "csv", reference=ref, reference_key=key))))
    paper = {t["model.pretrained_adapt"]: t["paper"] for t in table}
    assert paper["auto"].startswith("0.347") and paper["bilinear"] == ""
    assert paper["reinitialize"].startswith("0.305")
    assert {t["model.pretrained_adapt"]: t["status"] for t in table}["reinitialize"] == "missing"


def test_incomplete_group_is_marked(sweep):
    write_run(sweep / "heads4_seed1", [0.7, 0.7], heads=4, folds=[1, 2], paper=0.7)
    rows = group_runs(load_runs([sweep]))
    h4 = rows[-1]
    assert h4.key == {"model.num_heads": 4}
    assert h4.status == "incomplete" and h4.folds_label == "2/3" and h4.num_folds == 2
    assert all(r.status == "" for r in rows[:-1])
    md = format_table(rows, "md")
    assert "incomplete (2/3 folds)" in md and "| 2/3 |" in md


def data_config(run_dir: Path, *, name="esc50", root="/data/ESC-50-master", folds=(1, 2, 3, 4, 5),
                heads=1, seed=1, logger="none"):
    """A run's config as src.train writes it (resolved), on data set ``name`` at ``root``."""
    return {
        "name": "ablate", "seed": seed, "tags": [name],
        "data": {"name": name, "folds": list(folds), "root": str(root)},
        "model": {"name": "small", "num_heads": heads},
        "trainer": {"epochs": 3, "verbose": 0},
        "logger": {"name": logger},
        "paths": {"runs_dir": str(run_dir.parent)},
    }


ESC50 = [0.5, 0.6, 0.5, 0.6, 0.5]


def test_rows_pooling_runs_on_different_data_roots_are_noted(tmp_path):
    """data.root is not a setting (one data set, another machine's path), so runs on
    four roots pool into one row; the row says so, with the --by that splits it."""
    root = tmp_path / "esc50"
    for i, path in enumerate(["/a/ESC-50-master", "/b/ESC-50-master", "/c/ESC-50-master",
                              "/d/ESC-50-master"]):
        write_run(root / f"run{i}", ESC50, config=data_config(root / f"run{i}", root=path))
    runs = load_runs([root])
    assert varying_keys(runs) == []
    (row,) = group_runs(runs)
    assert row.num_runs == 4 and row.key == {}
    (note,) = row.notes
    assert note.startswith("runs differ in data.root: /a/ESC-50-master (1 run), "
                           "/b/ESC-50-master (1 run), /c/ESC-50-master (1 run), "
                           "/d/ESC-50-master (1 run); fine if these are copies"), note
    assert note.endswith("else split them with --by data.root"), note
    # split as the note says: one row per root, nothing to note
    rows = group_runs(runs, by=["data.root"])
    assert len(rows) == 4 and all(r.notes == [] for r in rows)
    out = make_tables(root)
    assert out.returncode == 0, out.stderr
    assert "| 4 | 5 |" in out.stdout  # still one row of 4 runs: the table is unchanged
    assert ("warning: all runs: runs differ in data.root: /a/ESC-50-master (1 run)"
            in out.stderr)
    assert "--by data.root" in out.stderr
    out = make_tables(root, "--by", "data.root")
    assert out.returncode == 0 and "data.root" not in out.stderr, out.stderr

    # with setting keys, the --by to split keeps them; two runs per root are counted
    sweep = tmp_path / "heads"
    for heads, seed, path in itertools.product((1, 2), (1, 2), ("/a/esc", "/b/esc")):
        name = f"h{heads}_s{seed}_{path[1]}"
        write_run(sweep / name, ESC50, config=data_config(sweep / name, root=path,
                                                          heads=heads, seed=seed))
    rows = group_runs(load_runs([sweep]))
    assert [r.key for r in rows] == [{"model.num_heads": 1}, {"model.num_heads": 2}]
    for r in rows:
        (note,) = r.notes
        assert note.startswith("runs differ in data.root: /a/esc (2 runs), /b/esc (2 runs);")
        assert note.endswith("--by model.num_heads,data.root"), note


def test_pooling_seeds_and_logger_settings_is_not_noted(tmp_path):
    """Seeds are repeats and the logger is no part of the data: pooled without a note;
    so are runs on one root."""
    root = tmp_path / "esc50"
    for seed, logger in ((1, "none"), (2, "wandb"), (3, "csv")):
        write_run(root / f"seed{seed}", ESC50,
                  config=data_config(root / f"seed{seed}", seed=seed, logger=logger))
    (row,) = group_runs(load_runs([root]))
    assert row.num_runs == 3 and row.seeds == [1, 2, 3] and row.notes == []
    out = make_tables(root)
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr


def test_rows_pooling_data_sets_under_an_explicit_by_are_noted(tmp_path):
    root = tmp_path / "mixed"
    write_run(root / "esc", ESC50, config=data_config(root / "esc"))
    write_run(root / "qs", [0.9], folds=[5],
              config=data_config(root / "qs", name="quickstart", root="/cache/qs", folds=[5]))
    (row,) = group_runs(load_runs([root]), by=["model.num_heads"])
    notes = "\n".join(row.notes)
    assert ("runs differ in data.name: esc50 (1 run), quickstart (1 run); different data sets"
            in notes), notes
    assert "--by model.num_heads,data.name" in notes and "data.root" in notes


def test_folds_are_judged_per_data_set(tmp_path):
    """A one-fold quickstart run beside five-fold ESC-50 runs: each is complete on its
    own data set; a run lacking folds its data set's peers have is still incomplete."""
    root = tmp_path / "runs"
    for heads in (1, 2):
        write_run(root / f"esc_h{heads}", ESC50,
                  config=data_config(root / f"esc_h{heads}", heads=heads))
    write_run(root / "quickstart", [0.958], folds=[5],
              config=data_config(root / "quickstart", name="quickstart", root="/cache/qs",
                                 folds=[5]))
    rows = group_runs(load_runs([root]))
    assert [(r.key["data.name"], r.key["model.num_heads"]) for r in rows] == [
        ("esc50", 1), ("esc50", 2), ("quickstart", 1)]
    assert [(r.status, r.folds_label) for r in rows] == [("", "5"), ("", "5"), ("", "1")]
    md = format_table(rows, "md")
    assert "incomplete" not in md and "status" not in md
    out = make_tables(root)
    assert out.returncode == 0 and "incomplete" not in out.stderr, out.stderr

    # same data set, fewer folds: incomplete, judged against its own data set only
    write_run(root / "esc_h4", [0.5, 0.6], folds=[1, 2],
              config=data_config(root / "esc_h4", heads=4, folds=[1, 2]))
    write_run(root / "quickstart_cv", [0.9, 0.9, 0.9, 0.9, 0.9, 0.9], folds=[1, 2, 3, 4, 5, 6],
              config=data_config(root / "quickstart_cv", name="quickstart", root="/cache/qs",
                                 heads=2, folds=[1, 2, 3, 4, 5, 6]))
    rows = {(r.key["data.name"], r.key["model.num_heads"]): r
            for r in group_runs(load_runs([root]))}
    assert (rows["esc50", 4].status, rows["esc50", 4].folds_label) == ("incomplete", "2/5")
    assert (rows["esc50", 1].status, rows["esc50", 2].status) == ("", "")
    assert (rows["quickstart", 1].status, rows["quickstart", 1].folds_label) == (
        "incomplete", "1/6")
    assert rows["quickstart", 2].status == ""
    out = make_tables(root)
    assert "data.name=esc50, model.num_heads=4: incomplete (2/5 folds)" in out.stderr
    assert "data.name=quickstart, model.num_heads=1: incomplete (1/6 folds)" in out.stderr
    assert out.stderr.count("incomplete") == 2, out.stderr


def test_folder_data_sets_are_told_apart_by_their_folder(tmp_path):
    """Every data=folder run has data.name=folder: the tables name each set after its
    folder, so two sets make two rows judged on their own folds, and one folder at two
    paths (another machine) is still one set."""
    root = tmp_path / "runs"

    def folder_run(name, path, folds, values, **extra):
        config = data_config(root / name, name="folder", root=path, folds=folds, **extra)
        config["data"]["format"] = "folder"
        write_run(root / name, values, folds=list(folds), config=config)

    folder_run("birds", "/data/birds", (1, 2, 3), [0.5, 0.6, 0.7])
    folder_run("birds_b", "/mnt/copy/birds", (1, 2, 3), [0.6, 0.6, 0.6], seed=2)
    folder_run("cars", "/data/cars", (1,), [0.9])
    rows = group_runs(load_runs([root]))
    assert [(r.key["data.name"], r.num_runs, r.status, r.folds_label) for r in rows] == [
        ("folder:birds", 2, "", "3"), ("folder:cars", 1, "", "1")]
    assert rows[0].notes and "data.root" in rows[0].notes[0]  # two paths: still noted
    # a name the user gave is kept
    folder_run("named", "/data/cars2", (1,), [0.8])
    named = json.loads((root / "named" / "results.json").read_text())
    named["config"]["data"]["name"] = "my_cars"
    (root / "named" / "results.json").write_text(json.dumps(named))
    names = sorted(r.key["data.name"] for r in group_runs(load_runs([root])))
    assert names == ["folder:birds", "folder:cars", "my_cars"]


def test_a_single_value_shows_no_spread(tmp_path):
    """One run of one fold: the mean alone (runs and folds say n=1), an empty std in the
    CSV; rows of two values (two folds, or two seeds of one fold) keep theirs."""
    root = tmp_path / "runs"
    write_run(root / "one", [0.958], folds=[5], heads=1)
    write_run(root / "seed1", [0.7], folds=[5], heads=4, seed=1)
    write_run(root / "seed2", [0.8], folds=[5], heads=4, seed=2)
    other = tmp_path / "other"  # another sweep: two folds
    write_run(other / "folds", [0.9, 0.8], folds=[4, 5], heads=2,
              config=data_config(other / "folds", name="esc10", heads=2, folds=[4, 5]))
    rows = group_runs(load_runs([root, other]), by=["model.num_heads"])
    assert [r.test_std for r in rows] == [None, pytest.approx(0.05), pytest.approx(0.05)]
    assert rows[0].test_mean == pytest.approx(0.958)
    md = format_table(rows, "md")
    assert "| 1 | 2,700 | 95.8 | 90.8 | 1 | 1 |" in md, md
    assert "| 2 | 2,700 | 85.0 ± 5.0 | 80.0 | 1 | 2 |" in md
    assert "| 4 | 2,700 | 75.0 ± 5.0 | 70.0 | 2 | 1 |" in md
    assert "± 0.0" not in md and "incomplete" not in md
    tex = format_table(rows, "latex")
    assert r"1 & 2,700 & 95.8 & 90.8 & 1 & 1" in tex and r"85.0 $\pm$ 5.0" in tex
    text = format_table(rows, "csv")
    header, *lines = list(csv.reader(io.StringIO(text)))
    assert all(len(line) == len(header) for line in lines)
    table = list(csv.DictReader(io.StringIO(text)))
    assert table[0]["test_accuracy"] == "95.8" and table[0]["test_accuracy_std"] == ""
    assert float(table[0]["test_accuracy_mean"]) == pytest.approx(0.958)
    assert float(table[1]["test_accuracy_std"]) == pytest.approx(0.05)
    # the plot draws the single value without an error bar
    assert plot(rows, "model.num_heads", tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    out = make_tables(root, "--by", "model.num_heads", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert list(csv.DictReader(io.StringIO(out.stdout)))[0]["test_accuracy_std"] == ""


def test_expected_values_show_missing_rows(sweep):
    assert parse_expect(["model.num_heads=1,2,8"]) == {"model.num_heads": [1, 2, 8]}
    rows = group_runs(load_runs([sweep]), expected={"model.num_heads": [1, 2, 8]})
    assert [r.key["model.num_heads"] for r in rows] == [1, 2, 8]
    assert rows[2].status == "missing" and rows[2].runs == []
    md = format_table(rows, "md")
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert "| 8 |" in md and "missing" in table_lines[-1]
    # an expected key that does not vary between the runs still becomes a column
    (only,) = group_runs(load_runs([sweep / "heads1_seed1"]), expected={"model.num_heads": [1]})
    assert only.key == {"model.num_heads": 1} and only.status == ""


def test_provenance_warnings(sweep):
    assert provenance_warnings(group_runs(load_runs([sweep]))) == []
    write_run(sweep / "heads1_seed3", [0.6, 0.6, 0.6], heads=1, seed=3, paper=0.6,
              commit="b" * 40, dirty=True, versions={**VERSIONS, "tensorflow": "2.16.2"})
    warnings = provenance_warnings(group_runs(load_runs([sweep])))
    text = "\n".join(warnings)
    assert "model.num_heads=1: runs from 2 git commits (aaaaaaa, bbbbbbb)" in text
    assert "dirty" in text and "tensorflow 2.16.2/2.17.1" in text
    assert not any(w.startswith("model.num_heads=2") for w in warnings)


def test_provenance_warning_of_a_run_whose_folds_mix_commits(sweep):
    """One run, one run-level commit, but its folds were trained by two commits: the
    row-level checks cannot see it; the run's cv.provenance says so."""
    mixed = ("the folds were trained by 2 different commits: aaaaaaaaaa, dddddddddd")
    write_run(sweep / "heads2_seed2", [0.8, 0.8, 0.8], heads=2, seed=2, paper=0.84,
              params=2800, provenance_warnings=[mixed])
    (run,) = [r for r in load_runs([sweep]) if r.path.endswith("heads2_seed2/results.json")]
    assert run.provenance == [mixed]
    warnings = provenance_warnings(group_runs(load_runs([sweep])))
    assert warnings == [f"model.num_heads=2: run {sweep / 'heads2_seed2'}: {mixed}"]
    out = make_tables(sweep)
    assert out.returncode == 0 and mixed in out.stderr


def test_a_rerun_that_skipped_its_folds_keeps_the_commit_that_trained_them(sweep):
    """Running a finished sweep again rewrites each run's own git and versions (the run
    summary is written anew); the table reads what trained the folds."""
    path = sweep / "heads1_seed3"
    write_run(path, [0.6, 0.6, 0.6], heads=1, seed=3, commit="b" * 40)
    data = json.loads((path / "results.json").read_text())
    data["git"] = {"commit": "c" * 40, "dirty": True}  # the rerun's, not the folds'
    data["versions"] = {**VERSIONS, "tensorflow": "9.9.9"}
    data["per_fold"][0]["versions"] = dict(VERSIONS)
    (path / "results.json").write_text(json.dumps(data))
    (run,) = [r for r in load_runs([sweep]) if r.path.endswith("heads1_seed3/results.json")]
    assert run.git_commit == "b" * 40 and run.git_dirty is False
    assert run.versions == VERSIONS
    text = "\n".join(provenance_warnings(group_runs(load_runs([sweep]))))
    assert "model.num_heads=1: runs from 2 git commits (aaaaaaa, bbbbbbb)" in text
    assert "dirty" not in text and "9.9.9" not in text


def test_run_invariant_keys_define_no_setting(tmp_path):
    """Keys a run's config calls run-invariant (how it resumes, what it may skip), and
    that list itself, which grows between versions, split no rows."""
    for i, (listed, exact) in enumerate(((["data.folds"], "auto"),
                                         (["data.folds", "trainer.exact_resume"], "true"))):
        run_dir = tmp_path / f"run{i}"
        write_run(run_dir, [0.7, 0.8], seed=i)
        data = json.loads((run_dir / "results.json").read_text())
        data["config"]["run_invariant_keys"] = listed
        data["config"]["trainer"]["exact_resume"] = exact
        (run_dir / "results.json").write_text(json.dumps(data))
    (row,) = group_runs(load_runs([tmp_path]))
    assert len(row.runs) == 2 and row.key == {}


def test_summary_from_cv_aggregate_loads_with_its_provenance(tmp_path):
    """The cv section as src.evaluation.cv writes it, from fold files of two commits."""
    from src.evaluation.cv import aggregate

    run_dir = tmp_path / "run"
    for fold, commit, value in ((1, "e" * 40, 0.5), (2, "f" * 40, 0.7)):
        (run_dir / f"fold_{fold}").mkdir(parents=True)
        (run_dir / f"fold_{fold}" / "results.json").write_text(json.dumps({
            "fold": fold, "test_mAP": value, "val_mAP": value - 0.1,
            "git": {"commit": commit, "dirty": False}, "versions": VERSIONS,
        }))
    summary, folds = aggregate(run_dir, "mAP")
    (run_dir / "results.json").write_text(json.dumps({
        "primary_metric": "mAP", "test_mAP": summary["last_epoch"]["mean"],
        "val_mAP": float(np.mean([f["val_mAP"] for f in folds])), "cv": summary,
        "per_fold": folds, "config": {"model": {"num_heads": 2}},
        "git": {"commit": "f" * 40, "dirty": False},
    }))
    (run,) = load_runs([run_dir])
    assert run.metric == "mAP" and run.test_per_fold == [0.5, 0.7] and run.folds == (1, 2)
    assert run.val_mean == pytest.approx(0.5)
    (warning,) = provenance_warnings(group_runs([run]))
    assert warning.startswith(f"all runs: run {run_dir}: ")
    assert "2 different commits" in warning and "eeeeeee" in warning


def test_runs_from_wandb_summaries():
    """W&B summaries as src.train logs them (fold runs: test/<metric>, val_<metric>;
    cv_summary: cv/test_<metric>_mean/_std) and as earlier versions did."""
    cfg = {"seed": 1, "data": {"folds": [1, 2]}, "model": {"num_heads": 2}}
    cfg3 = {"seed": 1, "data": {"folds": [1, 2, 3]}, "model": {"num_heads": 4}}
    old = {"seed": 1, "data": {"folds": [1, 2]}, "model": {"num_heads": 8}}
    tag = {"seed": 1, "data": {"folds": [3], "name": "audioset_balanced"},
           "model": {"num_heads": 12}}
    records = [
        ("a1", "fold1", cfg, {"test/accuracy": 0.5, "val_accuracy": 0.4, "parameters": 10,
                              "train_time_s": 2.0}),
        ("a2", "fold2", cfg, {"test/accuracy": 0.7, "val_accuracy": 0.6, "parameters": 10,
                              "train_time_s": 3.0}),
        ("a3", "cv_summary", cfg, {"cv/test_accuracy_mean": 0.6, "cv/test_accuracy_std": 0.1,
                                   "cv/paper_protocol_test_accuracy_mean": 0.65}),
        # fold 3 never finished: the cv_summary gives the numbers
        ("b1", "fold1", cfg3, {"test/accuracy": 0.5}),
        ("b2", "cv_summary", cfg3, {"cv/test_accuracy_mean": 0.55,
                                    "cv/test_accuracy_std": 0.05}),
        ("c1", "cv_summary", old, {"cv/accuracy_mean": 0.9, "cv/accuracy_std": 0.02,
                                   "cv/best_epoch_accuracy_mean": 0.93}),
        ("d1", "fold3", tag, {"test/mAP": 0.41, "test/mean_auc": 0.96, "val_mAP": 0.38,
                              "test/primary": 0.41}),
    ]
    runs = {r.config["model.num_heads"]: r for r in runs_from_wandb_records("e/p", records)}
    assert set(runs) == {2, 4, 8, 12}
    r = runs[2]
    assert r.metric == "accuracy" and r.test_per_fold == [0.5, 0.7] and r.folds == (1, 2)
    assert r.val_mean == pytest.approx(0.5) and r.paper_protocol == 0.65
    assert r.parameters == 10 and r.train_time_s == 5.0
    assert runs[4].test_mean == 0.55 and runs[4].test_std == 0.05
    assert runs[4].folds == (1, 2, 3) and runs[4].test_per_fold == []
    assert runs[8].metric == "accuracy" and runs[8].test_mean == 0.9
    assert runs[8].paper_protocol == 0.93
    t = runs[12]
    assert t.metric == "mAP" and t.test_per_fold == [0.41] and t.val_mean == 0.38
    (row,) = group_runs([t])
    assert row.test_std is None and "| .410 | .380 |" in format_table([row], "md")
    with pytest.raises(ValueError, match="mix primary metrics"):
        group_runs(list(runs.values()))


def test_a_cross_validation_split_over_commands_is_one_wandb_run():
    """Folds 1-2 from one command and fold 3 from another (data.folds differs, and the
    run-invariant list of a newer version too): one run of 3 folds; another seed stays
    another run."""
    def cfg(folds, seed=1, invariant=("data.folds",)):
        return {"seed": seed, "data": {"folds": folds, "name": "esc50"},
                "model": {"num_heads": 2}, "trainer": {"verbose": 0},
                "run_invariant_keys": list(invariant)}

    records = [
        ("a1", "fold1", cfg([1, 2]), {"test/accuracy": 0.5}),
        ("a2", "fold2", cfg([1, 2]), {"test/accuracy": 0.7}),
        ("a3", "cv_summary", cfg([1, 2]), {"cv/test_accuracy_mean": 0.6}),
        ("b1", "fold3", cfg([3], invariant=("data.folds", "trainer.exact_resume")),
         {"test/accuracy": 0.9}),
        ("c1", "fold1", cfg([1], seed=2), {"test/accuracy": 0.4}),
    ]
    runs = sorted(runs_from_wandb_records("e/p", records), key=lambda r: r.seed)
    assert [(r.seed, r.folds, r.test_per_fold) for r in runs] == [
        (1, (1, 2, 3), [0.5, 0.7, 0.9]), (2, (1,), [0.4])]
    assert runs[0].config["data.folds"] == [1, 2, 3]


def _svg_text(path) -> str:
    return Path(path).read_text()


def test_plot_writes_png(sweep, map_sweep, tmp_path):
    import matplotlib

    rows = group_runs(load_runs([sweep]), expected={"model.num_heads": [1, 2, 4]})
    out = plot(rows, "model.num_heads", tmp_path / "plots" / "heads.png", title="heads")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # the axes say which metric, on which split (SVG with text kept as text)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        acc = _svg_text(plot(rows, "model.num_heads", tmp_path / "acc.svg"))
        tag = _svg_text(plot(group_runs(load_runs([map_sweep])), "model.stride",
                             tmp_path / "map.svg"))
    assert "test accuracy (%), mean ± std" in acc and "test accuracy vs model.num_heads" in acc
    assert "test mAP, mean ± std" in tag and "test mAP vs model.stride" in tag
    assert "(%)" not in tag
    # non-numeric values: categorical axis
    for r in rows:
        r.key["model.num_heads"] = f"h{r.key['model.num_heads']}"
    assert plot(rows, "model.num_heads", tmp_path / "cat.png").read_bytes()[:4] == b"\x89PNG"


def test_unreadable_and_partial_files_are_skipped(sweep, caplog):
    bad = sweep / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"cv": {"folds": [1, 2')  # cut off mid-write
    partial = sweep / "partial" / "results.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"cv": {"folds": [1]}, "config": {}}))  # no last_epoch
    (sweep / "unfinished" / "fold_1").mkdir(parents=True)
    (sweep / "unfinished" / "fold_1" / "results.json").write_text("{}")
    earlier = sweep / "heads1_seed1" / "previous" / "2026-01-01_00-00-00"
    write_run(earlier, [0.1, 0.1, 0.1], heads=1)  # moved aside by trainer.resume=false
    with caplog.at_level(logging.WARNING, logger="src.evaluation.tables"):
        runs = load_runs([sweep, sweep / "nope"])
    assert len(runs) == 4
    text = caplog.text
    assert "broken/results.json" in text and "cannot read" in text
    assert "partial/results.json" in text and "incomplete results" in text
    assert "unfinished: 1 finished fold(s)" in text
    assert "nope does not exist" in text


def make_tables(*args, timeout=120):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "scripts.make_tables", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_cli(sweep, tmp_path):
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text("not json")
    out = make_tables(sweep, "--expect", "model.num_heads=1,2,16", "--plot", tmp_path / "p.png")
    assert out.returncode == 0, out.stderr
    assert "| 1 | 2,700 | 65.0 ± 9.6 | 60.0 | 68.0 |" in out.stdout
    assert out.stdout.rstrip().endswith("epoch chosen by the test folds' mean; optimistic.")
    assert "| 16 |" in out.stdout and "missing" in out.stdout
    assert "broken/results.json" in out.stderr and "model.num_heads=16: no run" in out.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    out = make_tables(sweep, "--format", "latex", "--by", "model.num_heads")
    assert out.returncode == 0 and r"65.0 $\pm$ 9.6" in out.stdout

    ref = tmp_path / "ref.yaml"
    ref.write_text("key: model.num_heads\nvalues:\n  1: '70.0'\n  2: '81.0'\n")
    out = make_tables(sweep, "--format", "csv", "--reference", ref)
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [t["paper"] for t in table] == ["70.0", "81.0"]
    assert float(table[0]["test_accuracy_mean"]) == pytest.approx(0.65)

    out = make_tables(sweep, "--by", "model.num_head")
    assert out.returncode == 2 and "did you mean model.num_heads" in out.stderr


def _multirun_yaml(sweep_dir: Path, *task, sweeper="hydra._internal.core_plugins."
                   "basic_sweeper.BasicSweeper"):
    """The part of Hydra's ``multirun.yaml`` that the tables read."""
    import yaml

    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": list(task)}, "sweeper": {"_target_": sweeper}}}))


def test_a_sweeps_jobs_without_results_are_missing_rows(sweep):
    """A sweep killed (or failed) before its last job: the values its command swept,
    read from multirun.yaml, are expected; seeds are repeats, not settings."""
    task = ["experiment=quickstart", "model.num_heads=1,2,4", "seed=1,2",
            "hydra.sweep.dir=somewhere", "model.ff_dim=interval(8,64)"]
    _multirun_yaml(sweep, *task)
    out = make_tables(sweep)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("| 4 |")]
    assert len(lines) == 1 and "missing" in lines[0], out.stdout
    assert "seed" not in out.stdout.splitlines()[0]
    assert "1 job(s) of this sweep (model.num_heads=1,2,4) left no results" in out.stderr
    assert str(sweep / "multirun.yaml") in out.stderr
    # an explicit --expect wins; --by keeps its own keys
    out = make_tables(sweep, "--expect", "model.num_heads=1,2")
    assert "| 4 |" not in out.stdout and "left no results" not in out.stderr
    out = make_tables(sweep, "--by", "model.name", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert [r["model.name"] for r in csv.DictReader(io.StringIO(out.stdout))] == ["small"]
    # Optuna samples its space: nothing is expected from its sweep
    _multirun_yaml(sweep, *task, sweeper="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                   "OptunaSweeper")
    assert "| 4 |" not in make_tables(sweep).stdout
    # two sweeps given together: no expectation from either
    _multirun_yaml(sweep, *task)
    other = sweep.parent / "other"
    write_run(other / "heads8", [0.5], heads=8)
    _multirun_yaml(other, "model.num_heads=8,16")
    out = make_tables(sweep, other)
    assert out.returncode == 0 and "| 4 |" not in out.stdout and "| 16 |" not in out.stdout


def test_multirun_sweeps_reads_hydras_sweep_syntax(tmp_path):
    from scripts.make_tables import multirun_sweeps

    _multirun_yaml(tmp_path, "a.b=1,2", "c=range(0,6,2)", "d=choice(x,y)", "e=3",
                   "f=interval(0,1)", "+g.h=0.5,1e-3", "hydra.job.name=x,y")
    assert multirun_sweeps(tmp_path / "multirun.yaml") == {
        "a.b": [1, 2], "c": [0, 2, 4], "d": ["x", "y"], "g.h": [0.5, 0.001]}
    (tmp_path / "multirun.yaml").write_text("hydra: [not, a, mapping")
    assert multirun_sweeps(tmp_path / "multirun.yaml") == {}


def test_cli_options_between_directories(sweep):
    """Directories after an option (``A --format csv B``) are directories too."""
    out = make_tables(sweep / "heads1_seed1", "--format", "csv", sweep / "heads2_seed1",
                      "--by", "model.num_heads", sweep / "heads2_seed2")
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(t["model.num_heads"], t["runs"]) for t in table] == [("1", "1"), ("2", "2")]
    assert table[1]["seeds"] == "1 2"


def test_cli_no_results_exits_2(tmp_path):
    empty = tmp_path / "empty_sweep"
    empty.mkdir()
    out = make_tables(empty, tmp_path / "absent")
    assert out.returncode == 2
    assert "no run-level results.json" in out.stderr
    assert str(empty) in out.stderr and str(tmp_path / "absent") in out.stderr
    assert out.stdout == ""


def test_real_sweep_end_to_end(tmp_path):
    env = dict(
        os.environ,
        AUDIO_RUNS_DIR=str(tmp_path / "runs"),
        AUDIO_CACHE_DIR=str(tmp_path / "cache"),
        AUDIO_DATA_DIR=str(tmp_path / "data"),
        WANDB_MODE="disabled",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    train = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "experiment=quickstart", "model.num_heads=1,2",
         "data.generate.clips_per_class=5", "data.generate.duration=1.0",
         "data.clip_seconds=1.0", "frontend.n_mels=32", "model.embed_dim=16",
         "model.ff_dim=32", "model.num_layers=1", "trainer.epochs=1", "trainer.verbose=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    out = make_tables(tmp_path / "runs", "--by", "model.num_heads", "--format", "csv")
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [t["model.num_heads"] for t in table] == ["1", "2"]
    for t in table:
        assert t["runs"] == "1" and t["folds"] == "1"
        assert 0.0 <= float(t["test_accuracy_mean"]) <= 1.0
        assert 0.0 <= float(t["val_accuracy_mean"]) <= 1.0
        assert int(t["parameters"]) > 0
    # the same runs, grouped by the keys that differ (seed and paths are not settings)
    assert varying_keys(load_runs([tmp_path / "runs"])) == ["model.num_heads"]


def test_table_and_plot_logged_to_an_offline_wandb_run(sweep, tmp_path):
    from tests.wandb_offline import read_offline_history

    env = dict(os.environ, MPLBACKEND="Agg", WANDB_MODE="offline", HOME=str(tmp_path / "home"),
               WANDB_BASE_URL="http://127.0.0.1:9")
    out = subprocess.run(
        [sys.executable, "-m", "scripts.make_tables", str(sweep), "--plot",
         str(tmp_path / "p.png"), "--log-wandb", "tests", "--name", "ablate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list(sweep.rglob("offline-run-*"))
    logged = {k for row in read_offline_history(run_dir) for k in row}
    assert {"table", "plot"} <= logged, sorted(logged)
    # stdout is the table alone (experiments/sweep.sh writes it to table.md)
    assert "wandb sync" not in out.stdout and f"wandb sync {run_dir}" in out.stderr
    assert out.stdout.lstrip().startswith("|")


def test_the_same_run_twice_is_noted_as_repeats_that_narrow_the_std(tmp_path):
    """One run alone and the same config and seed again in a sweep: two repeats in the
    row (its std narrower than the data say), noted with both directories."""
    root = tmp_path / "esc50"
    for name in ("alone", "sweep/job0"):
        write_run(root / name, ESC50, config=data_config(root / name, seed=42))
    write_run(root / "other_seed", ESC50, config=data_config(root / "other_seed", seed=7))
    (row,) = group_runs(load_runs([root]))
    assert row.num_runs == 3
    (note,) = row.notes
    assert note.startswith("2 runs have the same config and seed (42): ")
    assert str(root / "alone") in note and str(root / "sweep" / "job0") in note
    assert "other_seed" not in note
