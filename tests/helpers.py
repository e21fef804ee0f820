"""Shared by the tests that run the project's commands in subprocesses."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A model and frontend small enough to train in seconds on 1 s clips.
TINY_MODEL = [
    "data.clip_seconds=1.0",
    "frontend.n_mels=32",
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.ff_dim=32",
    "model.num_layers=1",
    "trainer.verbose=0",
]
# The quickstart set generated small: 12 classes x 5 clips of 1 s. With fold 5 as the
# test split: 36 train, 12 validation (one clip per class carved from folds 1-4), 12 test.
TINY_DATA = ["data.generate.clips_per_class=5", "data.generate.duration=1.0"]


def train_env(tmp: Path, **extra) -> dict:
    """Environment for a run under ``tmp``: its own runs, cache, data and HOME (so no
    W&B credentials are found and the auto mode is offline)."""
    env = dict(os.environ)
    env.update(
        AUDIO_RUNS_DIR=str(tmp / "runs"),
        AUDIO_CACHE_DIR=str(tmp / "cache"),
        AUDIO_DATA_DIR=str(tmp / "data"),
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        HOME=str(tmp / "home"),
    )
    env.update(extra)
    return env


def epochs_logged(csv_path: Path) -> int:
    """Rows of a run's metrics.csv (one per completed epoch)."""
    if not csv_path.exists():
        return 0
    return max(0, len(csv_path.read_text().strip().splitlines()) - 1)


def kill_after_epochs(cmd, env, runs: Path, pattern: str, epochs: int,
                      timeout: float = 240) -> Path | None:
    """Start ``cmd`` and SIGKILL it once the first ``metrics.csv`` under ``runs`` that
    matches ``pattern`` has ``epochs`` rows; that file, or None when the run ended or
    stalled first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            found = list(runs.rglob(pattern))
            if found and epochs_logged(found[0]) >= epochs:
                proc.send_signal(signal.SIGKILL)
                return found[0]
            time.sleep(0.05)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
