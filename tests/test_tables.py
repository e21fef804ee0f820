"""Tables from results.json files: src.evaluation.tables and scripts.make_tables."""

import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.make_tables import load_reference, parse_expect
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
    accs,
    *,
    heads=1,
    seed=1,
    folds=None,
    best=None,
    params=2700,
    commit="a" * 40,
    dirty=False,
    versions=None,
    train_time=10.0,
    train_clips_per_s=(100.0,),
):
    """A minimal valid run-level results.json (as src.train writes it) plus a fold-level one."""
    folds = list(folds or range(1, len(accs) + 1))
    per_fold = [
        {
            "fold": f,
            "accuracy": a,
            "num_test": 10,
            "num_train": 40,
            "parameters": params,
            "train_time_s": train_time / len(accs),
            "train_clips_per_s": train_clips_per_s[i % len(train_clips_per_s)],
            "eval_clips_per_s": 1000.0,
            "epochs": 3,
        }
        for i, (f, a) in enumerate(zip(folds, accs))
    ]
    cv = {
        "folds": folds,
        "num_folds": len(folds),
        "last_epoch": {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                       "per_fold": list(accs)},
    }
    if best is not None:
        cv["best_mean_epoch"] = {"epoch": 2, "mean": best, "std": 0.0, "per_fold": [best] * len(accs)}
    results = {
        "experiment": "ablate",
        "dataset": "quickstart",
        "accuracy": cv["last_epoch"]["mean"],
        "accuracy_std": cv["last_epoch"]["std"],
        "cv": cv,
        "per_fold": per_fold,
        "parameters": params,
        "epochs": 3,
        "train_time_s": train_time,
        "wall_time_s": train_time + 1,
        "config": {
            "name": "ablate",
            "seed": seed,
            "tags": ["quickstart"],
            "data": {"name": "quickstart", "folds": folds, "root": str(run_dir / "data")},
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
    (fold_dir / "results.json").write_text(json.dumps({**per_fold[0], "accuracy": 0.0}))
    return run_dir / "results.json"


# heads=1: folds [0.5, 0.6, 0.7] (seed 1) and [0.6, 0.7, 0.8] (seed 2)
# heads=2: folds [0.7, 0.8, 0.9] (seed 1) and [0.8, 0.8, 0.8] (seed 2)
H1 = [0.5, 0.6, 0.7, 0.6, 0.7, 0.8]
H2 = [0.7, 0.8, 0.9, 0.8, 0.8, 0.8]


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "runs" / "ablate" / "multirun" / "sweep"
    write_run(root / "heads1_seed1", [0.5, 0.6, 0.7], heads=1, seed=1, best=0.66,
              train_time=10.0, train_clips_per_s=(100.0, 200.0, 300.0))
    write_run(root / "heads1_seed2", [0.6, 0.7, 0.8], heads=1, seed=2, best=0.70,
              train_time=20.0, train_clips_per_s=(400.0,))
    write_run(root / "heads2_seed1", [0.7, 0.8, 0.9], heads=2, seed=1, best=0.82, params=2800)
    write_run(root / "heads2_seed2", [0.8, 0.8, 0.8], heads=2, seed=2, best=0.84, params=2800)
    return root


def test_load_runs_skips_fold_level(sweep):
    runs = load_runs([sweep])
    assert len(runs) == 4
    assert all(Path(r.path).parent.parent == sweep for r in runs)
    r = next(r for r in runs if r.path.endswith("heads1_seed1/results.json"))
    assert r.fold_accuracies == [0.5, 0.6, 0.7] and r.folds == (1, 2, 3) and r.num_folds == 3
    assert r.config["model.num_heads"] == 1 and r.seed == 1
    assert r.parameters == 2700 and r.train_time_s == 10.0
    assert r.train_clips_per_s == pytest.approx(200.0)  # mean over folds
    assert r.eval_clips_per_s == pytest.approx(1000.0)
    assert r.best_mean_epoch == 0.66
    assert r.git_commit == "a" * 40 and r.git_dirty is False
    assert r.versions["tensorflow"] == "2.17.1"
    # a results.json file given directly works too
    assert len(load_runs([r.path])) == 1


def test_grouping_detects_keys_and_pools_folds_and_seeds(sweep):
    runs = load_runs([sweep])
    assert varying_keys(runs) == ["model.num_heads"]  # seed, paths, data.root: not settings
    rows = group_runs(runs)
    assert [r.key for r in rows] == [{"model.num_heads": 1}, {"model.num_heads": 2}]
    h1, h2 = rows
    # pooled over (fold, seed): mean and population std (ddof=0) of the six accuracies
    assert h1.accuracy_mean == pytest.approx(0.65)
    assert h1.accuracy_std == pytest.approx(np.std(H1))
    assert h1.accuracy_std == pytest.approx(np.sqrt(0.055 / 6))  # by hand: 0.0957
    assert h2.accuracy_mean == pytest.approx(0.8)
    assert h2.accuracy_std == pytest.approx(np.sqrt(0.02 / 6))  # 0.0577
    assert h1.num_runs == 2 and h1.num_folds == 3 and h1.seeds == [1, 2]
    assert h1.parameters == 2700 and h2.parameters == 2800
    assert h1.train_time_s == pytest.approx(15.0)  # mean per run
    assert h1.train_clips_per_s == pytest.approx(300.0)  # mean of 200 and 400
    assert h1.ast_accuracy == pytest.approx(0.68)  # mean of the best_mean_epoch means
    assert h1.status == "" and h1.folds_label == "3"
    # explicit keys
    (one,) = group_runs(runs, by=[])
    assert one.num_runs == 4 and one.accuracy_mean == pytest.approx(np.mean(H1 + H2))
    with pytest.raises(ValueError, match="model.num_heads"):
        group_runs(runs, by=["model.num_head"])


def test_formats(sweep):
    rows = group_runs(load_runs([sweep]))
    md = format_table(rows, "md")
    lines = md.strip().splitlines()
    assert lines[0].startswith("| model.num_heads | params | accuracy (%) |")
    assert len(lines) == 4
    assert "| 1 | 2,700 | 65.0 ± 9.6 | 68.0 | 2 | 3 |" in md
    assert "| 2 | 2,800 | 80.0 ± 5.8 | 83.0 | 2 | 3 |" in md

    tex = format_table(rows, "latex")
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"model.num\_heads" in tex and r"accuracy (\%)" in tex
    assert r"1 & 2,700 & 65.0 $\pm$ 9.6 & 68.0 & 2 & 3" in tex

    table = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert [t["model.num_heads"] for t in table] == ["1", "2"]
    assert table[0]["accuracy"] == "65.0 ± 9.6" and table[0]["parameters"] == "2700"
    assert float(table[0]["accuracy_mean"]) == pytest.approx(0.65)
    assert float(table[1]["accuracy_std"]) == pytest.approx(np.std(H2))
    assert table[0]["runs"] == "2" and table[0]["seeds"] == "1 2"

    with_ref = format_table(rows, "md", reference={1: "70.1 ± 1.0", 2: "81.2"})
    assert "| paper |" in with_ref.splitlines()[0]
    assert "70.1 ± 1.0" in with_ref and "81.2" in with_ref
    with pytest.raises(ValueError):
        format_table(rows, "html")


def test_reference_files():
    ref, key = load_reference(ROOT / "references" / "ast_table5.yaml")
    assert key == "model.stride" and set(ref) == {16, 14, 12, 10}
    assert "0.336" in ref[16] and "0.459" in ref[10]
    ref, key = load_reference(ROOT / "references" / "ast_table7.yaml")
    assert key == "model.pretrained"
    assert ref == {"deit_base_distilled_384": "88.7 ± 0.7 (AST-S)",
                   "ast_audioset": "95.6 ± 0.4 (AST-P)"}


def test_incomplete_group_is_marked(sweep):
    write_run(sweep / "heads4_seed1", [0.7, 0.7], heads=4, folds=[1, 2])
    rows = group_runs(load_runs([sweep]))
    h4 = rows[-1]
    assert h4.key == {"model.num_heads": 4}
    assert h4.status == "incomplete" and h4.folds_label == "2/3" and h4.num_folds == 2
    assert all(r.status == "" for r in rows[:-1])
    md = format_table(rows, "md")
    assert "incomplete (2/3 folds)" in md and "| 2/3 |" in md


def test_expected_values_show_missing_rows(sweep):
    assert parse_expect(["model.num_heads=1,2,8"]) == {"model.num_heads": [1, 2, 8]}
    rows = group_runs(load_runs([sweep]), expected={"model.num_heads": [1, 2, 8]})
    assert [r.key["model.num_heads"] for r in rows] == [1, 2, 8]
    assert rows[2].status == "missing" and rows[2].runs == []
    md = format_table(rows, "md")
    assert "| 8 |" in md and "missing" in md.splitlines()[-1]
    # an expected key that does not vary between the runs still becomes a column
    (only,) = group_runs(load_runs([sweep / "heads1_seed1"]), expected={"model.num_heads": [1]})
    assert only.key == {"model.num_heads": 1} and only.status == ""


def test_provenance_warnings(sweep):
    assert provenance_warnings(group_runs(load_runs([sweep]))) == []
    write_run(sweep / "heads1_seed3", [0.6, 0.6, 0.6], heads=1, seed=3, best=0.6,
              commit="b" * 40, dirty=True, versions={**VERSIONS, "tensorflow": "2.16.2"})
    warnings = provenance_warnings(group_runs(load_runs([sweep])))
    text = "\n".join(warnings)
    assert "model.num_heads=1: runs from 2 git commits (aaaaaaa, bbbbbbb)" in text
    assert "dirty" in text and "tensorflow 2.16.2/2.17.1" in text
    assert not any(w.startswith("model.num_heads=2") for w in warnings)


def test_plot_writes_png(sweep, tmp_path):
    rows = group_runs(load_runs([sweep]), expected={"model.num_heads": [1, 2, 4]})
    out = plot(rows, "model.num_heads", tmp_path / "plots" / "heads.png", title="heads")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
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
    assert "| 1 | 2,700 | 65.0 ± 9.6 |" in out.stdout
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

    out = make_tables(sweep, "--by", "model.num_head")
    assert out.returncode == 2 and "did you mean model.num_heads" in out.stderr


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
        assert 0.0 <= float(t["accuracy_mean"]) <= 1.0
        assert int(t["parameters"]) > 0
    # the same runs, grouped by the keys that differ (seed and paths are not settings)
    assert varying_keys(load_runs([tmp_path / "runs"])) == ["model.num_heads"]


def test_table_and_plot_logged_to_an_offline_wandb_run(sweep, tmp_path):
    from src.training.wandb_logger import read_offline_history

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
