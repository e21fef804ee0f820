"""Config validation: fail before any work, naming the key and the fix."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

_CONF = Path(__file__).resolve().parent.parent / "conf"

DATA_FORMATS = ("synthetic", "esc50", "speech_commands", "urbansound8k", "audioset", "fsd50k",
                "folder", "synthetic_tagging")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def fit_verbosity(value) -> int:
    """``trainer.verbose`` as Keras' ``fit(verbose=)``: ``auto`` is progress bars on a
    terminal and one line per epoch otherwise (a log file or a cluster job's output,
    where each bar update would be a line of its own)."""
    if value == "auto":
        return 1 if sys.stdout.isatty() else 2
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise ConfigError(
            f"trainer.verbose={value!r} is unknown; use auto (bars on a terminal, a line "
            "per epoch in a log), 0 (silent), 1 (progress bars) or 2 (a line per epoch)."
        )
    return int(value)


def positive_key(cfg: DictConfig, dotted: str, integer=True):
    """The value of the dotted key ``dotted``: a positive (whole, with ``integer``) number,
    else a :class:`ConfigError` naming the key."""
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    if node is None:
        raise ConfigError(f"missing config key {dotted}.")
    what = "a whole number" if integer else "a number"
    try:
        if isinstance(node, bool):
            raise TypeError
        value = float(node)
    except (TypeError, ValueError):
        raise ConfigError(f"{dotted} must be {what}, got {node!r}.") from None
    if integer:
        if value != int(value):
            raise ConfigError(f"{dotted} must be {what}, got {node!r}.")
        value = int(value)
    if value <= 0:
        raise ConfigError(f"{dotted} must be positive, got {node!r}.")
    return value


# Whole-number keys of the transformer models, checked before the model is built (its
# own error for model.num_heads=two would not name the key).
_MODEL_INTS = ("embed_dim", "num_layers", "num_heads", "ff_dim", "patch_size", "stride",
               "f_stride", "t_stride")


def _check_store_content(cfg: DictConfig) -> None:
    """``data.store.content`` and ``augment.mixup_domain`` must fit together: waveform
    mixup needs the waveform store's batches, power / logmel mixup the feature store's."""
    from src.data.store import CONTENTS
    from src.training.mixup import DOMAINS

    content = (cfg.data.get("store") or {}).get("content", "features")
    if content not in CONTENTS:
        raise ConfigError(
            f"data.store.content={content!r} is unknown; use one of {CONTENTS}."
        )
    augment = cfg.get("augment") or {}
    domain = augment.get("mixup_domain", "power")
    if domain not in DOMAINS:
        raise ConfigError(f"augment.mixup_domain={domain!r} is unknown; use one of {DOMAINS}.")
    if domain == "waveform" and content != "waveform":
        raise ConfigError(
            f"augment.mixup_domain=waveform mixes waveforms, but data.store.content={content} "
            "feeds log-mel features to training; set data.store.content=waveform (or "
            "augment.mixup_domain=power / logmel)."
        )
    mixup = float(augment.get("mixup", 0.0) or 0.0)
    if content == "waveform" and mixup > 0 and domain != "waveform":
        raise ConfigError(
            f"augment.mixup_domain={domain} mixes log-mel features, but "
            "data.store.content=waveform feeds waveforms to training; set "
            "augment.mixup_domain=waveform (or data.store.content=features)."
        )


def _check_folder_training(d) -> None:
    """A folder of audio (``data=folder``) trains only with labels and more than one fold;
    said before any file is decoded."""
    if d.get("format") != "folder":
        return
    if not d.get("labels_from_subdirs", False):
        raise ConfigError(
            f"data=folder at {d.get('root')} has no labels (data.labels_from_subdirs=false): "
            "training needs classes. Set data.labels_from_subdirs=true for ROOT/<class>/"
            "*.wav, or pretrain on unlabeled audio with `python -m src.pretrain "
            "experiment=ssast data=folder data.root=...`."
        )
    num_folds = int(d.get("num_folds", 1) or 1)
    if num_folds < 2:
        raise ConfigError(
            f"data.num_folds={num_folds}: the folder's clips are in one fold, so testing on "
            "it leaves none to train on. Deal them into folds, e.g. data.num_folds=5 "
            "data.folds=[1,2,3,4,5] (5-fold cross-validation) or data.num_folds=5 "
            "data.folds=[5] (one split)."
        )


def validate_config(cfg: DictConfig, training: bool = True) -> None:
    """Cheap checks of a composed config, including building the model once.
    ``training=False``: the checks that pretraining on unlabeled audio shares."""
    if cfg.data.get("format") not in DATA_FORMATS:
        raise ConfigError(
            f"data.format={cfg.data.get('format')!r} is unknown; use one of {DATA_FORMATS}."
        )
    if not cfg.data.get("folds"):
        raise ConfigError("data.folds is empty; list the test folds to run, e.g. [1].")
    from src.data.splits import check_split_config

    check_split_config(cfg.data)
    if training:
        _check_folder_training(cfg.data)
        if cfg.data.get("samples_per_epoch") is not None:
            positive_key(cfg, "data.samples_per_epoch")
            if not cfg.data.get("balanced_sampling", False):
                raise ConfigError(
                    f"data.samples_per_epoch={cfg.data.samples_per_epoch} is read only with "
                    "data.balanced_sampling=true (clips drawn per epoch); without it an "
                    "epoch is one pass over the training split. Add "
                    "data.balanced_sampling=true, or leave data.samples_per_epoch=null."
                )
        skipped = cfg.data.get("max_skipped_fraction", 0.05)
        try:
            ok = not isinstance(skipped, bool) and 0.0 <= float(skipped) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"data.max_skipped_fraction={skipped!r}: a fraction between 0 "
                              "and 1 of a data fold (default 0.05).")
    verify = (cfg.data.get("store") or {}).get("verify", "auto")
    if verify not in ("auto", "always", "never"):
        raise ConfigError(f"data.store.verify={verify!r} is unknown; use auto, always or never.")
    _check_store_content(cfg)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size",
                "data.sample_rate"):
        positive_key(cfg, key)
    for key in _MODEL_INTS:
        if cfg.model.get(key) is not None:
            positive_key(cfg, f"model.{key}")
    epochs = int(cfg.trainer.epochs)
    for key in ("average_epochs", "ensemble_epochs"):
        value = cfg.trainer.get(key)
        if value is None:
            continue
        try:
            a, b = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"trainer.{key}={value!r}: expected [first, last] epochs, e.g. [1, 5]."
            ) from None
        if not 1 <= a <= b <= epochs:
            raise ConfigError(
                f"trainer.{key}=[{a}, {b}] must satisfy 1 <= first <= last <= "
                f"trainer.epochs={epochs}."
            )
    from src.training.optim import build_optimizer

    try:  # every optimizer key must mean something to the chosen optimizer
        build_optimizer(cfg.trainer.optimizer, float(cfg.trainer.optimizer.lr))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    patience = cfg.trainer.get("early_stopping_patience")
    if patience is not None and (isinstance(patience, bool) or int(patience) < 1):
        raise ConfigError(
            f"trainer.early_stopping_patience={patience!r}: use a positive number of epochs "
            "or null (off)."
        )
    positive_key(cfg, "data.clip_seconds", integer=False)
    positive_key(cfg, "trainer.optimizer.lr", integer=False)
    fit_verbosity(cfg.trainer.get("verbose", "auto"))
    exact = cfg.trainer.get("exact_resume", "auto")
    if str(exact).strip().lower() not in ("auto", "true", "false"):
        raise ConfigError(f"trainer.exact_resume={exact!r} is unknown; use auto, true or false.")
    warmup = float((cfg.trainer.get("schedule") or {}).get("warmup_epochs") or 0.0)
    if warmup >= epochs > 0:
        log.warning(
            "trainer.schedule.warmup_epochs=%g >= trainer.epochs=%d: the learning rate is "
            "still warming up when training ends and never reaches trainer.optimizer.lr=%g; "
            "lower trainer.schedule.warmup_epochs or train longer.",
            warmup, epochs, float(cfg.trainer.optimizer.lr),
        )
    if int(cfg.frontend.sample_rate) != int(cfg.data.sample_rate):
        raise ConfigError(
            f"frontend.sample_rate={cfg.frontend.sample_rate} differs from data.sample_rate="
            f"{cfg.data.sample_rate}; leave frontend.sample_rate at its default "
            "(${data.sample_rate})."
        )
    if cfg.model.get("pretrained") and cfg.model.get("type", "transformer") != "transformer":
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained} needs a transformer model, not "
            f"model.type={cfg.model.get('type')}; set model.pretrained=null."
        )
    adapt = cfg.model.get("pretrained_adapt", "auto")
    from src.models.pretrained import ADAPT_METHODS

    if adapt not in ADAPT_METHODS:
        raise ConfigError(
            f"model.pretrained_adapt={adapt!r} is unknown; use one of {ADAPT_METHODS}."
        )
    # Building the model validates its shape (heads vs width, patches vs
    # spectrogram, unknown keys) in well under a second, before any data work.
    from src.models.build import build_model

    clip_samples = int(round(float(cfg.data.clip_seconds) * int(cfg.data.sample_rate)))
    try:
        build_model(
            cfg.model, cfg.frontend, num_classes=2, clip_samples=clip_samples,
            augment_cfg=cfg.augment,
            target_frames=cfg.data.get("target_frames"),
        )
    except ValueError as err:
        raise ConfigError(f"invalid model/frontend config: {err}") from None


def _override_args(argv) -> list[str]:
    """The overrides of a command line: ``key=value`` forms and ``~key`` deletions."""
    return [str(a) for a in argv
            if not str(a).startswith("-") and ("=" in str(a) or str(a).startswith("~"))]


def _command_overrides(argv):
    """Hydra's parsed ``key=value`` overrides of a command line; None where this module
    does not second-guess Hydra (another config via ``--config-name`` / ``--config-path``
    / ``--config-dir``, or a syntax error, which Hydra reports itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = list(argv)
    if any(a in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
           or a.startswith(("--config-name=", "--config-path=", "--config-dir="))
           for a in args):
        return None
    try:
        return OverridesParser.create().parse_overrides(
            _override_args(args))
    except Exception:  # Hydra reports its own syntax errors
        return None


def _try_compose(config_name: str, overrides, with_hydra: bool = False):
    """``(config, None)``, or ``(None, Hydra's exception)`` when Hydra refuses the
    overrides; composed outside a Hydra app (``with_hydra``: with its ``hydra`` node)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(_CONF), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides),
                           return_hydra_config=with_hydra), None
    except Exception as err:
        return None, err
    finally:
        GlobalHydra.instance().clear()


def _compose(config_name: str, overrides, with_hydra: bool = False):
    """The project's config composed outside a Hydra app (``with_hydra``: with its
    ``hydra`` node); None when Hydra refuses the overrides (an unknown group option:
    Hydra lists the options itself when it starts)."""
    return _try_compose(config_name, overrides, with_hydra)[0]


def unknown_override_keys(argv, config_name: str) -> str | None:
    """The error for command-line overrides (``key=value``) of keys the composed config
    does not have, naming each key, its close matches and its siblings; None when every
    key exists (or when Hydra itself will report the problem: a syntax error, an unknown
    config group option, ``--config-name``).

    Hydra's own message for such a key is a stack of merge errors without the keys
    that do exist; this check runs before Hydra creates the run directory."""
    import difflib

    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf

    overrides = _command_overrides(argv)
    if overrides is None:
        return None
    groups, values, added = [], [], []
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.package is not None:
            continue
        if o.type == OverrideType.ADD and "." in key:
            added.append(key)
        if o.type != OverrideType.CHANGE:
            continue
        if (_CONF / key).is_dir():  # a config group: model=small, experiment=esc50
            first = (next(iter(o.sweep_string_iterator())) if o.is_sweep_override()
                     else o.get_value_element_as_str())
            groups.append(f"{key}={first}")
        else:
            values.append(key)
    if not values and not added:
        return None
    cfg = _compose(config_name, groups)
    if cfg is None:
        return None
    missing = object()
    problems = []
    for key in values:
        if OmegaConf.select(cfg, key, default=missing) is not missing:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        while parent and node is None:  # the nearest level that exists
            parent, _, _ = parent.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        siblings = sorted(str(k) for k in node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)
        where = parent or "the top level"
        text = f"{key} is not a config key"
        if close:
            text += f" (did you mean {', '.join(f'{parent}.{c}' if parent else c for c in close)}?)"
        if siblings:
            text += f"; {where} has: {', '.join(siblings)}"
        problems.append(text + ".")
    for key in added:  # +KEY: a new key one letter away from an existing one is a typo
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None)
        if OmegaConf.select(cfg, key, default=missing) is not missing or not hasattr(
                node, "keys"):
            continue  # Hydra reports a key that exists; a new section is the user's own
        close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1,
                                          cutoff=0.85)
        if close:
            problems.append(
                f"+{key} adds a key next to {parent}.{close[0]}: a misspelling? (a key "
                f"nothing reads is ignored). Write {parent}.{close[0]}=VALUE, or "
                f"++{key}=VALUE to add it anyway.")
    if not problems:
        return None
    return (" ".join(problems) + " To add a key the config does not list (one the code "
            "reads, e.g. trainer.optimizer.epsilon), write +KEY=VALUE; `--cfg job` prints "
            "the whole config.")




MAX_SWEEP_CHECKS = 256


def is_multirun(argv) -> bool:
    """Whether the command is a Hydra multirun: ``-m``, ``hydra.mode=MULTIRUN``, or a
    ``hparams_search`` option (its configs set ``hydra.mode: MULTIRUN``)."""
    for arg in map(str, argv):
        key, _, value = arg.lstrip("+~").partition("=")
        if arg in ("-m", "--multirun"):
            return True
        if key == "hydra.mode" and value.strip("'\"").upper() == "MULTIRUN":
            return True
        if key == "hparams_search" and value not in ("", "null", "None"):
            return True
    return False


def sweep_config_error(argv, config_name: str = "train") -> str | None:
    """For a multirun (``-m``): the first job of the sweep whose config
    :func:`validate_config` refuses, with its overrides and the error; None when every
    job's config passes (or when the sweep is not a plain product of values, or has more
    than :data:`MAX_SWEEP_CHECKS` jobs: each job's config is then checked when it starts).
    A sweep over a run-invariant key is refused whatever its size.

    Without this, the jobs before a bad one train and the ones after it never run."""
    import itertools

    if not is_multirun(argv):
        return None
    overrides = _command_overrides(argv)
    if overrides is None:
        return None
    choices, swept = [], []
    try:
        for o in overrides:
            if o.key_or_group.startswith("hydra"):
                continue
            if o.is_sweep_override():
                key = o.get_key_element()
                choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
                swept.append(o)
            else:
                choices.append([o.input_line])
    except Exception:  # not a list of values (an Optuna interval, ...): its sweeper's
        return None
    jobs = list(itertools.islice(itertools.product(*choices), MAX_SWEEP_CHECKS + 1))
    if len(jobs) < 2:
        return None
    for number, job in enumerate(jobs):
        cfg = _compose(config_name, job)
        if cfg is None:  # Hydra reports it when the job starts
            return None
        if number == 0 and (shared := _swept_run_invariant(swept, cfg)):
            return shared
        if len(jobs) > MAX_SWEEP_CHECKS:
            return None
        try:
            validate_config(cfg, training=config_name == "train")
        except ConfigError as err:
            return (f"job #{number} of the sweep ({', '.join(job)}) is refused, so no job "
                    f"was started: {err}")
    return None


def _swept_run_invariant(swept, cfg) -> str | None:
    """The error for a sweep over a run-invariant key (``logger=none,wandb``,
    ``trainer.exact_resume=true,false``): a job's directory leaves those keys out of its
    name, so every job would be one run in one directory. ``data.folds`` is the exception:
    its jobs add their folds to the one run, as separate commands do."""
    from src.training.rundir import is_invariant  # the rule that names run directories

    invariant = [str(k) for k in (cfg.get("run_invariant_keys") or [])]
    for o in swept:
        if o.key_or_group != "data.folds" and is_invariant(o.key_or_group, invariant):
            return (f"{o.input_line} sweeps a run-invariant key (run_invariant_keys: how a run "
                    "is named, resumed or logged, not what it trains), so every job of the "
                    "sweep would be the same run in one directory; run one command per value")
    return None


def unquoted_path_value(argv, config_name: str = "train") -> str | None:
    """The error for a ``key=value`` whose value is a path holding ``=`` or ``,`` (a run
    directory is named after its overrides: ``runs/x/model.num_heads=2,.../model.keras``),
    which Hydra's override grammar reads as syntax (a parse error, or a sweep of two
    values in a single run): the override quoted as it should be; None otherwise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    multirun = is_multirun(argv)
    for arg in argv:
        key, eq, value = str(arg).partition("=")
        if not eq or arg.startswith("-") or "/" not in value or value[:1] in "'\"":
            continue
        if not set("=,") & set(value):
            continue
        try:
            sweep = parser.parse_overrides([arg])[0].is_sweep_override()
        except Exception:
            sweep = None  # a parse error
        if sweep is None or (sweep and not multirun):
            name = key.lstrip("+")
            return (f"the value of {name} is a path holding '=' or ',', which Hydra's "
                    f"override grammar reads as syntax; quote it: \"{key}='{value}'\"")
    return None


def unknown_group_option(argv, config_name: str) -> str | None:
    """For a single run: Hydra's own message for a config group option that does not
    exist (``experiment=esc05``: it lists the options), up to its config search path;
    None otherwise (sweeps: their jobs report it)."""
    from hydra.errors import MissingConfigException

    if is_multirun(argv) or _command_overrides(argv) is None:
        return None
    _, err = _try_compose(config_name, _override_args(argv))
    if isinstance(err, MissingConfigException):
        return str(err).split("\nConfig search path:")[0].strip()
    return None  # anything else: Hydra's, when it starts


def run_dir_in_use(argv, config_name: str) -> str | None:
    """For a single run (not ``-m``): the refusal when a live process holds the run
    directory the command would use (:func:`src.training.rundir.in_use_by`), given before
    Hydra writes that directory's ``.hydra/`` and appends to its log; None otherwise. The
    lock itself is taken when the run starts (``RunLock``), as for a sweep's jobs."""
    if is_multirun(argv) or _command_overrides(argv) is None:
        return None
    cfg = _compose(config_name, _override_args(argv), with_hydra=True)
    if cfg is None or "MULTIRUN" in str(cfg.hydra.get("mode")):
        return None
    from hydra.core.hydra_config import HydraConfig

    import src.train  # noqa: F401  (registers the resolvers of hydra.run.dir)
    from src.training import distribute
    from src.training.rundir import in_use_by

    hydra = HydraConfig.instance()
    try:
        hydra.set_config(cfg)  # ${hydra:overrides.task} in hydra.run.dir
        run_dir = str(cfg.hydra.run.dir)
        if not distribute.is_chief(cfg.trainer):  # it writes a scratch directory
            return None
    except Exception:  # Hydra reports what it cannot resolve when it starts
        return None
    finally:
        hydra.cfg = None
    return in_use_by(run_dir)


def exit_on_bad_overrides(argv, config_name: str) -> None:
    """A command's first step, before Hydra makes a run directory: a path value Hydra
    would misread (:func:`unquoted_path_value`), a config group option that does not
    exist (:func:`unknown_group_option`), misspelled keys
    (:func:`unknown_override_keys`), then a sweep's bad job (:func:`sweep_config_error`),
    then a run directory another process holds (:func:`run_dir_in_use`); each is
    printed, exit 2."""
    for check in (unquoted_path_value, unknown_group_option, unknown_override_keys,
                  sweep_config_error, run_dir_in_use):
        message = check(argv, config_name)
        if message:
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
