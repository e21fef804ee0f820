"""Weights & Biases experiment tracking that never interrupts training.

`WandbLogger` wraps every wandb call: the first failure is logged once and turns
further tracking into a no-op, so a broken network, a bad credential or a wandb bug
can cost the experiment its dashboard but never the training run.

Mode (`resolve_mode`): ``WANDB_MODE`` in the environment always wins (``disabled``
starts nothing); else ``online`` / ``offline`` / ``disabled`` as given; ``auto`` forces
no mode when wandb finds credentials (its own lookup: ``wandb login``, netrc,
``WANDB_API_KEY``) and ``offline`` when it finds none (without credentials and without
a mode, ``wandb.init`` raises ``UsageError: No API key configured``).

An unreachable server: ``wandb.init`` waits without a timeout while wandb-core sets
up the run, retrying its GraphQL requests for many minutes by default, and
``init_timeout`` bounds only the step after that; both are bounded here. A run that
cannot start online starts offline, and so do later runs of the same process.
`finish` prints the ``wandb sync`` command of an offline run. Pass
``run_id=run_id_for(<file>)`` so that a resumed training continues its W&B run, and
give `WandbLogger.log_earlier_epochs` the epochs it trained before, so that the run's
history is whole even when the interrupted process lost its last rows.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
INIT_TIMEOUT_S = 60.0
GRAPHQL_RETRY_MAX = 2

# Quiet and light: no console capture, no system metrics, no hardware probing, plus
# the bounds above. Fields the installed wandb lacks are skipped.
_SETTINGS: dict[str, Any] = dict(
    silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True,
    disable_job_creation=True, init_timeout=INIT_TIMEOUT_S, x_graphql_retry_max=GRAPHQL_RETRY_MAX,
)
_online_failed = False  # set once a run of this process could not start online


def resolve_mode(mode: str | None = None) -> str | None:
    """The ``mode`` for ``wandb.init``: ``online``, ``offline``, ``disabled``, or
    ``None`` to leave the choice to wandb (credentials found, no mode requested)."""
    requested = (os.environ.get("WANDB_MODE", "").strip() or str(mode or "auto")).strip().lower()
    requested = {"dryrun": "offline", "run": "online"}.get(requested, requested)
    if requested == "auto":
        try:  # wandb's own credential lookup; never prompts
            import wandb

            found = bool(os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or wandb.api.api_key)
        except Exception:
            found = False
        return None if found else "offline"
    return requested  # wandb.init rejects an unknown mode (logged, tracking off)


def run_id_for(path: str | os.PathLike) -> str:
    """The W&B run id kept in the file ``path``; a new id is created and stored
    (atomically) when the file is missing or empty."""
    path = Path(path)
    run_id = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if not run_id:
        import wandb

        run_id = wandb.util.generate_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(run_id + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return run_id


def _to_loggable(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; other objects stay as they are."""
    if not isinstance(value, np.ndarray | np.generic) and callable(getattr(value, "numpy", None)):
        try:
            value = np.asarray(value.numpy())
        except Exception:  # not a tensor after all
            return value
    if isinstance(value, np.ndarray | np.generic) and value.ndim == 0:
        return value.item()
    return value


def _plain_config(config: Mapping[str, Any] | None) -> dict | None:
    """A plain dict for ``wandb.init(config=...)``; OmegaConf configs are resolved."""
    if config is None:
        return None
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
        return dict(config)
    except Exception as exc:
        log.warning("W&B: config not logged (%s).", exc)
        return None


def _settings_and_reinit(wandb: Any) -> tuple[Any, Any]:
    """Our settings (those the installed wandb knows) and ``reinit="finish_previous"``
    (spelled ``True`` before wandb 0.19)."""
    fields = getattr(wandb.Settings, "model_fields", None) or {"silent", "console", "init_timeout"}
    reinit = str(getattr(fields.get("reinit"), "annotation", "")) if isinstance(fields, dict) else ""
    settings = wandb.Settings(**{k: v for k, v in _SETTINGS.items() if k in fields})
    return settings, "finish_previous" if "finish_previous" in reinit else True


@functools.cache
def _keras_callback_class() -> type:
    import keras

    class WandbEpochCallback(keras.callbacks.Callback):
        """Logs every epoch's ``logs`` (as they are, ``learning_rate`` included when
        `LearningRateLogger` runs before it) plus ``epoch``; never raises."""

        def __init__(self, tracker: WandbLogger) -> None:
            super().__init__()
            self._tracker = tracker

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            self._tracker._log_epoch({**(logs or {}), "epoch": int(epoch)}, int(epoch))

    return WandbEpochCallback


def _wandb_command() -> str:
    """``wandb`` when it is on PATH; else this interpreter's (a virtual environment that
    is not activated: ``.venv/bin/python -m wandb``)."""
    import shutil

    return "wandb" if shutil.which("wandb") else f"{shlex.quote(sys.executable)} -m wandb"


class WandbLogger:
    """One W&B run. Every wandb call is wrapped: a failure logs one warning and turns
    further calls into no-ops; invalid arguments (a missing image file, a non-square
    matrix) only skip that call."""

    def __init__(
        self,
        *,
        project: str,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: Sequence[str] | None = None,
        mode: str | None = None,
        dir: str | os.PathLike | None = None,  # mirrors wandb.init
        config: Mapping[str, Any] | None = None,
        notes: str | None = None,
        run_id: str | None = None,
    ) -> None:
        self._init_kwargs: dict[str, Any] = dict(
            project=project, entity=entity, name=name, group=group, job_type=job_type,
            tags=list(tags) if tags is not None else None, notes=notes,
            config=_plain_config(config), dir=os.fspath(dir) if dir is not None else None,
            id=run_id, resume="allow" if run_id else None,
        )
        self._mode = resolve_mode(mode)
        self.run: Any = None  # the wandb run, once started
        self.run_dir: str | None = None  # its directory (what `wandb sync` uploads)
        self._offline = self._failed = self._finished = self._last_step_explicit = False
        self._holds_whole_history = False  # an offline run that logged a resumed fit's epochs

    @property
    def enabled(self) -> bool:
        return self.run is not None and not self._failed and not self._finished

    @property
    def mode(self) -> str | None:
        """``online`` / ``offline`` once started; before: `resolve_mode`'s answer."""
        if self.run is not None:
            return "offline" if self._offline else "online"
        return self._mode

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning(
            "W&B %s failed (%s: %s); experiment tracking is disabled for the rest of this run.",
            what, type(exc).__name__, exc,
        )
        self._failed = True

    def _try(self, what: str, call: Callable[[], Any]) -> None:
        if self.enabled:
            try:
                call()
            except Exception as exc:
                self._fail(what, exc)

    def start(self) -> bool:
        """Start the run; ``False`` when tracking is disabled or could not start."""
        global _online_failed
        if self.run is not None or self._mode == "disabled" or self._failed:
            return self.enabled
        mode = "offline" if _online_failed else self._mode
        try:
            run = self._init(mode)
        except (Exception, SystemExit) as exc:
            if mode == "offline":
                self._fail("init", exc)
                return False
            log.warning("W&B could not start online (%s: %s); logging offline.",
                        type(exc).__name__, exc)
            _online_failed = True
            return self.start()
        self.run, self._offline = run, bool(getattr(run, "offline", False))
        try:
            self.run_dir = os.fspath(run.settings.sync_dir)
        except Exception:
            self.run_dir = os.path.dirname(os.path.normpath(run.dir))
        return True

    def _init(self, mode: str | None) -> Any:
        import wandb

        kwargs = {k: v for k, v in self._init_kwargs.items() if v is not None}
        if mode == "offline":
            kwargs.pop("resume", None)  # offline runs keep the id; wandb warns about resume
        if "dir" in kwargs:  # wandb falls back to a temp dir when it is missing
            os.makedirs(kwargs["dir"], exist_ok=True)
        settings, reinit = _settings_and_reinit(wandb)
        run = wandb.init(mode=mode, reinit=reinit, settings=settings, **kwargs)
        if run is None:
            raise RuntimeError("wandb.init returned no run")
        return run

    def finish(self, exit_code: int = 0, stream: Any = None) -> None:
        """Finish the run; for an offline run print the ``wandb sync`` command (to
        ``stream``, default stdout: a command whose stdout is its product, such as a
        table, passes stderr)."""
        if self.run is None or self._finished:
            return
        self._finished = True
        try:
            self.run.finish(exit_code=exit_code)
        except (Exception, SystemExit) as exc:
            log.warning("W&B finish failed (%s: %s).", type(exc).__name__, exc)
        if self._offline and self.run_dir:
            earlier = not self._holds_whole_history and self._resumes_earlier_run()
            command = (f"{_wandb_command()} sync {'--append ' if earlier else ''}"
                       f"{shlex.quote(self.run_dir)}")
            from src.training.rundir import log_to_files

            text = f"W&B run saved offline; upload it with: {command}"
            if self._holds_whole_history:
                text += (" (it holds the whole run, the epochs before the resume included; "
                         "this run's earlier offline directories need no upload)")
            log_to_files(log, logging.INFO, text)  # and once on the terminal:
            print(text, file=stream or sys.stdout, flush=True)

    def _resumes_earlier_run(self) -> bool:
        """Whether another run directory holds this run's id: a resumed run, whose
        offline data is appended to the run that the earlier directory uploads."""
        run_id, own = self._init_kwargs["id"], Path(self.run_dir or "")
        dirs = {p.parent for p in own.parent.glob(f"*/run-{run_id}.wandb")} if run_id else ()
        return any(d != own and not d.is_symlink() for d in dirs)

    def __enter__(self) -> WandbLogger:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)

    def _log(self, payload: dict[str, Any], step: int | None) -> None:
        self.run.log(payload, step=None if step is None else int(step))
        self._last_step_explicit = step is not None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """``run.log(metrics, step=step)``; tensors and numpy scalars become Python numbers."""
        self._try("log", lambda: self._log({str(k): _to_loggable(v) for k, v in metrics.items()},
                                           step))

    def _log_epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        """Log at ``step=epoch`` unless that step is already past (a second ``fit``,
        media logged in between): wandb drops rows below its current step, so those
        go to the next free step; ``metrics["epoch"]`` keeps the epoch."""
        if not self.enabled:
            return
        step = epoch
        try:
            current = int(self.run.step)
            if epoch < current:
                step = current + 1 if self._last_step_explicit else current
        except Exception:  # fall back to the epoch
            pass
        self.log(metrics, step=step)

    def log_earlier_epochs(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Log the epochs of a resumed fit (``rows`` as `callbacks.csv_log_rows` reads
        them from the fold's ``metrics.csv``: ``epoch`` plus what the Keras callback
        logged) that this W&B run lacks, at ``step=epoch``: online, those from the
        run's current step on (the server's copy of a killed process ends where its
        last upload did); offline, all of them, since a resumed offline run writes a
        new directory and a killed process loses the rows wandb had not yet written
        to its offline file. Returns how many rows were logged."""
        if not self.enabled or not rows:
            return 0
        first = 0
        if not self._offline:
            try:
                first = int(self.run.step)
            except Exception:
                first = 0
        todo = [row for row in rows if int(row["epoch"]) >= first]
        for row in todo:
            payload = {str(k): v for k, v in row.items() if v is not None}
            self._try("log", lambda p=payload: self._log(p, int(p["epoch"])))
        if self._offline and todo and self.enabled:
            self._holds_whole_history = int(todo[0]["epoch"]) == 0
        return len(todo) if self.enabled else 0

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Set ``run.summary[k] = v`` for every item."""
        self._try("summary update", lambda: self.run.summary.update(
            {str(k): _to_loggable(v) for k, v in metrics.items()}))

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
        step: int | None = None,
    ) -> None:
        """Log a ``wandb.Table`` (e.g. per-class AP: ``["class", "AP"]``) under ``key``."""
        if not self.enabled:
            return
        try:
            import wandb

            data = [[_to_loggable(v) for v in row] for row in rows]
            table = wandb.Table(columns=[str(c) for c in columns], data=data)
        except Exception as exc:  # bad input: skip this call only
            log.warning("W&B: table %r not logged: %s", key, exc)
            return
        self._try("table logging", lambda: self._log({str(key): table}, step))

    def log_confusion_matrix(
        self,
        matrix: Sequence[Sequence[int]] | np.ndarray,
        class_names: Sequence[str],
        key: str = "confusion_matrix",
        step: int | None = None,
    ) -> None:
        """Log a confusion matrix (rows: actual, columns: predicted) as a table
        ``<key>/table`` (``actual, predicted, count``), as W&B's confusion-matrix chart
        ``<key>`` (data in ``<key>_table``), and as ``<key>/matrix`` (nested list) and
        ``<key>/class_names`` in the summary."""
        if not self.enabled:
            return
        cm, names = np.asarray(matrix), [str(c) for c in class_names]
        if cm.shape != (len(names), len(names)) or cm.dtype.kind not in "iuf":
            log.warning("W&B: confusion matrix %r not logged: expected a numeric %dx%d "
                        "matrix, got shape %s", key, len(names), len(names), cm.shape)
            return
        if cm.dtype.kind == "f" and np.all(np.isfinite(cm)) and np.array_equal(cm, np.round(cm)):
            cm = cm.astype(np.int64)
        values = cm.tolist()
        cells = [[a, p, values[i][j]] for i, a in enumerate(names) for j, p in enumerate(names)]

        def send() -> None:
            import wandb

            chart = wandb.plot_table(
                "wandb/confusion_matrix/v1",
                wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": "Confusion Matrix"},
            )
            table = wandb.Table(columns=["actual", "predicted", "count"], data=cells)
            self._log({f"{key}/table": table, key: chart}, step)
            self.run.summary.update({f"{key}/matrix": values, f"{key}/class_names": names})

        self._try("confusion matrix logging", send)

    def log_image(self, key: str, path: str | os.PathLike, step: int | None = None) -> None:
        """Log an image file (PNG, JPEG, ...) under ``key``."""
        if self.enabled and not os.path.isfile(path):
            log.warning("W&B: image %s not logged: no such file.", path)
            return

        def send() -> None:
            import wandb

            self._log({str(key): wandb.Image(os.fspath(path))}, step)

        self._try("image logging", send)

    def keras_callback(self) -> keras.callbacks.Callback:
        """A Keras callback logging each epoch's logs at ``step=epoch``."""
        return _keras_callback_class()(self)
