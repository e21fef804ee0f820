"""WandbLogger against real offline W&B runs, read back from the run files.

The W&B environment (HOME, config and temp dirs, no credentials) is set once per
module so the wandb-core service starts once; each test writes its own run
directory under its own tmp_path.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

wandb = pytest.importorskip("wandb")

from src.training import wandb_logger  # noqa: E402
from src.training.wandb_logger import WandbLogger, resolve_mode, run_id_for  # noqa: E402
from tests.wandb_offline import (  # noqa: E402
    read_offline_exit_code,
    read_offline_history,
    read_offline_run_id,
    read_offline_summary,
)

CLASS_NAMES = ["dog_bark", "siren", "rain"]
MATRIX = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 chars, never sent anywhere
LOGGER = "src.training.wandb_logger"
_CLEARED = (
    "WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_DIR", "WANDB_IDENTITY_TOKEN_FILE",
    "NETRC", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
)


@pytest.fixture(scope="module", autouse=True)
def wandb_environment(tmp_path_factory):
    """No credentials, no user config, every wandb path under tmp; torn down at the end."""
    root = tmp_path_factory.mktemp("wandb-env")
    with pytest.MonkeyPatch.context() as mp:
        (root / "home").mkdir()
        mp.setenv("HOME", str(root / "home"))
        for var in _CLEARED:
            mp.delenv(var, raising=False)
        for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            mp.setenv(var, str(root / "wandb-home" / sub))
        # wandb-core leaves socket/port files under the temp dir.
        (root / "tmp").mkdir()
        mp.setenv("TMPDIR", str(root / "tmp"))
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        # Should anything try the network anyway, it fails locally.
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        wandb.teardown()
        yield
        wandb.teardown()


def _run_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """One offline run with every kind of call; read back once for the tests below."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("round-trip")
    tracker = WandbLogger(
        project="audio-events", name="round-trip", group="tests", job_type="train",
        tags=["unit"], mode="offline", dir=tmp / "runs", notes="offline round trip",
        config=OmegaConf.create({"lr": 1e-3, "model": {"depth": 2, "dim": "${model.depth}"}}),
    )
    assert tracker.start()
    state = {"mode": tracker.mode, "config": dict(tracker.run.config), "run_dir": tracker.run_dir}
    for step in range(3):
        tracker.log({"train/loss": 1.0 / (step + 1), "train/acc": np.float32(0.5)}, step=step)
    tracker.log_summary({"test/accuracy": 0.875, "best_epoch": np.int64(2)})
    tracker.log_confusion_matrix(np.array(MATRIX), CLASS_NAMES, step=2)
    image_path = tmp / "spectrogram.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image_path)
    tracker.log_image("spectrogram", image_path, step=2)
    tracker.log_table("per_class_ap", ["class", "AP"],
                      [(name, np.float32(ap)) for name, ap in zip(CLASS_NAMES, [0.5, 0.25, 1.0])],
                      step=2)
    # Bad inputs skip only their own call.
    tracker.log_confusion_matrix([[1, 2, 3]], CLASS_NAMES)
    tracker.log_image("missing", tmp / "missing.png")
    state["enabled_after_bad_inputs"] = tracker.enabled
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tracker.finish()
    state.update(
        out=out.getvalue(), enabled_after_finish=tracker.enabled,
        summary=read_offline_summary(tracker.run_dir),
        history=read_offline_history(tracker.run_dir),
    )
    return state


def test_round_trip_run_dir_config_and_sync_command(round_trip):
    run_dir = Path(round_trip["run_dir"])
    assert round_trip["mode"] == "offline"
    assert run_dir.name.startswith("offline-run-")
    assert run_dir.parent.parent.name == "runs"
    assert round_trip["config"]["model"] == {"depth": 2, "dim": 2}  # resolved
    assert not round_trip["enabled_after_finish"]
    assert f"wandb sync {run_dir}\n" in round_trip["out"]


def test_round_trip_history_and_summary(round_trip):
    summary, history = round_trip["summary"], round_trip["history"]
    assert summary["test/accuracy"] == 0.875
    assert summary["best_epoch"] == 2
    assert summary["train/loss"] == pytest.approx(1 / 3)
    assert len(history) == 3
    assert [row["_step"] for row in history] == [0, 1, 2]
    assert [row["train/loss"] for row in history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert all(row["train/acc"] == 0.5 for row in history)
    assert history[-1]["spectrogram"]["_type"] == "image-file"


def test_round_trip_confusion_matrix(round_trip):
    summary, last = round_trip["summary"], round_trip["history"][-1]
    assert summary["confusion_matrix/matrix"] == MATRIX
    assert summary["confusion_matrix/class_names"] == CLASS_NAMES
    assert last["confusion_matrix/table"]["_type"] == "table-file"
    assert "confusion_matrix_table" in last  # data of the confusion-matrix chart
    table = json.loads(
        (Path(round_trip["run_dir"]) / "files" / last["confusion_matrix/table"]["path"]).read_text()
    )
    assert table["columns"] == ["actual", "predicted", "count"]
    cells = {(a, p): c for a, p, c in table["data"]}
    assert len(table["data"]) == 9
    assert [[cells[(a, p)] for p in CLASS_NAMES] for a in CLASS_NAMES] == MATRIX


def test_round_trip_table(round_trip):
    ref = round_trip["history"][-1]["per_class_ap"]
    assert ref["_type"] == "table-file"
    table = json.loads((Path(round_trip["run_dir"]) / "files" / ref["path"]).read_text())
    assert table["columns"] == ["class", "AP"]
    assert table["data"] == [["dog_bark", 0.5], ["siren", 0.25], ["rain", 1.0]]


def test_bad_inputs_skip_only_that_call(round_trip):
    assert round_trip["enabled_after_bad_inputs"]
    assert round_trip["summary"]["confusion_matrix/matrix"] == MATRIX  # not the bad one
    assert not any("missing" in row for row in round_trip["history"])


def test_keras_callback_logs_the_learning_rate_each_epoch_used(tmp_path):
    """Epoch logs (val_mAP included) become history rows at step=epoch, and the
    learning rate is the one of the epoch's steps, not the next epoch's."""
    import keras

    from src.training.callbacks import LearningRateLogger
    from src.training.optim import EpochSchedule

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (rng.random((32, 3)) < 0.5).astype("float32")  # multi-label targets
    lr, steps = 0.01, 2  # 32 clips, batch 16
    schedule = EpochSchedule(lr, steps, kind="step_decay", decay_start=1, decay_factor=0.5)

    def fit(learning_rate, epochs):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="binary_crossentropy",
                      metrics=[keras.metrics.AUC(curve="PR", multi_label=True, name="mAP")])
        return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, validation_data=(x, y),
                         callbacks=[LearningRateLogger(), tracker.keras_callback()])

    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    fit_history = fit(schedule, 3).history
    fit(0.003, 1)  # a constant rate; a second fit continues at the next free step
    tracker.finish()

    rows = [row for row in read_offline_history(tracker.run_dir) if "loss" in row]
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    assert [row["epoch"] for row in rows] == [0, 1, 2, 0]
    expected = [lr, lr * 0.5, lr * 0.25]
    for epoch in range(3):  # the rate every step of the epoch trained with
        used = [float(schedule(epoch * steps + s)) for s in range(steps)]
        assert used == pytest.approx([expected[epoch]] * steps, rel=1e-6)
    assert [row["learning_rate"] for row in rows] == pytest.approx([*expected, 0.003], rel=1e-6)
    assert fit_history["learning_rate"] == pytest.approx(expected, rel=1e-6)
    assert [row["val_mAP"] for row in rows[:3]] == pytest.approx(fit_history["val_mAP"])
    assert all(0.0 < row["val_mAP"] <= 1.0 for row in rows)


def test_resumed_run_continues_the_same_run_id(tmp_path, capsys):
    id_file = tmp_path / "fold_1" / wandb_logger.RUN_ID_FILE
    run_id = run_id_for(id_file)
    assert id_file.read_text().strip() == run_id
    assert run_id_for(id_file) == run_id  # read back, not created again

    run_dirs = []
    for epoch in range(2):  # an interrupted training, then its resumption
        tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path,
                              run_id=run_id_for(id_file))
        assert tracker.start()
        tracker.log({"loss": 1.0 / (epoch + 1)}, step=epoch)
        tracker.finish()
        run_dirs.append(tracker.run_dir)
    assert len(set(run_dirs)) == 2
    assert [read_offline_run_id(d) for d in run_dirs] == [run_id, run_id]
    out = capsys.readouterr().out
    assert f"wandb sync {run_dirs[0]}\n" in out
    assert f"wandb sync --append {run_dirs[1]}\n" in out  # adds to the first upload
    assert [row["loss"] for row in read_offline_history(run_dirs[1])] == [0.5]


def test_a_resumed_offline_run_logs_the_epochs_before_the_resume_again(tmp_path, capsys):
    """The epochs of metrics.csv (duplicates: the last row wins; Keras' NA cells left out)
    go into the resumed run's directory, which then uploads alone."""
    from src.training.callbacks import csv_log_rows

    id_file = tmp_path / "fold_1" / wandb_logger.RUN_ID_FILE
    csv_path = id_file.parent / "metrics.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("epoch,loss,val_loss\n0,1.0,NA\n1,0.9,NA\n1,0.5,NA\n")
    rows = csv_log_rows(csv_path)
    assert rows == [{"loss": 1.0, "val_loss": None, "epoch": 0},
                    {"loss": 0.5, "val_loss": None, "epoch": 1}]
    first = WandbLogger(project="audio-events", mode="offline", dir=tmp_path,
                        run_id=run_id_for(id_file))
    assert first.start() and first.log_earlier_epochs([]) == 0
    first.log({"loss": 1.0, "epoch": 0}, step=0)  # its later rows are lost (not logged)
    first.finish()
    resumed = WandbLogger(project="audio-events", mode="offline", dir=tmp_path,
                          run_id=run_id_for(id_file))
    assert resumed.start()
    assert resumed.log_earlier_epochs(rows) == 2
    resumed._log_epoch({"loss": 0.25, "epoch": 2}, 2)
    resumed.finish()
    history = read_offline_history(resumed.run_dir)
    assert [(r["epoch"], r["_step"], r["loss"]) for r in history] == [
        (0, 0, 1.0), (1, 1, 0.5), (2, 2, 0.25)]
    assert not any("val_loss" in r for r in history)
    out = capsys.readouterr().out
    assert f"wandb sync {resumed.run_dir} (it holds the whole run" in out
    assert "--append" not in out
    assert csv_log_rows(tmp_path / "missing.csv") == []


def test_resumed_fit_continues_the_run_and_its_schedule(tmp_path, capsys):
    """A fit killed after epoch 1 and resumed from its backup: both W&B run
    directories carry the fold's run id, and the resumed epoch logs the rate the
    schedule gives at its first step (the optimizer step restored from the backup)."""
    import keras

    from src.training.callbacks import AtomicBackupAndRestore, LearningRateLogger
    from src.training.optim import EpochSchedule

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 2, size=(32, 1))
    schedule = EpochSchedule(0.01, 2, kind="step_decay", decay_start=1, decay_factor=0.5)
    id_file, backup = tmp_path / "fold_1" / wandb_logger.RUN_ID_FILE, tmp_path / "fold_1" / "backup"
    run_dirs = []
    for extra in ([Kill()], []):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss="binary_crossentropy")
        tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path,
                              run_id=run_id_for(id_file))
        assert tracker.start()
        callbacks = [LearningRateLogger(), tracker.keras_callback(),
                     AtomicBackupAndRestore(str(backup)), *extra]
        with contextlib.suppress(KeyboardInterrupt):
            model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=callbacks)
        tracker.finish()
        run_dirs.append(tracker.run_dir)

    run_id = id_file.read_text().strip()
    assert [read_offline_run_id(d) for d in run_dirs] == [run_id, run_id]
    assert f"wandb sync --append {run_dirs[1]}\n" in capsys.readouterr().out
    first, resumed = (read_offline_history(d) for d in run_dirs)
    assert [(r["epoch"], r["_step"]) for r in first] == [(0, 0), (1, 1)]
    assert [(r["epoch"], r["_step"]) for r in resumed] == [(2, 2)]
    assert resumed[0]["learning_rate"] == pytest.approx(float(schedule(2 * 2)), rel=1e-6)
    assert resumed[0]["learning_rate"] == pytest.approx(0.0025, rel=1e-6)


def test_run_id_file_is_written_atomically_and_ids_differ(tmp_path):
    first, second = run_id_for(tmp_path / "a" / "id"), run_id_for(tmp_path / "b" / "id")
    assert first != second
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["id", "id"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "id").write_text("\n")  # empty: a new id is stored
    third = run_id_for(tmp_path / "c" / "id")
    assert third and (tmp_path / "c" / "id").read_text().strip() == third


def test_wandb_mode_disabled_in_environment_wins(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = tmp_path / "runs"
    tracker = WandbLogger(project="audio-events", mode="offline", dir=root)
    assert tracker.mode == "disabled"
    assert tracker.start() is False
    assert not tracker.enabled
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_summary({"accuracy": 1.0})
    tracker.log_confusion_matrix(MATRIX, CLASS_NAMES)
    tracker.log_table("t", ["a"], [[1]])
    tracker.finish()
    assert tracker.run_dir is None
    assert _run_files(root) == []
    assert "wandb sync" not in capsys.readouterr().out


def test_mode_resolution(monkeypatch):
    # auto without credentials: offline (wandb.init itself would raise UsageError).
    assert resolve_mode(None) == "offline"
    assert resolve_mode("auto") == "offline"
    assert WandbLogger(project="audio-events").mode == "offline"
    assert resolve_mode("online") == "online"
    assert resolve_mode("disabled") == "disabled"
    # auto with credentials: no mode forced, wandb decides.
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode("auto") is None
    # WANDB_MODE always wins, over explicit modes too.
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("offline") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_run_that_cannot_start_online_is_logged_offline(monkeypatch, tmp_path, caplog, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # rejected by the server
    monkeypatch.setattr(wandb_logger, "_online_failed", False)
    wandb.teardown()  # a fresh wandb setup reads the server URL
    try:
        first = WandbLogger(project="audio-events", dir=tmp_path / "a")
        assert first.mode is None  # credentials found: wandb decides, online
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert first.start()
        assert "could not start online" in caplog.text
        assert first.mode == "offline"
        first.log({"loss": 1.0}, step=0)
        first.finish()
        assert [row["loss"] for row in read_offline_history(first.run_dir)] == [1.0]
        caplog.clear()
        second = WandbLogger(project="audio-events", mode="online", dir=tmp_path / "b")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert second.start()  # straight offline: this process already failed online
        assert caplog.text == ""
        assert second.mode == "offline"
        second.finish()
        assert f"wandb sync {second.run_dir}" in capsys.readouterr().out
    finally:
        server.shutdown()
        wandb.teardown()


def test_failed_init_never_raises(tmp_path, caplog):
    # "/" is not allowed in project names: wandb.init raises UsageError.
    tracker = WandbLogger(project="team/audio-events", mode="offline", dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert tracker.start() is False
    assert caplog.text.count("init failed") == 1
    assert not tracker.enabled
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_summary({"accuracy": 0.5})
    tracker.log_confusion_matrix(MATRIX, CLASS_NAMES)
    tracker.log_image("spectrogram", tmp_path / "missing.png")
    tracker.log_table("t", ["a"], [[1]])
    tracker.keras_callback().on_epoch_end(0, {"loss": 1.0})
    tracker.finish(exit_code=1)
    assert tracker.start() is False


def test_failure_mid_run_disables_logging(tmp_path, caplog):
    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    tracker.log({"loss": 1.0}, step=0)
    tracker.run.finish()  # the run is closed behind the logger's back
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tracker.log({"loss": 0.5}, step=1)
        tracker.log({"loss": 0.25}, step=2)
    assert caplog.text.count("log failed") == 1
    assert not tracker.enabled
    tracker.log_summary({"accuracy": 0.5})
    tracker.log_confusion_matrix(MATRIX, CLASS_NAMES)
    tracker.finish()
    assert [row["loss"] for row in read_offline_history(tracker.run_dir)] == [1.0]


def test_context_manager_finishes_with_error_code(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with WandbLogger(project="audio-events", mode="offline", dir=tmp_path) as tracker:
            tracker.log({"loss": 2.0}, step=0)
            raise RuntimeError("boom")
    assert not tracker.enabled
    assert read_offline_history(tracker.run_dir)[0]["loss"] == 2.0
    assert read_offline_exit_code(tracker.run_dir) == 1


def test_the_sync_command_runs_where_wandb_is_not_on_path(tmp_path, monkeypatch, capsys):
    """A virtual environment used without activating it: `python -m wandb` of this
    interpreter, which `wandb sync` works through."""
    import shlex
    import sys

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    tracker.finish()
    out = capsys.readouterr().out
    assert f"{shlex.quote(sys.executable)} -m wandb sync {tracker.run_dir}\n" in out
    help_text = subprocess.run([sys.executable, "-m", "wandb", "sync", "--help"],
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "Upload existing local W&B run data" in help_text.stdout
