"""Honest evaluation end to end: the test split chooses nothing, summaries cover every
finished fold, one process per run directory, multi-label runs report mAP."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, TINY_DATA, TINY_MODEL, train_env

TINY = [*TINY_DATA, *TINY_MODEL]


def train(tmp, *overrides, check=True, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides], cwd=ROOT, env=train_env(tmp),
        capture_output=True, text=True, timeout=timeout,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def results(tmp, name):
    (path,) = [p for p in (tmp / "runs" / name).rglob("results.json")
               if not p.parent.name.startswith("fold_") and "previous" not in p.parts]
    return path.parent, json.loads(path.read_text())


def _weights(path):
    """Every array of a Keras weights file, in file order."""
    import h5py

    out = []
    with h5py.File(path) as f:
        f.visititems(lambda _name, obj: out.append(np.asarray(obj)) if hasattr(obj, "shape") else None)
    return out


def test_the_test_split_changes_nothing_that_training_chooses(tmp_path):
    """Two deterministic runs that differ only in the test fold's audio: every number of
    training and selection is the same, only the test results differ."""
    from src.data.synthetic import generate_dataset

    args = ["data=esc50", "data.folds=[1]", *TINY_MODEL, "trainer.epochs=3",
            "trainer.deterministic=true", "trainer.attention_maps=0"]
    runs = []
    for name in ("clean", "noisy"):
        root = generate_dataset(tmp_path / name, clips_per_class=5, duration=1.0, seed=3)
        if name == "noisy":  # replace every test-fold clip by loud noise
            rng = np.random.default_rng(0)
            meta = (root / "meta" / "esc50.csv").read_text().splitlines()[1:]
            for line in meta:
                fname, fold = line.split(",")[:2]
                if fold == "1":
                    sf.write(root / "audio" / fname, 0.5 * rng.standard_normal(16000), 16000,
                             subtype="PCM_16")
        train(tmp_path, *args, f"data.root={root}", f"name={name}")
        runs.append(results(tmp_path, name))
    (dir_a, a), (dir_b, b) = runs
    fa, fb = a["per_fold"][0], b["per_fold"][0]
    ha, hb = a["history"]["1"], b["history"]["1"]
    for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        assert ha[key] == hb[key], key
    assert fa["best_epoch"] == fb["best_epoch"] and fa["val_accuracy"] == fb["val_accuracy"]
    assert fa["norm_mean"] == fb["norm_mean"]  # statistics from the training split only
    for name in ("best.weights.h5", "last.weights.h5"):
        wa = _weights(dir_a / "fold_1/checkpoints" / name)
        wb = _weights(dir_b / "fold_1/checkpoints" / name)
        assert len(wa) == len(wb) > 0 and all(np.array_equal(p, q) for p, q in zip(wa, wb))
    pa = np.load(dir_a / "fold_1/predictions/test_last.npz")["probs"]
    pb = np.load(dir_b / "fold_1/predictions/test_last.npz")["probs"]
    assert not np.allclose(pa, pb)  # the test clips did change


@pytest.mark.slow
def test_summary_covers_every_finished_fold_and_flags_mixed_commits(tmp_path):
    base = ["experiment=quickstart", *TINY, "trainer.epochs=1", "trainer.attention_maps=0"]
    train(tmp_path, *base, "data.folds=[1,2]")
    out = train(tmp_path, *base, "data.folds=[3]")
    run_dir, r = results(tmp_path, "quickstart")
    assert r["cv"]["folds"] == [1, 2, 3] and len(r["per_fold"]) == 3
    assert "3 fold(s): [1, 2, 3]" in out.stdout
    assert r["test_accuracy"] == pytest.approx(
        np.mean([f["test_accuracy"] for f in r["per_fold"]]))
    # A fold recorded by another commit: the summary says so.
    fold = run_dir / "fold_2" / "results.json"
    data = json.loads(fold.read_text())
    data["git"] = {"commit": "0" * 40, "dirty": False}
    fold.write_text(json.dumps(data))
    train(tmp_path, *base, "data.folds=[1]")
    _, r = results(tmp_path, "quickstart")
    assert r["cv"]["provenance"]["mixed"]
    assert any("different commits" in w for w in r["cv"]["provenance"]["warnings"])


@pytest.mark.slow
def test_second_process_on_a_run_dir_is_refused_and_a_killed_one_resumes(tmp_path):
    args = [sys.executable, "-m", "src.train", "experiment=quickstart", *TINY,
            "trainer.epochs=200", "trainer.attention_maps=0"]
    first = subprocess.Popen(args, cwd=ROOT, env=train_env(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "runs").rglob("fold_5/metrics.csv")):
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.2)
        second = subprocess.run(args, cwd=ROOT, env=train_env(tmp_path), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"in use by process {first.pid}" in second.stderr
        assert "name=..." in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The lock of the killed process does not block the same command.
    out = subprocess.run([*args[:-2], "trainer.epochs=3", "trainer.resume=false"], cwd=ROOT,
                         env=train_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("module", ["src.train", "src.pretrain"])
def test_a_command_refused_by_the_run_lock_leaves_the_running_run_untouched(tmp_path, module):
    """The refusal comes before Hydra writes the run directory: the running run's log and
    its .hydra/ stay as they are."""
    from src.training.rundir import RunLock

    run_dir = tmp_path / "runs" / "locked" / "default"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("kept: true\n")
    log_name = "train.log" if module == "src.train" else "pretrain.log"
    (run_dir / log_name).write_text("the running run's log\n")
    with RunLock(run_dir):
        out = subprocess.run([sys.executable, "-m", module, "name=locked"], cwd=ROOT,
                             env=train_env(tmp_path), capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{run_dir} is in use by process " in out.stderr and "name=..." in out.stderr
    assert "Traceback" not in out.stderr
    assert (run_dir / log_name).read_text() == "the running run's log\n"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([".hydra", ".lock", log_name])
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml"]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "kept: true\n"


def test_main_returns_the_validation_metric(tmp_path, monkeypatch):
    """What a Hydra sweeper (Optuna) maximises is the validation metric."""
    from hydra import compose, initialize_config_dir

    from src.train import run

    monkeypatch.setenv("AUDIO_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=quickstart", *TINY, "trainer.epochs=2", "trainer.attention_maps=0",
            f"paths.cache_dir={tmp_path / 'cache'}", "trainer.save_model=false",
        ])
    value = run(cfg, tmp_path / "run")
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert value == r["val_accuracy"] == pytest.approx(r["per_fold"][0]["val_accuracy"])


def test_overlapping_folds_fail_before_any_work(tmp_path):
    out = train(tmp_path, "experiment=quickstart", *TINY, "data.folds=[5]",
                "data.train_folds=[4,5]", check=False, timeout=120)
    assert out.returncode == 2
    assert "data.train_folds=[4, 5] and data.folds=[5]" in out.stderr
    assert not list((tmp_path / "runs").rglob("fold_*"))
    assert not (tmp_path / "cache" / "features").exists()


def test_multi_label_run_reports_map_and_every_checkpoint_variant(tmp_path):
    args = ["experiment=tagging_quickstart", *TINY_MODEL, "data.clip_seconds=1.0",
            "data.generate.train_clips=60", "data.generate.eval_clips=24",
            "data.generate.duration=1.0", "trainer.epochs=3", "trainer.average_epochs=[2,3]",
            "trainer.ensemble_epochs=[1,3]", "data.balanced_sampling=true",
            "augment.mixup=0.5", "trainer.early_stopping_patience=5"]
    train(tmp_path, *args)
    run_dir, r = results(tmp_path, "tagging_quickstart")
    assert r["label_type"] == "multi" and r["primary_metric"] == "mAP"
    fold = r["per_fold"][0]
    for key in ("test_mAP", "test_mean_auc", "test_d_prime", "test_lwlrap", "val_mAP"):
        assert np.isfinite(fold[key]), key
    assert 0 <= fold["test_mAP"] <= 1
    assert fold["test_averaged"]["epochs"] == [2, 3]
    assert fold["test_ensemble"]["epochs"] == [1, 2, 3]
    for variant in ("best_val", "averaged", "ensemble"):
        assert variant in r["cv"], variant
    full = json.loads((run_dir / "fold_3" / "results.json").read_text())
    ap = full["test_report"]["per_class_ap"]
    assert set(ap) == set(r["class_names"])
    evaluated = [v for v in ap.values() if v is not None]
    assert full["test_report"]["num_classes_evaluated"] == len(evaluated)
    assert np.mean(evaluated) == pytest.approx(fold["test_mAP"])
    saved = np.load(run_dir / "fold_3" / "predictions" / "test_averaged.npz")
    assert saved["targets"].shape == saved["probs"].shape
    assert r["history"]["3"]["val_mAP"] and "val_accuracy" not in r["history"]["3"]
    # the saved model carries its output type
    from src.models import load_model

    assert load_model(run_dir / "fold_3" / "model.keras").multi_label


@pytest.mark.slow
def test_paper_protocol_curve_is_kept_apart_and_labelled(tmp_path):
    train(tmp_path, "experiment=quickstart", *TINY, "trainer.epochs=2", "data.folds=[4,5]",
          "trainer.paper_protocol=true", "trainer.attention_maps=0")
    run_dir, r = results(tmp_path, "quickstart")
    paper = r["cv"]["paper_protocol_best_mean_epoch"]
    assert "optimistic" in paper["note"] and paper["metric"] == "test_accuracy"
    curves = [json.loads((run_dir / f"fold_{k}" / "paper_protocol_test_curve.json").read_text())
              for k in (4, 5)]
    means = np.mean(curves, axis=0)
    assert paper["epoch"] == int(np.argmax(means)) + 1
    assert paper["mean"] == pytest.approx(means.max())
    for k in ("4", "5"):  # the epoch logs that choose checkpoints hold no test metric
        assert not [key for key in r["history"][k] if key.startswith("test")]


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    yield
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
