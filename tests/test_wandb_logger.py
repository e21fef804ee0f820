"""WandbLogger against real offline W&B runs, read back from the run files."""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

wandb = pytest.importorskip("wandb")

from src.training.wandb_logger import (  # noqa: E402
    WandbLogger,
    has_credentials,
    read_offline_history,
    read_offline_summary,
    resolve_mode,
)

CLASS_NAMES = ["dog_bark", "siren", "rain"]
MATRIX = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 chars, never sent anywhere


@pytest.fixture(autouse=True)
def isolated_wandb(monkeypatch, tmp_path):
    """No credentials, no user config, every wandb path under tmp; W&B torn down afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "WANDB_DISABLED",
        "WANDB_DIR",
        "WANDB_IDENTITY_TOKEN_FILE",
        "NETRC",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    # wandb and its wandb-core service leave socket/port directories under the temp dir.
    service_tmp = tmp_path / "tmp"
    service_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(service_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(service_tmp))
    # Should anything try the network anyway, it fails locally instead of leaving the machine.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    yield
    wandb.teardown()


def _run_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_offline_run_round_trip(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = WandbLogger(
        project="audio-events",
        name="round-trip",
        group="tests",
        job_type="train",
        tags=["unit"],
        mode="offline",
        dir=tmp_path / "runs",
        config=OmegaConf.create({"lr": 1e-3, "model": {"depth": 2, "dim": "${model.depth}"}}),
        notes="offline round trip",
    )
    assert tracker.mode == "offline"
    assert tracker.start()
    assert tracker.enabled
    assert tracker.run.config["model"] == {"depth": 2, "dim": 2}
    run_dir = tracker.run_dir
    assert run_dir is not None
    assert Path(run_dir).name.startswith("offline-run-")
    assert Path(run_dir).is_relative_to(tmp_path / "runs")

    for step in range(3):
        tracker.log({"train/loss": 1.0 / (step + 1), "train/acc": np.float32(0.5)}, step=step)
    tracker.log_summary({"test/accuracy": 0.875, "best_epoch": np.int64(2)})
    tracker.log_confusion_matrix(np.array(MATRIX), CLASS_NAMES, step=2)

    from PIL import Image

    image_path = tmp_path / "spectrogram.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image_path)
    tracker.log_image("spectrogram", image_path, step=2)
    tracker.finish()
    assert not tracker.enabled

    out = capsys.readouterr().out
    assert f"wandb sync {run_dir}" in out

    summary = read_offline_summary(run_dir)
    assert summary["test/accuracy"] == 0.875
    assert summary["best_epoch"] == 2
    assert summary["confusion_matrix/matrix"] == MATRIX
    assert summary["confusion_matrix/class_names"] == CLASS_NAMES
    assert summary["train/loss"] == pytest.approx(1 / 3)

    history = read_offline_history(run_dir)
    assert len(history) == 3
    assert [row["_step"] for row in history] == [0, 1, 2]
    assert [row["train/loss"] for row in history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert all(row["train/acc"] == 0.5 for row in history)
    last = history[-1]
    assert last["spectrogram"]["_type"] == "image-file"
    assert last["confusion_matrix/table"]["_type"] == "table-file"
    assert "confusion_matrix_table" in last  # data of the confusion-matrix chart

    table_file = Path(run_dir) / "files" / last["confusion_matrix/table"]["path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["actual", "predicted", "count"]
    assert ["siren", "dog_bark", 2] in table["data"]
    assert len(table["data"]) == 9
    cells = {(a, p): c for a, p, c in table["data"]}
    assert [[cells[(a, p)] for p in CLASS_NAMES] for a in CLASS_NAMES] == MATRIX


def test_keras_callback_logs_epochs_and_scheduled_learning_rate(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.01, decay_steps=2, decay_rate=0.5
    )
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=(32,))

    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    fit = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tracker.keras_callback()])
    # A second fit continues at the next free step instead of being dropped.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tracker.keras_callback()])
    run_dir = tracker.run_dir
    tracker.finish()

    rows = [row for row in read_offline_history(run_dir) if "loss" in row]
    assert len(rows) == 3
    assert [row["_step"] for row in rows] == [0, 1, 2]
    assert [row["epoch"] for row in rows] == [0, 1, 0]
    assert [row["loss"] for row in rows[:2]] == pytest.approx(fit.history["loss"], rel=1e-6)
    # 2 batches per epoch: lr = 0.01 * 0.5 ** (iterations / 2) after 2, 4 and 6 steps.
    assert [row["learning_rate"] for row in rows] == pytest.approx(
        [0.005, 0.0025, 0.00125], rel=1e-6
    )


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
    tracker.finish()
    assert tracker.run_dir is None
    assert _run_files(root) == []
    assert "wandb sync" not in capsys.readouterr().out


def test_auto_mode_without_credentials_is_offline(monkeypatch):
    assert not has_credentials()
    assert resolve_mode(None) == "offline"
    assert WandbLogger(project="audio-events", mode="auto").mode == "offline"
    assert WandbLogger(project="audio-events").mode == "offline"


def test_mode_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online"  # explicit wins over WANDB_MODE
    assert resolve_mode("dryrun") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"  # except WANDB_MODE=disabled
    monkeypatch.delenv("WANDB_MODE")

    # Credentials in ~/.netrc are found through wandb's own lookup.
    host = "127.0.0.1:9"
    netrc = Path.home() / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    assert has_credentials()
    # With credentials but no reachable server, auto mode still stays offline.
    assert resolve_mode("auto", probe_timeout=1.0) == "offline"
    netrc.unlink()

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert has_credentials()
    assert resolve_mode(None, probe_timeout=1.0) == "offline"


def test_auto_mode_with_credentials_and_reachable_server_is_online(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
        assert resolve_mode("auto", probe_timeout=1.0) == "online"


def test_failed_init_never_raises(tmp_path, caplog):
    # "/" is not allowed in project names: wandb.init raises UsageError.
    tracker = WandbLogger(project="team/audio-events", mode="offline", dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="src.training.wandb_logger"):
        assert tracker.start() is False
    assert "init failed" in caplog.text
    assert not tracker.enabled
    tracker.log({"loss": 1.0}, step=0)
    tracker.log_summary({"accuracy": 0.5})
    tracker.log_confusion_matrix(MATRIX, CLASS_NAMES)
    tracker.log_image("spectrogram", tmp_path / "missing.png")
    tracker.keras_callback().on_epoch_end(0, {"loss": 1.0})
    tracker.finish(exit_code=1)
    assert tracker.start() is False


def test_failure_mid_run_disables_logging(tmp_path, caplog):
    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    tracker.log({"loss": 1.0}, step=0)
    tracker.run.finish()  # the run is closed behind the logger's back
    with caplog.at_level(logging.WARNING, logger="src.training.wandb_logger"):
        tracker.log({"loss": 0.5}, step=1)
    assert "log failed" in caplog.text
    assert not tracker.enabled
    tracker.log_summary({"accuracy": 0.5})
    tracker.log_confusion_matrix(MATRIX, CLASS_NAMES)
    tracker.finish()
    assert [row["loss"] for row in read_offline_history(tracker.run_dir)] == [1.0]


def test_bad_inputs_skip_only_that_call(tmp_path):
    tracker = WandbLogger(project="audio-events", mode="offline", dir=tmp_path)
    assert tracker.start()
    tracker.log_confusion_matrix([[1, 2, 3]], CLASS_NAMES)  # not square
    tracker.log_image("spectrogram", tmp_path / "missing.png")
    assert tracker.enabled
    tracker.log({"loss": 0.25}, step=0)
    tracker.finish()
    history = read_offline_history(tracker.run_dir)
    assert [row["loss"] for row in history] == [0.25]


def test_context_manager_finishes_with_error_code(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with WandbLogger(project="audio-events", mode="offline", dir=tmp_path) as tracker:
            tracker.log({"loss": 2.0}, step=0)
            raise RuntimeError("boom")
    assert not tracker.enabled
    assert read_offline_history(tracker.run_dir)[0]["loss"] == 2.0
