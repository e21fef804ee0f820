"""Read an offline W&B run back from its files, for tests.

wandb 0.28 writes no ``files/wandb-summary.json`` for offline runs: everything lives
in the run's ``run-<id>.wandb`` file, an append-only LevelDB-style log of protobuf
``Record`` messages (``history`` records hold one row each; ``summary`` records hold
incremental updates, applied in order). This reads wandb's private format, so it
lives with the tests, which notice when a wandb release changes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _run_dir_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if path.is_file():
        return path.parent
    if path.name == "files" and not any(path.glob("*.wandb")):
        return path.parent
    return path


def _datastore_files(run_dir: str | os.PathLike) -> list[Path]:
    path = Path(run_dir)
    if path.is_file() and path.suffix == ".wandb":
        return [path]
    files = sorted(_run_dir_path(path).glob("*.wandb"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no .wandb datastore file in {run_dir}")
    return files


def _scan_records(path: Path) -> Iterator[Any]:
    """Yield the protobuf ``Record``s of one ``.wandb`` file, stopping at a torn tail."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    def scan(file: Path) -> Iterator[Any]:
        store = DataStore()
        store.open_for_scan(str(file))
        try:
            while True:
                try:
                    data = store.scan_data()
                except Exception as exc:  # truncated or corrupt tail
                    log.warning("stopped reading %s early: %s", file, exc)
                    return
                if data is None:
                    return
                record = wandb_internal_pb2.Record()
                record.ParseFromString(data)
                yield record
        finally:
            store.close()

    if os.access(path, os.W_OK):
        yield from scan(path)
        return
    # DataStore.open_for_scan opens "r+b": read a copy of a read-only file.
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        yield from scan(copy)


def _item_path(item: Any) -> list[str]:
    nested = list(item.nested_key)
    return nested if nested else [item.key]


def _decode(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _set_path(target: dict, path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _remove_path(target: dict, path: list[str]) -> None:
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _wait_until_finished(run_dir: str | os.PathLike, timeout: float) -> None:
    """Wait (up to ``timeout`` s) for the run's ``exit`` record: wandb's service may
    still be flushing the datastore for a moment after ``finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        for file in _datastore_files(run_dir):
            if any(r.WhichOneof("record_type") == "exit" for r in _scan_records(file)):
                return
        if time.monotonic() >= deadline:
            log.warning("%s has no exit record yet; reading what is there", run_dir)
            return
        time.sleep(0.2)


def read_offline_summary(run_dir: str | os.PathLike, wait: float = 10.0) -> dict:
    """The final summary of a run directory (``.../wandb/offline-run-*``).

    Uses ``files/wandb-summary.json`` when present (online runs); otherwise replays
    the ``summary`` records of the run's ``.wandb`` file. Nested keys come back as
    nested dicts.
    """
    summary_file = _run_dir_path(run_dir) / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text(encoding="utf-8"))
    _wait_until_finished(run_dir, wait)
    summary: dict = {}
    for file in _datastore_files(run_dir):
        for record in _scan_records(file):
            if record.WhichOneof("record_type") != "summary":
                continue
            for item in record.summary.update:
                _set_path(summary, _item_path(item), _decode(item.value_json))
            for item in record.summary.remove:
                _remove_path(summary, _item_path(item))
    return summary


def read_offline_history(run_dir: str | os.PathLike, wait: float = 10.0) -> list[dict]:
    """The logged history rows of a run directory, in order.

    Each row holds the logged keys plus wandb's ``_step``, ``_runtime`` and
    ``_timestamp``; logged media appear as their reference dicts.
    """
    _wait_until_finished(run_dir, wait)
    rows: list[dict] = []
    for file in _datastore_files(run_dir):
        for record in _scan_records(file):
            if record.WhichOneof("record_type") != "history":
                continue
            row: dict = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _decode(item.value_json))
            if "_step" not in row and record.history.HasField("step"):
                row["_step"] = record.history.step.num
            rows.append(row)
    return rows


def read_offline_run_id(run_dir: str | os.PathLike, wait: float = 10.0) -> str:
    """The run id stored in the run's ``run`` record."""
    _wait_until_finished(run_dir, wait)
    for file in _datastore_files(run_dir):
        for record in _scan_records(file):
            if record.WhichOneof("record_type") == "run":
                return record.run.run_id
    raise ValueError(f"no run record in {run_dir}")


def read_offline_exit_code(run_dir: str | os.PathLike, wait: float = 10.0) -> int | None:
    """The exit code in the run's ``exit`` record (``None`` when it has none)."""
    _wait_until_finished(run_dir, wait)
    for file in _datastore_files(run_dir):
        for record in _scan_records(file):
            if record.WhichOneof("record_type") == "exit":
                return record.exit.exit_code
    return None
