"""Weights & Biases experiment tracking that never interrupts training.

`WandbLogger` wraps every wandb call: the first failure is reported once through
`logging` and turns further tracking into a no-op, so a broken network, a bad
credential or a wandb bug can cost the experiment its dashboard but never the
training run itself.

Mode resolution (see `resolve_mode`):

* ``WANDB_MODE=disabled`` (or a truthy ``WANDB_DISABLED``) in the environment always
  disables tracking.
* An explicit ``mode="online" | "offline" | "disabled"`` wins over everything else.
* ``mode=None`` / ``"auto"``: ``WANDB_MODE`` if set; otherwise ``"online"`` when W&B
  credentials are available *and* the W&B server answers a short TCP probe,
  else ``"offline"``. (With credentials but no route to the server, ``wandb.init``
  in online mode blocks for minutes in its retry loop, so an unreachable server
  is treated like missing credentials.)

Offline runs are written under ``<dir>/wandb/offline-run-<time>-<id>/`` and can be
uploaded later with ``wandb sync <run_dir>``; `finish` prints that command.

`read_offline_summary` / `read_offline_history` read a run back from its files.
wandb 0.28 writes no ``files/wandb-summary.json`` for offline runs: everything lives
in the run's ``run-<id>.wandb`` file, an append-only LevelDB-style log of protobuf
``Record`` messages (``history`` records hold one row each; ``summary`` records hold
incremental updates, applied in order).
"""

from __future__ import annotations

import configparser
import functools
import json
import logging
import os
import shlex
import shutil
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"
VALID_MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_TRUTHY = {"1", "true", "yes", "on"}

# Keep wandb quiet and light: no console capture, no system-metrics sampling,
# no hardware probing. Fields missing from the installed wandb are skipped.
_QUIET_SETTINGS: dict[str, Any] = {
    "silent": True,
    "console": "off",
    "x_disable_stats": True,
    "x_disable_machine_info": True,
    "disable_job_creation": True,
}


# --------------------------------------------------------------------------- mode


def _normalize_mode(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    return _MODE_ALIASES.get(text, text)


def wandb_base_url() -> str:
    """The W&B server URL: ``WANDB_BASE_URL``, else the wandb settings file, else the cloud."""
    env_url = os.environ.get("WANDB_BASE_URL", "").strip()
    if env_url:
        return env_url.rstrip("/")
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    settings_file = Path(config_dir).expanduser() / "settings"
    try:
        parser = configparser.ConfigParser()
        parser.read(settings_file)
        url = parser.get("default", "base_url", fallback="").strip()
        if url:
            return url.rstrip("/")
    except (configparser.Error, OSError, UnicodeDecodeError):
        log.debug("could not read %s", settings_file, exc_info=True)
    return DEFAULT_BASE_URL


def _netrc_has_key(base_url: str) -> bool:
    import netrc

    netloc = urlsplit(base_url).netloc
    if not netloc:
        return False
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    if not path.is_file():
        return False
    try:
        creds = netrc.netrc(str(path)).authenticators(netloc)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(creds and creds[2])


def has_credentials(base_url: str | None = None) -> bool:
    """Whether an API key for the W&B server is available without prompting.

    Looks at ``WANDB_API_KEY``, then asks wandb's own lookup (in-process login,
    ``~/.netrc`` / ``$NETRC``, settings), then parses the netrc file directly.
    Never raises.
    """
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = base_url or wandb_base_url()
    try:
        import wandb

        api = getattr(wandb, "api", None)
        if api is not None and api.api_key:
            return True
    except Exception:  # any lookup failure means "no usable key"
        log.debug("wandb api-key lookup failed", exc_info=True)
    try:
        from wandb.sdk.lib import wbauth

        if wbauth.read_netrc_auth(host=host):
            return True
    except Exception:
        log.debug("wandb netrc lookup failed", exc_info=True)
    try:
        return _netrc_has_key(host)
    except Exception:
        return False


def server_reachable(base_url: str | None = None, timeout: float = 3.0) -> bool:
    """Quick TCP probe of the W&B server (or of the configured HTTP(S) proxy)."""
    url = base_url or wandb_base_url()
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host = proxy_parts.hostname
            try:
                port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
            except ValueError:
                return False

    reached: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                reached.append(True)
        except OSError:
            pass

    # A thread bounds the total time, DNS resolution included.
    worker = threading.Thread(target=attempt, name="wandb-reachability", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return bool(reached)


def resolve_mode(mode: str | None = None, *, probe_timeout: float = 3.0) -> str:
    """Resolve the requested mode to one of ``online``, ``offline``, ``disabled``."""
    env_mode = _normalize_mode(os.environ.get("WANDB_MODE"))
    if env_mode == "disabled":
        return "disabled"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUTHY:
        return "disabled"

    requested = _normalize_mode(mode)
    if requested in VALID_MODES:
        return requested
    if requested not in (None, "auto"):
        log.warning("Unknown W&B mode %r; choosing the mode automatically.", mode)

    if env_mode in VALID_MODES:
        return env_mode
    if env_mode is not None:
        log.warning("Ignoring unknown WANDB_MODE=%r.", os.environ.get("WANDB_MODE"))

    base_url = wandb_base_url()
    if not has_credentials(base_url):
        return "offline"
    if not server_reachable(base_url, timeout=probe_timeout):
        log.warning("W&B server %s is unreachable; logging offline.", base_url)
        return "offline"
    return "online"


# ------------------------------------------------------------------------ helpers


def _to_loggable(value: Any) -> Any:
    """Turn tensors / numpy scalars into plain Python values; leave other objects alone."""
    if isinstance(value, np.ndarray | np.generic):
        return value.item() if value.ndim == 0 else value
    if hasattr(value, "numpy") and callable(value.numpy):
        try:
            array = np.asarray(value.numpy())
        except Exception:  # not a tensor after all
            return value
        return array.item() if array.ndim == 0 else array
    return value


def _current_learning_rate(optimizer: Any) -> float | None:
    """The optimizer's learning rate now; schedules are evaluated at ``optimizer.iterations``."""
    lr = getattr(optimizer, "learning_rate", None)
    if lr is None:
        lr = getattr(optimizer, "lr", None)
    if lr is None:
        return None
    try:
        import keras

        schedule_type: tuple[type, ...] = (keras.optimizers.schedules.LearningRateSchedule,)
    except Exception:
        schedule_type = ()
    if isinstance(lr, schedule_type):
        lr = lr(optimizer.iterations)
    elif callable(lr) and not hasattr(lr, "numpy"):
        lr = lr()
    value = _to_loggable(lr)
    return float(np.asarray(value))


def _plain_config(config: Mapping[str, Any] | None) -> dict | None:
    """A plain dict for ``wandb.init(config=...)``; Hydra/OmegaConf configs are resolved."""
    if config is None:
        return None
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
    except Exception as exc:
        log.warning("W&B: could not resolve the config (%s); logging it unresolved.", exc)
    try:
        return dict(config)
    except Exception as exc:
        log.warning("W&B: config is not a mapping (%s); not logged.", exc)
        return None


def _settings_kwargs(wandb: Any) -> dict[str, Any]:
    fields = getattr(wandb.Settings, "model_fields", None)
    if fields is None:
        return {"silent": True}
    return {key: value for key, value in _QUIET_SETTINGS.items() if key in fields}


def _reinit_value(wandb: Any) -> Any:
    """``"finish_previous"`` (the 0.2x spelling of the deprecated ``reinit=True``)."""
    fields = getattr(wandb.Settings, "model_fields", None) or {}
    field = fields.get("reinit")
    if field is not None and "finish_previous" in str(field.annotation):
        return "finish_previous"
    return True


@functools.cache
def _keras_callback_class() -> type:
    import keras

    class WandbEpochCallback(keras.callbacks.Callback):
        """Logs every epoch's ``logs`` plus ``learning_rate`` and ``epoch``; never raises."""

        def __init__(self, tracker: WandbLogger) -> None:
            super().__init__()
            self._tracker = tracker

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            if not self._tracker.enabled:
                return
            metrics: dict[str, Any] = {}
            try:
                metrics.update({str(k): _to_loggable(v) for k, v in (logs or {}).items()})
            except Exception as exc:
                log.warning("W&B: could not read epoch logs: %s", exc)
            try:
                lr = _current_learning_rate(self.model.optimizer)
                if lr is not None:
                    metrics["learning_rate"] = lr
            except Exception as exc:
                log.warning("W&B: could not read the learning rate: %s", exc)
            metrics["epoch"] = int(epoch)
            self._tracker._log_epoch(metrics, int(epoch))

    return WandbEpochCallback


# ------------------------------------------------------------------------- logger


class WandbLogger:
    """Experiment tracking that can never crash training.

    Every wandb call is wrapped; a failure logs a warning via `logging` and
    disables further logging. Invalid arguments to a single call (a missing image
    file, a non-square matrix) only skip that call.
    """

    def __init__(
        self,
        *,
        project: str,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        dir: str | os.PathLike | None = None,  # mirrors wandb.init
        config: Mapping[str, Any] | None = None,
        notes: str | None = None,
    ) -> None:
        self._init_kwargs: dict[str, Any] = {
            "project": project,
            "entity": entity,
            "name": name,
            "group": group,
            "job_type": job_type,
            "tags": list(tags) if tags is not None else None,
            "notes": notes,
            "config": _plain_config(config),
            "dir": os.fspath(dir) if dir is not None else None,
        }
        try:
            self._mode = resolve_mode(mode)
        except Exception as exc:
            log.warning("W&B: could not resolve the mode (%s); logging offline.", exc)
            self._mode = "offline"
        self._run: Any = None
        self._run_dir: str | None = None
        self._failed = False
        self._finished = False
        self._last_step_explicit = False

    # ----------------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        return self._run is not None and not self._failed and not self._finished

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def run_dir(self) -> str | None:
        return self._run_dir

    @property
    def run(self) -> Any:
        """The underlying ``wandb`` run (``None`` before `start` or when disabled)."""
        return self._run

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning(
            "W&B %s failed (%s: %s); experiment tracking is disabled for the rest of this run.",
            what,
            type(exc).__name__,
            exc,
        )
        self._failed = True

    # ------------------------------------------------------------- lifecycle

    def start(self) -> bool:
        """Start the run; ``False`` when tracking is disabled or ``wandb.init`` failed."""
        if self._run is not None:
            return self.enabled
        if self._mode == "disabled" or self._failed:
            return False
        if self._init_kwargs["dir"] is not None:
            try:
                os.makedirs(self._init_kwargs["dir"], exist_ok=True)
            except OSError as exc:
                log.warning("W&B: cannot create %s (%s).", self._init_kwargs["dir"], exc)
        try:
            import wandb

            kwargs = {k: v for k, v in self._init_kwargs.items() if v is not None}
            run = wandb.init(
                mode=self._mode,
                reinit=_reinit_value(wandb),
                settings=wandb.Settings(**_settings_kwargs(wandb)),
                **kwargs,
            )
        except (Exception, SystemExit) as exc:  # never propagate into training
            self._fail("init", exc)
            return False
        if run is None:
            self._fail("init", RuntimeError("wandb.init returned no run"))
            return False
        self._run = run
        self._run_dir = self._find_run_dir(run)
        return True

    @staticmethod
    def _find_run_dir(run: Any) -> str | None:
        try:
            sync_dir = getattr(run.settings, "sync_dir", None)
            if sync_dir:
                return os.fspath(sync_dir)
        except Exception:
            pass
        try:
            return os.path.dirname(os.path.normpath(run.dir))
        except Exception:
            return None

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run; for offline runs print the ``wandb sync`` command to upload it."""
        run = self._run
        if run is None or self._finished:
            return
        self._finished = True
        try:
            run.finish(exit_code=exit_code)
        except (Exception, SystemExit) as exc:
            log.warning("W&B finish failed (%s: %s).", type(exc).__name__, exc)
        if self._mode == "offline" and self._run_dir:
            command = f"wandb sync {shlex.quote(self._run_dir)}"
            log.info("W&B run saved offline; upload it with: %s", command)
            print(f"W&B run saved offline; upload it with: {command}", flush=True)

    def __enter__(self) -> WandbLogger:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)

    # --------------------------------------------------------------- logging

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """``run.log(metrics, step=step)``; tensors and numpy scalars become Python numbers."""
        if not self.enabled:
            return
        try:
            payload = {str(k): _to_loggable(v) for k, v in metrics.items()}
            if step is None:
                self._run.log(payload)
            else:
                self._run.log(payload, step=int(step))
            self._last_step_explicit = step is not None
        except Exception as exc:
            self._fail("log", exc)

    def _log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        """Log at ``step=epoch`` unless that step is already past (e.g. a second ``fit``).

        wandb drops rows whose step is below the current one, so later fits continue
        at the next free step; ``metrics["epoch"]`` keeps the real epoch.
        """
        if not self.enabled:
            return
        step = epoch
        try:
            current = int(self._run.step)
            if epoch < current:
                step = current + 1 if self._last_step_explicit else current
        except Exception:  # fall back to the epoch
            pass
        self.log(metrics, step=step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Set ``run.summary[k] = v`` for every item."""
        if not self.enabled:
            return
        try:
            self._run.summary.update({str(k): _to_loggable(v) for k, v in metrics.items()})
        except Exception as exc:
            self._fail("summary update", exc)

    def log_confusion_matrix(
        self,
        matrix: Sequence[Sequence[int]] | np.ndarray,
        class_names: Sequence[str],
        key: str = "confusion_matrix",
        step: int | None = None,
    ) -> None:
        """Log a precomputed confusion matrix (rows: actual class, columns: predicted).

        Written as a table ``<key>/table`` (columns ``actual, predicted, count``), as
        W&B's confusion-matrix chart under ``<key>`` (the chart's data shows up as
        ``<key>_table``), and into the summary as ``<key>/matrix`` (nested list) and
        ``<key>/class_names``.
        """
        if not self.enabled:
            return
        try:
            cm = np.asarray(matrix)
            names = [str(c) for c in class_names]
            if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(names):
                raise ValueError(
                    f"expected a square matrix matching {len(names)} class names, "
                    f"got shape {cm.shape}"
                )
            if not np.issubdtype(cm.dtype, np.number):
                raise ValueError(f"matrix must be numeric, got dtype {cm.dtype}")
        except Exception as exc:  # bad input: skip this call only
            log.warning("W&B: confusion matrix %r not logged: %s", key, exc)
            return
        if np.issubdtype(cm.dtype, np.floating) and np.all(np.isfinite(cm)):
            if np.array_equal(cm, np.round(cm)):
                cm = cm.astype(np.int64)
        values = cm.tolist()
        cells = [
            [names[i], names[j], values[i][j]] for i in range(len(names)) for j in range(len(names))
        ]
        try:
            import wandb

            payload: dict[str, Any] = {
                f"{key}/table": wandb.Table(columns=["actual", "predicted", "count"], data=cells)
            }
            chart = _confusion_matrix_chart(wandb, names, cm, cells)
            if chart is not None:
                payload[key] = chart
            if step is None:
                self._run.log(payload)
            else:
                self._run.log(payload, step=int(step))
            self._last_step_explicit = step is not None
            self._run.summary.update({f"{key}/matrix": values, f"{key}/class_names": names})
        except Exception as exc:
            self._fail("confusion matrix logging", exc)

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Log an image file (PNG, JPEG, ...) under ``key``."""
        if not self.enabled:
            return
        if not os.path.isfile(path):
            log.warning("W&B: image %s not logged: no such file.", path)
            return
        try:
            import wandb

            payload = {str(key): wandb.Image(os.fspath(path))}
            if step is None:
                self._run.log(payload)
            else:
                self._run.log(payload, step=int(step))
            self._last_step_explicit = step is not None
        except Exception as exc:
            self._fail("image logging", exc)

    def keras_callback(self) -> keras.callbacks.Callback:
        """A Keras callback logging epoch metrics and the learning rate at ``step=epoch``."""
        return _keras_callback_class()(self)


def _confusion_matrix_chart(
    wandb: Any, names: list[str], cm: np.ndarray, cells: list[list[Any]]
) -> Any:
    """The chart `wandb.plot.confusion_matrix` builds, made from counts instead of labels."""
    try:
        plot_table = getattr(wandb, "plot_table", None)
        if plot_table is not None:
            return plot_table(
                vega_spec_name="wandb/confusion_matrix/v1",
                data_table=wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
                fields={
                    "Actual": "Actual",
                    "Predicted": "Predicted",
                    "nPredictions": "nPredictions",
                },
                string_fields={"title": "Confusion Matrix"},
            )
        # Older wandb: expand the counts back into label lists.
        if not np.issubdtype(cm.dtype, np.integer) or cm.min() < 0 or cm.sum() > 1_000_000:
            return None
        indices = np.arange(len(names))
        y_true = np.repeat(np.repeat(indices, len(names)), cm.ravel()).tolist()
        preds = np.repeat(np.tile(indices, len(names)), cm.ravel()).tolist()
        return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=names)
    except Exception as exc:  # the table and summary are still logged
        log.warning("W&B: confusion-matrix chart skipped: %s", exc)
        return None


# ------------------------------------------------------------------ reading back


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


def _wait_until_finished(run_dir, timeout: float) -> None:
    """Wait (up to ``timeout`` s) for the run's ``exit`` record: wandb's service may still
    be flushing the datastore for a moment after ``finish()`` returns."""
    import time

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
    the ``summary`` records of the run's ``.wandb`` file, as wandb 0.28 offline runs
    have no summary file. Nested keys come back as nested dicts.
    """
    summary_file = _run_dir_path(run_dir) / "files" / "wandb-summary.json"
    if summary_file.is_file():
        try:
            return json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s (%s); reading the datastore instead", summary_file, exc)
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
