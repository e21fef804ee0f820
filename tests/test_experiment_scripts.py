"""AST's AudioSet tables, the patchout ablation and the ensemble of finished runs, run as
a user runs them, on tiny generated data and tiny models."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROOT, TINY_DATA, TINY_MODEL, train_env

PNG = b"\x89PNG\r\n\x1a\n"


def _env(tmp_path, **extra):
    return train_env(tmp_path, WANDB_MODE="disabled", PYTHON=sys.executable, **extra)


def _markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text``, as {header: cell}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}, lines[1]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def _run_results(sweep_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]


def _map_cell(value: float) -> str:
    """mAP as the tables print it: three decimals without the leading zero; one run of
    one fold is one value, shown without a spread."""
    return f"{value:.3f}".removeprefix("0")


@pytest.mark.parametrize("script", sorted((ROOT / "experiments").glob("*.sh")),
                         ids=lambda p: p.name)
def test_experiment_scripts_run_as_the_readme_shows(script):
    """The README runs them as ``experiments/NAME.sh``: executable, valid bash (sweep.sh,
    which the ablation scripts source, included)."""
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(ROOT)}"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- ast_audioset.sh

@pytest.mark.slow
def test_ast_audioset_script_makes_tables_5_and_2_beside_the_paper(tmp_path):
    """Both sweeps of experiments/ast_audioset.sh on the generated multi-label set with a
    model of the tiny DeiT fixture's shape, imported under the name the recipe asks for:
    every stride and both starts have a run, scored by test mAP, with AST's numbers in the
    paper column of the matching rows."""
    weights = tmp_path / "weights"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.import_weights", "--from", "hf-deit",
         str(ROOT / "tests" / "fixtures" / "hf_deit"),
         "--out", str(weights / "deit_base_distilled_384.keras")],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tiny = ["experiment=tagging_quickstart", "data.generate.train_clips=40",
            "data.generate.eval_clips=20", "data.generate.duration=1.0",
            "data.clip_seconds=1.0", "frontend.n_mels=32",
            # the DeiT fixture's shape (64 wide, 2 pre-norm GELU blocks of 4 heads)
            "model=ast_base384", "model.embed_dim=64", "model.num_layers=2",
            "model.num_heads=4", "model.ff_dim=128",
            "trainer.epochs=1", "trainer.verbose=0", "trainer.attention_maps=0",
            "trainer.save_model=false", "logger=none"]
    out = subprocess.run(
        ["bash", str(ROOT / "experiments" / "ast_audioset.sh"), *tiny],
        cwd=ROOT, env=_env(tmp_path, AUDIO_WEIGHTS_DIR=str(weights)),
        capture_output=True, text=True, timeout=580,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    (overlap,) = list((runs / "ast_audioset_overlap").glob("sweep-*"))
    (pretraining,) = list((runs / "ast_audioset_pretraining").glob("sweep-*"))
    table5 = yaml.safe_load((ROOT / "references" / "ast_table5.yaml").read_text())["values"]
    table2 = yaml.safe_load((ROOT / "references" / "ast_table2.yaml").read_text())["values"]

    # Table 5: one run per stride, both axes strided alike, multi-label runs scored by mAP.
    results = {r["config"]["model"]["stride"]: r for r in _run_results(overlap)}
    assert sorted(results) == [10, 12, 14, 16]
    for stride, r in results.items():
        assert (r["config"]["model"]["f_stride"], r["config"]["model"]["t_stride"]) == (
            stride, stride)
        assert r["config"]["data"]["name"] == "tagging_quickstart"
        assert r["primary_metric"] == "mAP" and 0.0 < r["test_mAP"] <= 1.0
    # Smaller strides overlap more: more patches, more position embeddings.
    params = [results[s]["parameters"] for s in (16, 14, 12, 10)]
    assert params == sorted(params) and params[0] < params[-1]
    table = (overlap / "table.md").read_text()
    assert table in out.stdout  # printed as well as written
    rows = _markdown_rows(table)
    assert [row["model.stride"] for row in rows] == ["10", "12", "14", "16"]
    for row in rows:
        stride = int(row["model.stride"])
        assert row["test mAP"] == _map_cell(results[stride]["test_mAP"]), row
        assert row["paper"] == table5[stride], row
        assert row["runs"] == "1" and "status" not in row
    assert "\\begin{tabular}" in (overlap / "table.tex").read_text()
    assert "0.347 / 0.459 mAP" in (overlap / "table.tex").read_text()
    assert (overlap / "ast_audioset_overlap.png").read_bytes()[:8] == PNG

    # Table 2: from scratch and from the imported DeiT, each beside its paper number.
    results = {r["config"]["model"]["pretrained"]: r for r in _run_results(pretraining)}
    assert set(results) == {None, "deit_base_distilled_384"}
    assert results[None]["per_fold"][0]["pretrained"] is None
    loaded = results["deit_base_distilled_384"]["per_fold"][0]["pretrained"]
    assert str(weights / "deit_base_distilled_384.keras") in loaded
    assert "position grid 4x4 -> " in loaded and "new classifier head" in loaded
    table = (pretraining / "table.md").read_text()
    assert table in out.stdout
    rows = {row["model.pretrained"]: row for row in _markdown_rows(table)}
    # null is the no-pretraining row ("—"), not a missing setting beside it
    assert set(rows) == {"—", "deit_base_distilled_384"}, table
    assert "missing" not in table
    for shown, value in (("—", None), ("deit_base_distilled_384", "deit_base_distilled_384")):
        assert rows[shown]["test mAP"] == _map_cell(results[value]["test_mAP"])
        assert rows[shown]["paper"] == table2[value]
    assert "0.148 / 0.366 (no pretraining)" in (pretraining / "table.tex").read_text()
    assert (pretraining / "ast_audioset_pretraining.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------ ablate_patchout.sh

@pytest.mark.slow
def test_ablate_patchout_script_one_row_per_patchout_size(tmp_path):
    """experiments/ablate_patchout.sh on the quickstart: 1 s clips, 32 mel bins and
    stride 16 make a 2 x 6 patch grid (frequency x time), so 0 or 1 frequency rows and 0
    or 3 time columns can be dropped; one run and one table row per (time, freq) pair,
    each with its training throughput."""
    args = ["experiment=quickstart", "logger=none", *TINY_DATA, *TINY_MODEL,
            "model.stride=16", "trainer.epochs=1", "trainer.attention_maps=0",
            "trainer.save_model=false",
            "model.patchout.freq=0,1"]  # a swept key as an override: replaces FREQ's values
    out = subprocess.run(
        ["bash", str(ROOT / "experiments" / "ablate_patchout.sh"), *args],
        cwd=ROOT, env=_env(tmp_path, TIME="0,3", FREQ="0,2"),
        capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (sweep,) = list((tmp_path / "runs" / "ablate_patchout").glob("sweep-*"))
    pairs = [(0, 0), (0, 1), (3, 0), (3, 1)]
    results = {}
    for r in _run_results(sweep):
        model = r["config"]["model"]
        assert model["pos_embedding"] == "disentangled"
        assert model["patchout"]["random"] == 0
        results[model["patchout"]["time"], model["patchout"]["freq"]] = r
    assert sorted(results) == pairs
    table = (sweep / "table.md").read_text()
    assert table in out.stdout
    rows = _markdown_rows(table)
    assert [(int(row["model.patchout.time"]), int(row["model.patchout.freq"]))
            for row in rows] == pairs
    for row in rows:
        r = results[int(row["model.patchout.time"]), int(row["model.patchout.freq"])]
        rate = r["per_fold"][0]["train_clips_per_s"]
        assert rate > 0 and row["train clips/s"] == f"{rate:.0f}", row
        accuracy = 100 * r["test_accuracy"]
        assert row["test accuracy (%)"] == f"{accuracy:.1f}", row  # one value: no spread
    assert "train clips/s" in (sweep / "table.tex").read_text()
    assert (sweep / "ablate_patchout.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------- scripts.ensemble

TINY_RUN = [*TINY_DATA, *TINY_MODEL, "experiment=quickstart", "logger=none",
            "model.stride=16", "trainer.epochs=1", "trainer.deterministic=true",
            "trainer.attention_maps=0", "trainer.save_model=false"]


@pytest.fixture(scope="module")
def ensemble_runs(tmp_path_factory):
    """Two runs on the same split (test fold 5) from different seeds, and a run on another
    generated set (other audio, another place) testing folds 4 and 5."""
    tmp = tmp_path_factory.mktemp("ensemble")
    other = tmp / "runs" / "other"
    commands = [
        [sys.executable, "-m", "src.train", "-m", *TINY_RUN, "seed=0,1",
         f"hydra.sweep.dir={tmp / 'runs' / 'seeds'}", "hydra.sweep.subdir=seed${seed}"],
        [sys.executable, "-m", "src.train", *TINY_RUN, "data.folds=[4,5]",
         "data.root=${paths.cache_dir}/quickstart_other", "data.generate.seed=7",
         f"hydra.run.dir={other}"],
    ]
    # Side by side (their own data, their own feature stores), logs in files.
    logs = [tmp / f"train_{i}.log" for i in range(len(commands))]
    procs = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as f:
                procs.append(subprocess.Popen(command, cwd=ROOT, env=_env(tmp), stdout=f,
                                              stderr=subprocess.STDOUT))
        for proc, log in zip(procs, logs, strict=True):
            assert proc.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return tmp, tmp / "runs" / "seeds" / "seed0", tmp / "runs" / "seeds" / "seed1", other


def _ensemble(tmp, *args):
    return subprocess.run(
        [sys.executable, "-m", "scripts.ensemble", *map(str, args)],
        cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("variant", ["last", "best_val"])
def test_ensemble_scores_the_mean_of_the_runs_probabilities(ensemble_runs, variant):
    tmp, a, b, _ = ensemble_runs
    out = _ensemble(tmp, a, b, "--variant", variant, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    pa, pb = (np.load(d / "fold_5" / "predictions" / f"test_{variant}.npz") for d in (a, b))
    assert list(pa["keys"]) == list(pb["keys"]) and len(pa["keys"]) == 12
    assert not np.allclose(pa["probs"], pb["probs"])  # two different models
    # By hand: the mean of the two runs' probabilities, its arg max against the labels.
    mean = (pa["probs"].astype(np.float64) + pb["probs"].astype(np.float64)) / 2
    predicted, labels = mean.argmax(axis=1), pa["targets"]
    # The mean picks other classes than either run alone for some clips (so the checks
    # below tell the ensemble from either of its members).
    assert (predicted != pa["probs"].argmax(axis=1)).any()
    assert (predicted != pb["probs"].argmax(axis=1)).any()
    accuracy = float(np.mean(predicted == labels))
    assert (got["metric"], got["folds"], got["variant"]) == ("test_accuracy", [5], variant)
    assert got["mean"] == pytest.approx(accuracy) and got["std"] == 0.0
    assert got["per_fold"] == [pytest.approx(accuracy)]
    # One clip per class: the confusion matrix holds every clip's predicted class.
    confusion = np.zeros((12, 12), int)
    np.add.at(confusion, (labels, predicted), 1)
    assert got["reports"][0]["report"]["confusion_matrix"] == confusion.tolist()
    # The runs' own results are each single model's accuracy on the same clips.
    for run, p in ((a, pa), (b, pb)):
        fold = json.loads((run / "fold_5" / "results.json").read_text())
        single = fold["test_accuracy"] if variant == "last" else fold["test_best_val"]["accuracy"]
        assert single == pytest.approx(float(np.mean(p["probs"].argmax(axis=1) == labels)))
    # Plain output: the same number; the order of the runs does not matter.
    out = _ensemble(tmp, b, a, "--variant", variant)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ensemble of 2 run(s), {variant} models, folds [5]: " in out.stdout
    assert f"test_accuracy {accuracy:.4f} +- 0.0000" in out.stdout


def test_ensemble_refuses_runs_on_other_clips_or_folds(ensemble_runs, tmp_path):
    tmp, a, b, other = ensemble_runs
    # Same test fold (5), other clips: refused, naming the run and the fold.
    out = _ensemble(tmp, a, other)
    assert out.returncode == 2 and out.stdout == ""
    assert f"error: {other} fold 5: other test clips or labels than {a}" in out.stderr
    assert "only runs on the same split combine" in out.stderr
    # A run that finished only fold 4 has no test fold in common with runs of fold 5.
    fold4_only = tmp_path / "fold4_only"
    shutil.copytree(other / "fold_4", fold4_only / "fold_4")
    out = _ensemble(tmp, a, b, fold4_only)
    assert out.returncode == 2 and out.stdout == ""
    assert "error: the runs have no test fold in common" in out.stderr
    assert f"{fold4_only}: folds [4]" in out.stderr and f"{a}: folds [5]" in out.stderr
    # Folds that only some runs have are left out, with a warning.
    out = _ensemble(tmp, other, fold4_only, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["folds"] == [4]
    assert f"warning: {other}: fold(s) [5] left out" in out.stderr


def test_ensemble_missing_predictions_is_a_clear_error(ensemble_runs, tmp_path):
    tmp, a, b, _ = ensemble_runs
    # No averaged model was made (trainer.average_epochs unset): no test_averaged.npz.
    out = _ensemble(tmp, a, b, "--variant", "averaged")
    assert out.returncode == 2 and out.stdout == ""
    assert f"error: {a}: no fold_*/predictions/test_averaged.npz" in out.stderr
    # A run without its predictions (as written before they were saved).
    old = tmp_path / "old_run"
    shutil.copytree(b, old, ignore=shutil.ignore_patterns("predictions"))
    assert (old / "fold_5" / "results.json").is_file()
    out = _ensemble(tmp, a, old)
    assert out.returncode == 2 and out.stdout == ""
    assert f"error: {old}: no fold_*/predictions/test_last.npz" in out.stderr
    # A mistyped run directory.
    out = _ensemble(tmp, a, tmp_path / "no_such_run")
    assert out.returncode == 2 and out.stdout == ""
    assert f"error: {tmp_path / 'no_such_run'}: not a run directory" in out.stderr


@pytest.mark.slow
def test_an_ablation_sweeps_the_values_given_for_its_key(tmp_path):
    """`experiments/ablate_heads.sh model.num_heads=1,2`: the user's values are swept and
    the table expects those, not the script's own (no rows of missing runs)."""
    args = ["experiment=quickstart", "logger=none", *TINY_DATA, *TINY_MODEL,
            "model.embed_dim=16", "trainer.epochs=1", "trainer.attention_maps=0",
            "trainer.save_model=false", "model.num_heads=1,2"]
    out = subprocess.run(["bash", str(ROOT / "experiments" / "ablate_heads.sh"), *args],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (sweep,) = list((tmp_path / "runs" / "ablate_heads").glob("sweep-*"))
    heads = sorted(r["config"]["model"]["num_heads"] for r in _run_results(sweep))
    assert heads == [1, 2]
    rows = _markdown_rows((sweep / "table.md").read_text())
    assert [int(row["model.num_heads"]) for row in rows] == [1, 2]
    assert "missing" not in (sweep / "table.md").read_text() and "no run" not in out.stderr
    # The same sweep in another order with a run-invariant key added: the same directory,
    # every run complete already.
    moved = [a for a in args if a != "logger=none"] + ["trainer.verbose=2", "logger=none"]
    again = subprocess.run(["bash", str(ROOT / "experiments" / "ablate_heads.sh"), *moved],
                           cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert list((tmp_path / "runs" / "ablate_heads").glob("sweep-*")) == [sweep]
    assert "already complete" in again.stdout + again.stderr


def test_a_sweep_directory_is_named_by_its_setting_not_the_argument_text(tmp_path):
    """sweep_dir: the order of the arguments and the run-invariant keys (logger,
    data.folds) name no other sweep; another experiment does; a sweep begun under the
    earlier tag (a digest of the arguments as typed) continues there."""
    script = """
source experiments/sweep.sh
d() { sweep_dir ablate_heads "$(printf '%s\\n' "$@")" "$@"; }
d model.num_heads=1,2 experiment=quickstart logger=none
d logger=wandb 'data.folds=[3]' experiment=quickstart model.num_heads=1,2
d model.num_heads=1,2 experiment=esc50
d model.num_heads=1,2 experiment=esc50 experiment=quickstart
mkdir -p "$AUDIO_RUNS_DIR/ablate_heads/sweep-$(printf '%s\\n' a=1 b=2 | sha1sum | cut -c1-10)"
d a=1 b=2
"""
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         env=_env(tmp_path), timeout=60)
    assert out.returncode == 0, out.stderr
    a, b, c, last_wins, legacy = out.stdout.split()
    runs = tmp_path / "runs" / "ablate_heads"
    assert a == b == last_wins and a != c and a.startswith(f"{runs}/sweep-")
    assert list(runs.iterdir()) == [Path(legacy)]
