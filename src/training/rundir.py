"""The run directory: its name, its lock, and what may differ between the commands that
share it.

The same command lands in the same directory (named after its overrides), so a killed
run resumes. Keys that do not change what a fold computes (``run_invariant_keys`` in
conf/train.yaml: where things are written, how a run is logged, which of the folds this
command runs, ...) are left out of the name and out of the check that a resumed run has
the same config. One list, in the config, serves both.

Two processes never work in one run directory at a time: :class:`RunLock` holds an
exclusive ``flock`` on ``<run dir>/.lock`` for the whole run. The operating system drops
the lock when its process dies, so a lock left by a killed run never blocks the resume;
a second live process is told which process holds the directory and exits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from omegaconf import OmegaConf

from src.config import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "RunLock",
    "RunLockedError",
    "is_invariant",
    "prepare_run_dir",
    "run_dirname",
]


def is_invariant(key: str, invariant: Iterable[str]) -> bool:
    """Whether dotted ``key`` is (under) one of the invariant keys. A config group's path
    counts as its dotted key (``hydra/launcher=submitit_slurm`` is under ``hydra``)."""
    key = key.lstrip("+~").replace("/", ".")
    return any(key == k or key.startswith(k + ".") for k in invariant)


def _safe(text: str) -> str:
    """``text`` with every run of characters other than ``A-Za-z0-9=,._+-[]`` as one ``_``."""
    return re.sub(r"[^A-Za-z0-9=,._+\-\[\]]+", "_", text)


def _shown(override: str) -> tuple[bool, str]:
    """An override as a long directory name shows it: ``(is a path, text)``, a path by
    its last part."""
    key, eq, value = override.partition("=")
    path = value.strip("'\"").rstrip("/")
    if "/" in path:
        return True, f"{key}{eq}{path.rsplit('/', 1)[-1]}"
    return False, override


def run_dirname(overrides, invariant: Sequence[str] | None = None) -> str:
    """A directory name for a command's overrides: the overrides that change the run
    (not those under ``invariant``), readable, filesystem-safe, bounded."""
    if isinstance(overrides, str):
        overrides = [o for o in overrides.split(",") if o] if overrides else []
    kept = []
    for o in overrides or []:
        key = str(o).split("=", 1)[0]
        if invariant is not None and is_invariant(key, invariant):
            continue
        kept.append(str(o))
    text = ",".join(sorted(kept)) or "default"
    safe = _safe(text)
    if len(safe) > 100:
        # Too long: the settings first and paths by their last part (data.root=/a/b/ESC-50
        # -> data.root=ESC-50), so the swept values stay readable; the digest of the
        # whole text keeps the name unique.
        parts = sorted(_shown(o) for o in kept)
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        safe = f"{_safe(','.join(p for _, p in parts))[:80]}-{digest}"
    return safe


def sweep_tag(overrides: Sequence[str], config: str | os.PathLike | None = None) -> str:
    """The tag of an experiment script's sweep directory (``runs/<script>/sweep-<tag>``):
    a digest of the overrides that change what the runs compute, sorted, so that the same
    sweep given in another order, or with another ``logger=``, ``data.folds=`` or
    ``trainer.verbose=``, continues in the same directory (a cross-validation split over
    several commands fills one run per setting, as a plain multirun does). The invariant
    keys are ``run_invariant_keys`` of ``config`` (default ``conf/train.yaml``), but
    ``name`` and ``experiment``: another experiment is another sweep."""
    path = Path(config) if config else Path(__file__).resolve().parents[2] / "conf" / "train.yaml"
    invariant = [k for k in OmegaConf.load(path).get("run_invariant_keys", [])
                 if k not in ("name", "experiment")]
    last: dict[str, str] = {}  # a key given twice: the last value wins, as in Hydra
    for o in map(str, overrides):
        key = o.split("=", 1)[0]
        if not is_invariant(key.lstrip("+~"), invariant):
            last[key] = o
    return hashlib.sha1("\n".join(sorted(last.values())).encode()).hexdigest()[:10]


class RunLockedError(ConfigError):
    """Another live process works in the run directory."""


def _in_use(run_dir: Path, holder: str) -> str:
    """The refusal for a run directory whose lock file (content ``holder``) is held."""
    try:
        info = json.loads(holder.strip())
        who = (
            f"process {info.get('pid')} on {info.get('host')} (started "
            f"{info.get('started')}: {info.get('command')})"
        )
    except ValueError:
        who = "another process"
    return (
        f"{run_dir} is in use by {who}. Two runs in one directory would corrupt each "
        "other's checkpoints and logs: wait for it to finish (then this command resumes "
        "or reports its result), or run under another name (name=...)."
    )


def in_use_by(run_dir: str | os.PathLike) -> str | None:
    """The refusal :class:`RunLock` would give for ``run_dir`` now (a live process holds
    its lock), or None; creates nothing."""
    path = Path(run_dir) / ".lock"
    try:
        fh = open(path)  # noqa: SIM115 (closed below; closing drops a lock taken here)
    except OSError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use(path.parent, fh.read())
    finally:
        fh.close()
    return None


class RunLock:
    """An exclusive lock on a run directory for the life of this object (a context
    manager). ``<run dir>/.lock`` says who holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read()
            fh.close()
            raise RunLockedError(_in_use(self.path.parent, holder)) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        }))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run_dir(run_dir: Path, resolved: dict, resume: bool, invariant: Sequence[str]) -> None:
    """Check an existing run dir before reusing it (resume) or move it aside."""
    earlier = sorted(run_dir.glob("fold_*")) + [p for p in [run_dir / "results.json"] if p.exists()]
    if not earlier:
        return
    if not resume:
        dest = run_dir / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
        dest.mkdir(parents=True)
        extra = [run_dir / n for n in ("config.yaml", "wandb_cv_run_id") if (run_dir / n).exists()]
        for p in earlier + extra:
            shutil.move(str(p), dest / p.name)
        log.warning("trainer.resume=false: moved the earlier results of %s to %s", run_dir, dest)
        return
    if not (run_dir / "config.yaml").exists():
        return
    check_same_config(run_dir, resolved, invariant)
    log.info("resuming the run in %s", run_dir)


def check_same_config(
    run_dir: Path, resolved: dict, invariant: Sequence[str], kind: str = "run"
) -> None:
    """Raise ConfigError when ``run_dir/config.yaml`` (if any) differs from ``resolved``
    in a key outside ``invariant``, naming the keys and the way out."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    new = _flatten(resolved)
    # Keys the earlier run did not have are new options at their defaults: not a change.
    diff = sorted(
        k for k in old if not is_invariant(k, invariant) and old.get(k) != new.get(k)
    )
    if not diff:
        return
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
    shared = _shared_name_keys(run_dir.name, diff, old, new)
    if shared:
        both = ", ".join(f"{k}={old.get(k)!r} (the earlier {kind}) and {k}={new.get(k)!r} "
                         f"(this one)" for k in shared)
        raise ConfigError(
            f"{run_dir} holds a {kind} with a different config ({shown}). The two configs "
            f"share the directory name {run_dir.name!r}: the name replaces every "
            f"character of the overrides other than letters, digits and =,._+-[] by '_', "
            f"so {both} give the same name. Give this {kind} a directory of its own "
            f"with hydra.run.dir=<another folder> (hydra.sweep.dir=<another folder> for a "
            f"-m sweep), or with name=<another name>. trainer.resume=false is not the way "
            f"here: it would move the earlier {kind}'s results aside to {run_dir}/previous/ "
            f"and start this one over in their place."
        )
    raise ConfigError(
        f"{run_dir} holds a {kind} with a different config ({shown}). Run with "
        f"trainer.resume=false to start over there (the earlier results are moved to "
        f"{run_dir}/previous/), or change name=... to use another directory."
    )


def _shared_name_keys(dirname: str, diff: Sequence[str], old: dict, new: dict) -> list[str]:
    """The keys of ``diff`` that are in the directory name with two values that the name
    cannot tell apart (``/tmp/a_b`` and ``/tmp/a/b`` both give ``_tmp_a_b``): two
    different commands that landed in one directory."""
    shared = []
    for key in diff:
        named = re.search(r"(?:^|[,+~])" + re.escape(_safe(key)) + "=", dirname)
        if named and _safe(str(old.get(key))) == _safe(str(new.get(key))):
            shared.append(key)
    return shared


def log_to_files(logger: logging.Logger, level: int, text) -> None:
    """``text`` to the log files only (the run's ``train.log``), for a line the command
    also prints: Hydra's console handler would show it a second time."""
    record = logger.makeRecord(logger.name, level, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger().handlers:  # Hydra's: the console and the log file
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def stop_on_error(logger: logging.Logger, err: BaseException, run_dir, runs_dir) -> NoReturn:
    """A command's fatal input error: ``error: ...`` once on stderr, the same line in the
    run's log file (not again on the console, where Hydra's handler writes the log), the
    run directory removed when nothing ran in it; then exit 2."""
    log_to_files(logger, logging.ERROR, err)
    print(f"error: {err}", file=sys.stderr, flush=True)
    remove_if_nothing_ran(run_dir, runs_dir)  # a config error leaves no run
    sys.exit(2)


_interrupt_requested = False


def remember_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt as before, and is also remembered
    (:func:`interrupt_requested`). Python drops an exception raised in a finalizer (a
    ``__del__``, such as TensorFlow's when it frees a traced function) with an "Exception
    ignored" traceback, so a Ctrl-C that lands there would be lost and the run would go
    on: there it is only remembered, and the training loop's
    :class:`~src.training.callbacks.InterruptCheck` raises it at the next step."""
    import signal

    def handler(signum, frame):
        global _interrupt_requested
        _interrupt_requested = True
        while frame is not None:
            if frame.f_code.co_name == "__del__":
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def interrupt_requested() -> bool:
    return _interrupt_requested


def stop_on_interrupt(logger: logging.Logger, run_dir) -> NoReturn:
    """Ctrl-C: one line saying how to go on, instead of a traceback; exit 130."""
    text = (f"interrupted; the run in {run_dir} resumes from its last completed epoch "
            "when the same command runs again")
    log_to_files(logger, logging.WARNING, text)
    print(f"\n{text}", file=sys.stderr, flush=True)
    sys.exit(130)


def remove_if_nothing_ran(run_dir: str | os.PathLike, stop_at: str | os.PathLike) -> bool:
    """Remove the directory Hydra made for a command that stopped before doing anything
    (a config error: only ``.hydra/`` and the log inside), and the parents it leaves
    empty up to ``stop_at`` (the runs folder). A directory with anything else (a lock,
    a config, folds: another command's or an earlier run's) is left as it is."""
    run_dir, stop_at = Path(run_dir).absolute(), Path(stop_at).absolute()
    if not run_dir.is_dir() or stop_at not in run_dir.parents:
        return False
    names = {p.name for p in run_dir.iterdir()}
    if not names <= {".hydra", "train.log", "pretrain.log"}:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != stop_at and stop_at in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True
