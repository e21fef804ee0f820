"""End to end: `python -m src.train` as a user runs it, in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, TINY_DATA, TINY_MODEL, epochs_logged, kill_after_epochs, train_env

# A tiny, fast version of the quickstart: 12 classes x 5 clips of 1 s, 2 epochs.
# A tiny, fast version of the quickstart: 12 classes x 5 clips of 1 s, 2 epochs.
RUN = [*TINY_MODEL, "trainer.epochs=2"]
TINY = [*TINY_DATA, *RUN]


def run_train(tmp_path, *overrides, check=True, timeout=300):
    out = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides],
        cwd=ROOT, env=train_env(tmp_path), capture_output=True, text=True, timeout=timeout,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    run_train(tmp, "experiment=quickstart", *TINY)
    (results,) = run_results(tmp)
    return tmp, results.parent, json.loads(results.read_text())


def run_results(tmp):
    """The run-level results.json files under tmp/runs (not the per-fold ones)."""
    return sorted(
        p for p in (tmp / "runs").rglob("results.json") if not p.parent.name.startswith("fold_")
    )


def test_quickstart_writes_results(quickstart_run):
    _, run_dir, r = quickstart_run
    assert r["experiment"] == "quickstart"
    assert r["label_type"] == "single" and r["primary_metric"] == "accuracy"
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert r["cv"]["folds"] == [5] and r["cv"]["last_epoch"]["metric"] == "test_accuracy"
    fold = r["per_fold"][0]
    # 12 classes x 5 clips; fold 5 tests (12); 10% of the other 48, one per class, validate
    assert (fold["num_train"], fold["num_val"], fold["num_test"]) == (36, 12, 12)
    assert "carved from the training folds" in fold["splits"]["val_source"]
    full = json.loads((run_dir / "fold_5" / "results.json").read_text())
    m = np.array(full["test_report"]["confusion_matrix"])
    assert m.shape == (12, 12) and m.sum() == 12
    assert np.isclose(np.trace(m) / m.sum(), fold["test_accuracy"])
    assert set(full["test_report"]["per_class_accuracy"]) == set(r["class_names"])
    hist = r["history"]["5"]
    assert len(hist["val_accuracy"]) == 2 == r["epochs"] and len(hist["val_loss"]) == 2
    assert "test_accuracy" not in hist  # the test split is not read during training
    assert fold["best_epoch"] == int(np.argmax(hist["val_accuracy"])) + 1
    assert fold["best_val_accuracy"] == max(hist["val_accuracy"])
    assert fold["test_best_val"]["epoch"] == fold["best_epoch"]
    assert r["parameters"] > 0 and r["wall_time_s"] > 0
    assert r["config"]["model"]["embed_dim"] == 16
    assert r["versions"]["tensorflow"].startswith("2.17")
    assert "commit" in r["git"] and "dirty" in r["git"]
    assert "commit" in fold["git"] and fold["versions"]["tensorflow"].startswith("2.17")
    assert (run_dir / "config.yaml").exists()
    for name in ("best.weights.h5", "last.weights.h5"):
        assert (run_dir / "fold_5" / "checkpoints" / name).stat().st_size > 0
    assert (run_dir / "fold_5" / "metrics.csv").read_text().count("\n") == 3
    maps = sorted((run_dir / "fold_5" / "attention").glob("best_*.png"))
    assert len(maps) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in maps)
    saved = np.load(run_dir / "fold_5" / "predictions" / "test_last.npz")
    assert saved["probs"].shape == (12, 12) and len(set(saved["keys"].tolist())) == 12
    assert np.isclose((saved["probs"].argmax(1) == saved["targets"]).mean(), fold["test_accuracy"])


def test_saved_model_takes_a_raw_waveform(quickstart_run, tmp_path):
    import keras

    from src.models import load_model

    _, run_dir, r = quickstart_run
    model = load_model(run_dir / "fold_5" / "model.keras")
    assert model.class_names == r["class_names"]
    wave = np.random.default_rng(0).standard_normal((2, 16000)).astype("float32") * 0.1
    logits = keras.ops.convert_to_numpy(model(wave))
    assert logits.shape == (2, 12) and np.isfinite(logits).all()


def test_feature_store_is_reused_and_follows_the_files(quickstart_run):
    """A rerun reads the stored features; a changed clip recomputes only its shard."""
    import os

    tmp, run_dir, _ = quickstart_run
    (store,) = list((tmp / "cache" / "features").glob("quickstart-*"))
    manifests = sorted((store / "shards").glob("*.json"))
    before = {p.name for p in manifests}
    assert sum(json.loads(p.read_text())["count"] for p in manifests) == 60
    clip = sorted((tmp / "cache" / "quickstart" / "audio").glob("*.wav"))[3]
    st = clip.stat()
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    out = run_train(tmp, "experiment=quickstart", *TINY, "name=rerun")
    logs = out.stdout + out.stderr
    assert "1 computed now" in logs, logs[-2000:]
    after = {p.name for p in (store / "shards").glob("*.json")}
    assert len(after - before) == 1 and len(before - after) == 1


@pytest.mark.slow  # two more runs; tests/test_fold_inputs.py checks the same in-process
def test_a_finished_run_is_skipped_on_its_inputs_and_refused_on_others(quickstart_run):
    """Rerun as it was, the finished fold is skipped and the run keeps its result and wall
    time; after a clip's audio changed, the run stops (exit 2) and names what changed."""
    tmp, run_dir, _ = quickstart_run
    clip = sorted((tmp / "cache" / "quickstart" / "audio").glob("*.wav"))[3]
    first = json.loads((run_dir / "results.json").read_text())
    inputs = json.loads((run_dir / "fold_5" / "inputs.json").read_text())
    assert inputs["splits"]["test"]["clips"] == 12 and inputs["features"]["shards"] >= 1
    again = run_train(tmp, "experiment=quickstart", *TINY)
    assert "fold 5 already complete" in again.stdout + again.stderr
    assert "every fold was complete already" in again.stdout
    rerun = json.loads((run_dir / "results.json").read_text())
    assert rerun["wall_time_s"] == first["wall_time_s"]
    assert rerun["test_accuracy"] == first["test_accuracy"]

    # The clip's audio changed: the finished fold is not reported as if trained on it.
    original = clip.read_bytes()
    samples, rate = sf.read(clip, dtype="float32")
    sf.write(clip, samples * 0.5, rate, subtype="PCM_16")
    try:
        out = run_train(tmp, "experiment=quickstart", *TINY, check=False)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        err = out.stderr
        assert f"fold 5 in {run_dir} was finished on other inputs" in err, err[-3000:]
        assert "stored features of data fold(s)" in err and "trainer.resume=false" in err
        assert json.loads((run_dir / "results.json").read_text()) == rerun  # untouched
        assert "was finished on other inputs" in (run_dir / "train.log").read_text()
    finally:
        clip.write_bytes(original)


def test_a_run_stopped_after_training_evaluates_without_training_again(tmp_path):
    """A run that dies after its last epoch, before the fold's results are written (here:
    the model cannot be saved; a kill there is the same), keeps its backup: the same
    command evaluates and writes the results without training the fold again."""
    run_dir = tmp_path / "runs" / "after_fit"
    blocker = run_dir / "fold_5" / "model.keras"
    blocker.mkdir(parents=True)  # model.save fails on a directory
    args = ["experiment=quickstart", *TINY, f"hydra.run.dir={run_dir}"]
    out = run_train(tmp_path, *args, check=False)
    assert out.returncode != 0 and not (run_dir / "fold_5" / "results.json").exists()
    backup = run_dir / "fold_5" / "backup"
    assert (backup / "finished").exists(), out.stderr[-3000:]
    rows = (run_dir / "fold_5" / "metrics.csv").read_text()
    blocker.rmdir()
    out = run_train(tmp_path, *args)
    logs = out.stdout + out.stderr
    assert "fold 5: training had finished (2 epoch(s)); evaluating" in logs, logs[-3000:]
    assert "Epoch 1/2" not in logs and "Epoch 2/2" not in logs
    assert (run_dir / "fold_5" / "metrics.csv").read_text() == rows
    assert not backup.exists() and (run_dir / "fold_5" / "model.keras").is_file()
    r = json.loads((run_dir / "results.json").read_text())
    assert len(r["history"]["5"]["loss"]) == 2
    # the training time and throughput of the first attempt's epochs (none trained now)
    times, fold = r["history"]["5"]["epoch_time_s"], r["per_fold"][0]
    assert len(times) == 2 and fold["train_time_s"] == pytest.approx(sum(times))
    assert fold["train_clips_per_s"] == pytest.approx(fold["num_train"] * 2 / sum(times))


@pytest.mark.slow  # the heads ablation script's smoke test covers multirun by default
def test_multirun_sweeps_heads(tmp_path):
    out = run_train(
        tmp_path, "-m", "experiment=quickstart", *TINY, "trainer.epochs=1", "model.num_heads=1,4"
    )
    runs = run_results(tmp_path)
    assert len(runs) == 2, out.stdout[-2000:]
    heads = sorted(json.loads(p.read_text())["config"]["model"]["num_heads"] for p in runs)
    assert heads == [1, 4]


def test_esc50_without_data_fails_fast_with_instructions(tmp_path):
    out = run_train(tmp_path, "experiment=esc50", "logger=none", check=False, timeout=120)
    assert out.returncode == 2
    err = out.stderr
    assert str(tmp_path / "data" / "ESC-50-master") in err
    assert "python -m scripts.download esc50" in err
    assert not list((tmp_path / "runs").rglob("fold_*"))


def test_bad_model_config_names_the_key(tmp_path):
    out = run_train(tmp_path, "experiment=quickstart", "model.num_heads=3", check=False, timeout=120)
    assert out.returncode == 2
    assert "num_heads" in out.stderr and "not divisible" in out.stderr
    assert "not divisible" not in out.stdout  # once, not again by the log's console handler
    assert not (tmp_path / "cache" / "quickstart").exists()  # failed before any data work
    assert not list((tmp_path / "runs").iterdir())  # nor is a run directory left behind


@pytest.mark.parametrize("module,overrides,needle", [
    ("src.train", ["experiment=quickstart", "model.num_head=4"],
     "model.num_head is not a config key (did you mean model.num_heads?); model has: "),
    ("src.pretrain", ["pretrain.mask.fractoin=0.5"],
     "pretrain.mask.fractoin is not a config key (did you mean pretrain.mask.fraction?)"),
])
def test_an_unknown_override_key_names_its_close_matches(tmp_path, module, overrides, needle):
    out = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT,
                         env=train_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr and "+KEY=VALUE" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("overrides,needle", [
    # a sweep, and a typo next to a group override that changes the keys
    (["-m", "experiment=quickstart", "model.num_heads=1,2", "data.fold=[1]"],
     "data.fold is not a config key (did you mean data.folds"),
    (["trainer.optimizer.amsgard=true"],
     "trainer.optimizer.amsgard is not a config key; trainer.optimizer has: beta_1, "),
    (["model=medium", "model.pos_embeding=grid"],
     "model.pos_embeding is not a config key (did you mean model.pos_embedding?)"),
])
def test_unknown_override_keys_in_sweeps_and_nested_groups(overrides, needle):
    from src.config import unknown_override_keys

    message = unknown_override_keys(overrides, "train")
    assert message is not None and needle in message, message
    assert "+KEY=VALUE" in message


def test_a_sweep_with_a_bad_job_starts_no_job(tmp_path):
    out = run_train(tmp_path, "-m", "experiment=quickstart", *TINY, "model.num_heads=1,3",
                    check=False, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "job #1 of the sweep (" in out.stderr and "so no job was started" in out.stderr
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "cache" / "quickstart").exists()  # no data generated either


@pytest.mark.parametrize("config,overrides,needle", [
    ("train", ["data=folder", "+data.num_fold=4"],
     "+data.num_fold adds a key next to data.num_folds: a misspelling?"),
    ("pretrain", ["+pretrain.mask.fractoin=0.3"],
     "+pretrain.mask.fractoin adds a key next to pretrain.mask.fraction: a misspelling?"),
])
def test_an_added_key_one_letter_from_a_real_one_is_refused(config, overrides, needle):
    from src.config import unknown_override_keys

    message = unknown_override_keys(overrides, config)
    assert message is not None and needle in message, message
    assert f"++{overrides[-1][1:].split('=')[0]}=VALUE to add it anyway" in message
    forced = [o.replace("+", "++", 1) if o.startswith("+") else o for o in overrides]
    assert unknown_override_keys(forced, config) is None  # ++: the user means it


def test_an_added_key_reaches_the_code_that_names_its_options():
    """`+key=value` passes the key check; the optimizer then names its real options."""
    from hydra import compose, initialize_config_dir

    from src.config import unknown_override_keys
    from src.training.optim import build_optimizer

    overrides = ["+trainer.optimizer.amsgard=true"]
    assert unknown_override_keys(overrides, "train") is None
    assert unknown_override_keys(["trainer.optimizer.beta_1=0.95", "model.num_heads=4"],
                                 "train") is None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(ValueError, match=r"trainer\.optimizer\.amsgard is not an option of "
                                         r"adam; its options are"):
        build_optimizer(cfg.trainer.optimizer, 1e-3)


def test_a_missing_pretrained_file_is_a_config_error(tmp_path):
    out = run_train(tmp_path, "experiment=quickstart", *TINY,
                    f"model.pretrained={tmp_path / 'nowhere.keras'}", check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"model.pretrained={tmp_path / 'nowhere.keras'}: no such file" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_fold_is_rejected(tmp_path):
    out = run_train(tmp_path, "experiment=quickstart", *TINY, "data.folds=[7]", check=False)
    assert out.returncode == 2
    assert "data.folds" in out.stderr and "[1, 2, 3, 4, 5]" in out.stderr


def test_resampled_44k_dataset_trains(tmp_path):
    # A user's own tree in ESC-50 layout at 44.1 kHz: resampled in the graph.
    from src.data.synthetic import generate_dataset

    root = generate_dataset(
        tmp_path / "mine", clips_per_class=5, sample_rate=44100, duration=1.0, seed=3
    )
    info = sf.info(next((root / "audio").glob("*.wav")))
    assert info.samplerate == 44100
    run_train(
        tmp_path, "data=esc50", f"data.root={root}", "data.folds=2", *RUN,  # one fold: a number
        "data.name=mine",
    )
    (res,) = run_results(tmp_path)
    r = json.loads(res.read_text())
    assert r["per_fold"][0]["num_test"] == 12 and r["per_fold"][0]["fold"] == 2


def test_wandb_offline_run_logs_config_history_and_summary(tmp_path, monkeypatch):
    from tests.wandb_offline import read_offline_history, read_offline_summary

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # never the internet
    out = run_train(
        tmp_path, "experiment=quickstart", *TINY, "logger=wandb", "logger.project=tests"
    )
    (res,) = run_results(tmp_path)
    r = json.loads(res.read_text())
    (run_dir,) = list((tmp_path / "runs").rglob("offline-run-*"))
    assert f"wandb sync {run_dir}" in out.stdout
    both = out.stdout + out.stderr  # printed once, not again by the log's console handler
    assert "Unable to register" not in both  # TensorFlow's import noise (src.import_tensorflow)
    assert both.count("upload it with") == 1 and both.count("results in ") == 1
    assert "results in " in (res.parent / "train.log").read_text()  # and in the run's log
    summary = read_offline_summary(run_dir)
    assert summary["test/accuracy"] == pytest.approx(r["per_fold"][0]["test_accuracy"])
    fold = json.loads((res.parent / "fold_5" / "results.json").read_text())
    assert summary["confusion_matrix/matrix"] == fold["test_report"]["confusion_matrix"]
    rows = [row for row in read_offline_history(run_dir) if "val_accuracy" in row]
    assert len(rows) == 2
    assert [row["val_accuracy"] for row in rows] == pytest.approx(r["history"]["5"]["val_accuracy"])
    assert all("learning_rate" in row for row in rows)
    assert not any(k.startswith("test") for row in read_offline_history(run_dir) for k in row)
    logged = {k for row in read_offline_history(run_dir) for k in row}
    assert any(k.startswith("attention") for k in logged), sorted(logged)


def _csv_rows(path):
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row.pop("epoch_time_s", None)  # wall time: no two runs share it
    return rows


def test_a_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path):
    """SpecAugment, mixup, dropout and patchout on: SIGKILL after a few epochs, the same
    command again, and every epoch's loss, accuracy, validation metrics and learning rate
    equal those of a run that was never interrupted (the backup restores the random
    generators; the input of the trained epochs is replayed)."""
    args = ["experiment=quickstart", *TINY, "trainer.epochs=10", "data.folds=[5]",
            "augment.mixup=0.5", "model.dropout_rate=0.2",
            "model.pos_embedding=disentangled", "model.patchout.time=1"]
    whole = run_train(tmp_path / "whole", *args)
    (whole_csv,) = (tmp_path / "whole" / "runs").rglob("fold_5/metrics.csv")

    cmd = [sys.executable, "-m", "src.train", *args]
    env = train_env(tmp_path / "killed")
    csv_path = kill_after_epochs(cmd, env, tmp_path / "killed" / "runs", "fold_5/metrics.csv", 3)
    assert csv_path is not None, "the run finished or stalled before it could be killed"
    assert epochs_logged(csv_path) < 10
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    logs = out.stdout + out.stderr
    assert "replaying the input of the" in logs, logs[-3000:]
    assert whole.returncode == 0
    expected, got = _csv_rows(whole_csv), _csv_rows(csv_path)
    assert len(expected) == len(got) == 10
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-7), (
                key, a["epoch"], a[key], b[key])


def test_ctrl_c_says_how_to_resume_instead_of_a_traceback(tmp_path):
    import signal
    import time

    args = [sys.executable, "-m", "src.train", "experiment=quickstart", *TINY,
            "trainer.epochs=40", "name=interrupted"]
    proc = subprocess.Popen(args, cwd=ROOT, env=train_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs" / "interrupted").rglob("metrics.csv"))
        if found and epochs_logged(found[0]) >= 1:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; the run in" in err and "when the same command runs again" in err
    assert "Traceback" not in err


def test_a_ctrl_c_in_a_finalizer_stops_training_without_a_traceback():
    """A Ctrl-C landing in a finalizer (TensorFlow frees traced functions in ``__del__``):
    Python's own handler raises it there, where it is dropped with an "Exception ignored"
    traceback and training goes on; the run's handler remembers it, and training stops."""
    code = textwrap.dedent("""
        import os, signal, sys
        import numpy as np, keras
        from src.training.callbacks import InterruptCheck
        from src.training.rundir import remember_interrupts

        ours = sys.argv[1] == "ours"
        if ours:
            remember_interrupts()

        class Finalizer:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(100000):  # the signal's handler runs in here
                    pass

        Finalizer()
        print("went on", flush=True)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        try:
            model.fit(np.zeros((8, 4)), np.zeros((8, 1)), epochs=2, verbose=0,
                      callbacks=[InterruptCheck()] if ours else [])
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    plain, ours = (subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
                   for mode in ("plain", "ours"))
    assert plain.returncode == 0 and "went on" in plain.stdout  # dropped: training went on
    assert "Exception ignored" in plain.stderr and "KeyboardInterrupt" in plain.stderr
    assert ours.returncode == 130 and "went on" in ours.stdout, ours.stderr[-2000:]
    assert "Traceback" not in ours.stderr and "Exception ignored" not in ours.stderr


def test_killed_run_resumes_with_the_same_command(tmp_path):
    """SIGKILL inside fold 2, rerun the same command: fold 1 is skipped, fold 2 continues,
    and its W&B offline run holds every epoch (the killed process's offline file need
    not: wandb had not written its last rows)."""

    from tests.wandb_offline import read_offline_history

    args = [sys.executable, "-m", "src.train", "experiment=quickstart", *TINY,
            "trainer.epochs=40", "data.folds=[1,2]", "logger=wandb", "logger.project=tests"]
    env = train_env(tmp_path, WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_MODE", None)
    csv_path = kill_after_epochs(args, env, tmp_path / "runs", "fold_2/metrics.csv", 3)
    assert csv_path is not None, "the run finished or stalled before it could be killed"
    run_dir = csv_path.parents[1]
    done_before = epochs_logged(csv_path)
    assert done_before < 40
    assert (run_dir / "fold_1" / "results.json").exists()
    assert not (run_dir / "fold_2" / "results.json").exists()
    fold1_mtime = (run_dir / "fold_1" / "results.json").stat().st_mtime_ns
    meta = run_dir / "fold_2" / "backup" / "training_metadata.json"
    resumed = json.loads(meta.read_text())["epoch"]
    assert done_before - 1 <= resumed <= done_before and resumed >= 2

    wandb_dirs = set((tmp_path / "runs").rglob("offline-run-*"))
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    logs = out.stdout + out.stderr  # Hydra's log handler writes to stdout
    assert "fold 1 already complete" in logs
    # The backup (written after the log row of each epoch) says where it resumed: the
    # last epoch logged, or the one before when the kill came between the two writes.
    assert f"resuming after {resumed} completed epoch(s)" in logs
    assert (run_dir / "fold_1" / "results.json").stat().st_mtime_ns == fold1_mtime
    r = json.loads((run_dir / "results.json").read_text())
    assert [f["fold"] for f in r["per_fold"]] == [1, 2]
    assert r["cv"]["num_folds"] == 2
    hist = r["history"]["2"]
    assert len(hist["val_accuracy"]) == 40
    # The LR schedule continued from the saved optimizer step (2 warmup epochs, then
    # cosine over 40): past the warmup the logged rates fall at every epoch, across the
    # resume too; a restart from scratch would warm up again (rising rates).
    lrs = hist["learning_rate"]
    assert all(b < a for a, b in zip(lrs[2:], lrs[3:])), (resumed, lrs)
    assert not (run_dir / "fold_2" / "backup").exists()
    # The fold's training time counts the epochs of both attempts
    times = hist["epoch_time_s"]
    assert len(times) == 40 and all(t > 0 for t in times)
    fold2 = r["per_fold"][1]
    assert fold2["train_time_s"] == pytest.approx(sum(times))
    assert fold2["train_clips_per_s"] == pytest.approx(fold2["num_train"] * 40 / sum(times))
    # W&B: the resumed fold's offline run logs the epochs before the kill again, and the
    # command printed for it uploads that directory alone.
    fold2_id = (run_dir / "fold_2" / "wandb_run_id").read_text().strip()
    (resumed_dir,) = [d for d in set((tmp_path / "runs").rglob(f"offline-run-*-{fold2_id}"))
                      - wandb_dirs]
    assert f"wandb sync {resumed_dir} (it holds the whole run" in out.stdout
    assert f"logged the {resumed} epoch(s) before the resume again" in logs
    rows = [row for row in read_offline_history(resumed_dir) if "val_accuracy" in row]
    assert [row["epoch"] for row in rows] == list(range(40))
    assert [row["_step"] for row in rows] == list(range(40))
    assert [row["val_accuracy"] for row in rows] == pytest.approx(hist["val_accuracy"])
    assert [row["learning_rate"] for row in rows] == pytest.approx(lrs)


@pytest.mark.slow
def test_changed_config_in_the_same_run_dir_is_refused(tmp_path):
    run_train(tmp_path, "experiment=quickstart", *TINY, "trainer.epochs=1")
    # Same overrides (same directory) but a YAML default changed underneath: here via
    # an env-provided value that is not part of the overrides.
    (run_dir,) = [p.parent for p in run_results(tmp_path)]
    cfg = (run_dir / "config.yaml").read_text().replace("embed_dim: 16", "embed_dim: 24")
    (run_dir / "config.yaml").write_text(cfg)
    out = run_train(tmp_path, "experiment=quickstart", *TINY, "trainer.epochs=1", check=False)
    assert out.returncode == 2
    assert "model.embed_dim" in out.stderr and "trainer.resume=false" in out.stderr
    run_train(tmp_path, "experiment=quickstart", *TINY, "trainer.epochs=1", "trainer.resume=false")
    assert len(list((run_dir / "previous").glob("*/fold_5/results.json"))) == 1


def test_compute_stats_uses_the_training_split_only(tmp_path):
    """The statistics of scripts.compute_stats are those of the training split of the test
    fold (no validation or test clip), after the padding to data.target_frames."""
    from src.data.esc50 import read_esc50
    from src.data.splits import make_splits
    from src.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "set", clips_per_class=5, duration=0.5, seed=1)
    out = subprocess.run(
        [sys.executable, "-m", "scripts.compute_stats", "data=esc50", f"data.root={root}",
         "data.clip_seconds=0.5", "frontend.n_mels=32", "data.target_frames=64",
         f"paths.cache_dir={tmp_path / 'c'}", "--fold", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    index = read_esc50(root)
    splits = make_splits(index, 2, {"val_fraction": 0.1, "split_seed": 0})
    assert stats["clips"] == len(splits.train) == 36 and stats["frames"] == 64
    import tensorflow as tf

    (store,) = list((tmp_path / "c" / "features").glob("esc50-*"))
    feats = {}
    for f in sorted((store / "shards").glob("*.tfrecord")):
        for rec in tf.data.TFRecordDataset(str(f)):
            ex = tf.train.Example.FromString(rec.numpy()).features.feature
            x = np.frombuffer(ex["features"].bytes_list.value[0], "<f4").reshape(-1, 32)
            feats[ex["key"].bytes_list.value[0].decode()] = x
    padded = []
    for i in splits.train:
        x = feats[index.records[i].path]
        padded.append(np.concatenate([x, np.zeros((64 - len(x), 32), np.float32)]))
    x = np.stack(padded).astype(np.float64)
    assert stats["norm_mean"] == pytest.approx(x.mean(), rel=1e-6)
    assert stats["norm_std"] == pytest.approx(x.std(), rel=1e-6)


def test_bad_clip_stops_training_unless_skipped(tmp_path):
    from src.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "set", clips_per_class=5, duration=1.0, seed=4)
    bad = sorted((root / "audio").glob("*.wav"))[7]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: header promises more frames
    args = ["data=esc50", f"data.root={root}", "data.folds=[1]", *RUN]
    out = run_train(tmp_path, *args, check=False)
    assert out.returncode == 2
    assert bad.name in out.stderr and "data.skip_bad_files=true" in out.stderr
    # The report command checks the same files: the command's own data overrides.
    assert f"python -m scripts.check_data data=esc50 data.root={root} 'data.folds=[1]'" in (
        out.stderr)
    assert not run_results(tmp_path)

    # 1 of the 12 clips of its data fold (8%): more than data.max_skipped_fraction=0.05.
    out = run_train(tmp_path, *args, "data.skip_bad_files=true", check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert ("would leave out more unreadable clips than data.max_skipped_fraction=0.05 "
            "allows (data fold ") in out.stderr and "1 of 12 (8.3%)" in out.stderr
    assert not run_results(tmp_path)

    run_train(tmp_path, *args, "data.skip_bad_files=true", "data.max_skipped_fraction=0.1")
    (res,) = run_results(tmp_path)
    r = json.loads(res.read_text())
    assert [s["path"] for s in r["skipped_files"]] == [str(bad)]
    f = r["per_fold"][0]
    assert f["num_train"] + f["num_val"] + f["num_test"] == 59


def test_the_skipped_share_counts_the_folds_the_run_reads():
    """data.max_skipped_fraction is checked per data fold the run reads (train, val and
    test folds), and raising it names no new run directory."""
    from hydra import compose, initialize_config_dir

    from src.data.index import DatasetError, DatasetIndex, Record
    from src.train import _check_skipped_share
    from src.training.rundir import run_dirname

    records = tuple(Record(path=f"/d/{f}-{i}.wav", label=i % 2, fold=f)
                    for f in range(1, 6) for i in range(8))
    index = DatasetIndex(records=records, class_names=("a", "b"), root="/d")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data.train_folds=[4]", "data.folds=[5]"])
    _check_skipped_share(cfg, index, {"/d/1-0.wav", "/d/1-1.wav", "/d/1-2.wav"})  # unread
    with pytest.raises(DatasetError, match=r"data fold 5: 1 of 8 \(12\.5%\)"):
        _check_skipped_share(cfg, index, {"/d/5-0.wav"})
    cfg.data.train_folds = None  # cross-validation: every fold is read
    with pytest.raises(DatasetError, match=r"data fold 1: 3 of 8"):
        _check_skipped_share(cfg, index, {"/d/1-0.wav", "/d/1-1.wav", "/d/1-2.wav"})
    assert run_dirname(["data.max_skipped_fraction=0.5"], list(cfg.run_invariant_keys)) == (
        "default")


@pytest.mark.slow
def test_same_seed_gives_the_same_result(tmp_path):
    results = []
    for name in ("a", "b"):
        run_train(tmp_path, "experiment=quickstart", *TINY, "trainer.epochs=3",
                  "trainer.deterministic=true", f"name={name}")
        (res,) = [p for p in run_results(tmp_path) if p.parts[-3] == name]
        results.append(json.loads(res.read_text()))
    a, b = results
    assert a["history"]["5"]["loss"] == b["history"]["5"]["loss"]
    assert a["per_fold"][0]["test_accuracy"] == b["per_fold"][0]["test_accuracy"]
