"""Every config group composes, and overrides land where they should."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_MODEL, train_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from src.config import ConfigError, validate_config
from src.training.optim import OPTIMIZERS, build_optimizer

CONF = ROOT / "conf"


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = make(f"experiment={experiment}")
    OmegaConf.resolve(cfg)
    assert cfg.name == experiment
    validate_config(cfg)


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_every_model_data_pair_validates(model, data):
    # a folder trains with labels from its subfolders, dealt into folds
    extra = ["data.labels_from_subdirs=true", "data.num_folds=5"] if data == "folder" else []
    validate_config(make(f"model={model}", f"data={data}", *extra))


def test_a_folder_without_labels_or_folds_is_refused_before_any_file_is_read():
    with pytest.raises(ConfigError, match=r"has no labels \(data\.labels_from_subdirs=false\)"):
        validate_config(make("data=folder"))
    with pytest.raises(ConfigError, match=r"data\.num_folds=1: .* data\.num_folds=5 "):
        validate_config(make("data=folder", "data.labels_from_subdirs=true"))


def test_every_dataset_starts_from_the_common_keys():
    """conf/data/_common.yaml holds the keys every dataset shares; it is not a dataset."""
    common = OmegaConf.load(CONF / "data" / "_common.yaml")
    assert "name" not in common and "format" not in common
    assert "_common" not in options("data")
    for data in options("data"):
        d = make(f"data={data}").data
        assert set(common) <= set(d), (data, sorted(set(common) - set(d)))
        assert d.name == data and d.format


def test_seed_model_matches_the_notes_example():
    m = make("model=seed").model
    assert (m.embed_dim, m.num_heads, m.ff_dim) == (128, 8, 512)
    assert m.norm_first is False and m.activation == "relu"


def test_frontend_rate_follows_data_rate():
    cfg = make("data.sample_rate=22050")
    assert cfg.frontend.sample_rate == 22050


def test_esc50_experiment_holds_the_ast_optimiser_recipe():
    t = make("experiment=esc50").trainer
    assert (t.optimizer.beta_1, t.optimizer.beta_2, t.optimizer.weight_decay) == (0.95, 0.999, 5e-7)
    assert (t.schedule.name, t.schedule.decay_start, t.schedule.decay_factor) == (
        "step_decay", 5, 0.85,
    )
    assert make("experiment=esc50").data.folds == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.num_heads=3", "num_heads"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("data.folds=[]", "data.folds"),
        ("data.format=mp3", "data.format"),
        ("frontend.sample_rate=8000", "frontend.sample_rate"),
        ("+model.heads=4", "model.heads"),
        ("data.samples_per_epoch=100", "data.samples_per_epoch=100 is read only with "
                                       "data.balanced_sampling=true"),
        ("data.samples_per_epoch=0", "data.samples_per_epoch must be positive"),
        ("data.max_skipped_fraction=1.5", "data.max_skipped_fraction=1.5"),
        ("data.max_skipped_fraction=some", "data.max_skipped_fraction='some'"),
    ],
)
def test_bad_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(make(override))


@pytest.mark.parametrize("experiment", options("experiment"))
@pytest.mark.parametrize("model", options("model"))
def test_every_model_works_with_every_experiment(experiment, model):
    # Experiments must not set model keys that only some models have; the exception is
    # model.pretrained (transformers only), refused with a message naming it.
    cfg = make(f"experiment={experiment}", f"model={model}")
    if cfg.model.get("pretrained") and cfg.model.type != "transformer":
        with pytest.raises(ConfigError, match=r"model\.pretrained=.*model\.type=linear"):
            validate_config(cfg)
        return
    validate_config(cfg)


def test_ast_recipes_hold_table7_setups():
    s, p = make("experiment=esc50_ast_s"), make("experiment=esc50_ast_p")
    for cfg in (s, p):
        m = cfg.model
        assert (m.embed_dim, m.num_layers, m.num_heads, m.ff_dim) == (768, 12, 12, 3072)
        assert (m.f_stride, m.t_stride, m.pooling, m.norm_first) == (10, 10, "cls_dist", True)
        assert cfg.frontend.name == "kaldi_fbank" and cfg.frontend.n_mels == 128
        assert cfg.data.target_frames == 512 and cfg.augment.mixup == 0.0
        assert (cfg.data.norm_mean, cfg.data.norm_std) == (-6.6268077, 5.358466)
        assert (cfg.augment.freq_mask_param, cfg.augment.time_mask_param) == (24, 96)
        assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (25, 48)
    assert (s.model.pretrained, s.trainer.optimizer.lr) == ("deit_base_distilled_384", 1e-4)
    assert (p.model.pretrained, p.trainer.optimizer.lr) == ("ast_audioset", 1e-5)
    from src.models.build import build_model

    model = build_model(s.model, s.frontend, num_classes=50, clip_samples=80000,
                        target_frames=512)
    # transformers' ASTForAudioClassification(ASTConfig(max_length=512, num_labels=50))
    # has 85,757,234 parameters too.
    assert model.backbone.count_params() == 85_757_234 and model.backbone.grid == (12, 50)


def test_unknown_position_adaptation_is_refused():
    with pytest.raises(ConfigError, match="model.pretrained_adapt"):
        validate_config(make("model.pretrained_adapt=nearest"))


def test_optuna_search_space_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=quickstart",
                                                      "hparams_search=optuna"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower() and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"trainer.optimizer.lr", "model.num_heads", "model.ff_dim",
                                   "model.num_layers", "model.dropout_rate"}


def run_command(tmp_path, *args, env=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args], cwd=ROOT, env=env or train_env(tmp_path),
        capture_output=True, text=True, timeout=timeout,
    )


def test_slurm_launcher_submits_the_sweep_with_the_configured_resources(tmp_path):
    """The sweep of the README's SLURM command goes to sbatch as one job array with the
    plugin's defaults and the command's overrides, logging under the sweep's directory.
    ``sbatch`` here is a stand-in that keeps the submission file and refuses the job (no
    cluster), so nothing runs."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" "{kept}"\necho "sbatch: error: no cluster here" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = train_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = run_command(
        tmp_path, "-m", "experiment=quickstart", "model.num_heads=1,2",
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=1", "hydra.launcher.timeout_min=120", env=env,
    )
    assert out.returncode != 0 and "no cluster here" in out.stderr, out.stderr[-3000:]
    flags = {line.split()[1] for line in kept.read_text().splitlines()
             if line.startswith("#SBATCH ")}
    # The launcher's choice, like its parameters, leaves the sweep's directory alone: the
    # same sweep run locally lands there too.
    sweep = tmp_path / "runs" / "quickstart" / "multirun" / "model.num_heads=1,2"
    logs = sweep / ".submitit" / "%A_%a"
    assert {
        "--array=0-1%2",  # the two settings of the sweep, one array
        "--time=120", "--partition=gpu", "--gpus-per-node=1",  # the overrides
        "--job-name=train", "--nodes=1", "--ntasks-per-node=1",  # the plugin's defaults
        "--signal=USR2@120",
        f"--output={logs}/%A_%a_0_log.out", f"--error={logs}/%A_%a_0_log.err",
    } <= flags, sorted(flags)
    assert not list((tmp_path / "runs").rglob("results.json"))  # nothing ran
    # the sweep's values, as the tables read them from Hydra's own file
    from scripts.make_tables import multirun_sweeps

    assert multirun_sweeps(sweep / "multirun.yaml") == {"model.num_heads": [1, 2]}


# ------------------------------------------------------------- model.stride


@pytest.mark.parametrize(
    "model", [m for m in options("model") if make(f"model={m}").model.type == "transformer"]
)
def test_model_stride_sets_both_strides_and_an_axis_may_differ(model):
    cfg = make(f"model={model}", "model.stride=12")
    assert (cfg.model.f_stride, cfg.model.t_stride) == (12, 12)
    cfg = make(f"model={model}", "model.stride=12", "model.f_stride=10")
    assert (cfg.model.stride, cfg.model.f_stride, cfg.model.t_stride) == (12, 10, 12)


def test_strides_reach_the_built_model():
    from src.models.build import build_model

    def patch_embed(*overrides):
        cfg = make("model.embed_dim=16", "model.num_heads=2", "model.num_layers=1", *overrides)
        model = build_model(cfg.model, cfg.frontend, num_classes=3, clip_samples=16000)
        return model.backbone.patch_embed, cfg.frontend.n_mels, model.frontend.num_frames(16000)

    p, mels, frames = patch_embed("model.stride=12")
    assert (p.f_stride, p.t_stride) == (12, 12)
    assert (p.f_dim, p.t_dim) == ((mels - 16) // 12 + 1, (frames - 16) // 12 + 1)
    p, mels, frames = patch_embed("model.stride=12", "model.f_stride=10")
    assert (p.f_stride, p.t_stride) == (10, 12)
    assert (p.f_dim, p.t_dim) == ((mels - 16) // 10 + 1, (frames - 16) // 12 + 1)


# ---------------------------------------------------------- trainer.optimizer


@pytest.mark.parametrize("experiment", [None, *options("experiment")])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_experiments_optimizer_keys_are_taken_by_every_optimizer(experiment, name):
    overrides = [f"experiment={experiment}"] if experiment else []
    opt_cfg = make(*overrides, f"trainer.optimizer.name={name}").trainer.optimizer
    opt = build_optimizer(opt_cfg, float(opt_cfg.lr))
    assert type(opt).__name__.lower() == name
    decay = float(opt_cfg.get("weight_decay") or 0.0)
    assert float(opt.weight_decay or 0.0) == pytest.approx(decay)


# ------------------------------------------------------------ run directories


def run_dir(*overrides) -> Path:
    """``hydra.run.dir`` of ``python -m src.train OVERRIDES`` (nothing runs)."""
    import src.train  # noqa: F401  (registers the run_dirname resolver)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return Path(OmegaConf.select(cfg, "hydra.run.dir"))
    finally:
        HydraConfig.instance().cfg = None


def test_a_run_without_experiment_never_shares_the_quickstart_directory(monkeypatch):
    monkeypatch.setenv("AUDIO_RUNS_DIR", "/runs")
    # Both train on the quickstart data, with different settings (`make train` is the
    # experiment): one directory for both would refuse the second, or resume the wrong run.
    assert make().data.name == make("experiment=quickstart").data.name == "quickstart"
    assert make().trainer.epochs != make("experiment=quickstart").trainer.epochs
    assert run_dir() == Path("/runs/base-quickstart/default")
    assert run_dir("experiment=quickstart") == Path("/runs/quickstart/default")
    assert run_dir("trainer.epochs=3") == Path("/runs/base-quickstart/trainer.epochs=3")
    assert make("data=esc50").name == "base-esc50"


def _with_invariant(*extra) -> str:
    keys = [*make().run_invariant_keys, *extra]
    return f"run_invariant_keys=[{','.join(keys)}]"


def test_run_invariant_keys_name_the_directory(monkeypatch):
    monkeypatch.setenv("AUDIO_RUNS_DIR", "/runs")
    plain = run_dir()
    assert run_dir("logger=wandb", "tags=[a]", "data.folds=[2]", "trainer.verbose=0") == plain
    assert run_dir("trainer.epochs=3") != plain
    # A key added to the list is left out of the name.
    longer = _with_invariant("trainer.epochs")
    assert run_dir(longer, "trainer.epochs=3") == run_dir(longer) == plain


def _earlier_run(directory: Path, *overrides) -> list[str]:
    """An unfinished run of ``python -m src.train OVERRIDES`` in ``directory`` (its saved
    config and a fold folder); returns the config's run_invariant_keys."""
    cfg = make(*overrides)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (directory / "fold_1").mkdir()
    return list(cfg.run_invariant_keys)


def test_configs_that_share_a_directory_name_are_told_so(tmp_path, monkeypatch):
    """Two data roots whose names differ only in characters the directory name replaces
    land in one directory: the refusal says so and points to a directory of its own, not
    to trainer.resume=false (which would move the earlier run's results aside)."""
    from src.training.rundir import prepare_run_dir

    monkeypatch.setenv("AUDIO_RUNS_DIR", str(tmp_path / "runs"))
    first, second = Path("/data/a_b"), Path("/data/a/b")  # short: no digest in the name
    shared = run_dir("data=esc50", f"data.root={first}")
    assert run_dir("data=esc50", f"data.root={second}") == shared
    invariant = _earlier_run(shared, "data=esc50", f"data.root={first}")

    resolved = OmegaConf.to_container(make("data=esc50", f"data.root={second}"), resolve=True)
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(shared, resolved, resume=True, invariant=invariant)
    msg = str(err.value)
    assert f"share the directory name {shared.name!r}" in msg
    assert f"data.root={str(first)!r} (the earlier run) and data.root={str(second)!r}" in msg
    assert "hydra.run.dir=<another folder>" in msg and "trainer.resume=false is not the way" in msg
    assert (shared / "fold_1").is_dir()  # nothing was moved
    # The advice works: the other directory, with no earlier run in it.
    other = tmp_path / "elsewhere"
    assert run_dir("data=esc50", f"data.root={second}", f"hydra.run.dir={other}") == other


def test_a_changed_default_in_the_same_directory_advises_starting_over(tmp_path):
    """A config that changed underneath the same overrides is not a shared name: the way
    out stays trainer.resume=false."""
    from src.training.rundir import prepare_run_dir

    run = tmp_path / "runs" / "base-esc50" / "data=esc50"
    invariant = _earlier_run(run, "data=esc50", "model.embed_dim=24")
    resolved = OmegaConf.to_container(make("data=esc50"), resolve=True)
    with pytest.raises(ConfigError) as err:
        prepare_run_dir(run, resolved, resume=True, invariant=invariant)
    msg = str(err.value)
    assert "model.embed_dim: 24 ->" in msg and "Run with trainer.resume=false" in msg
    assert "share the directory name" not in msg


@pytest.mark.slow
def test_run_invariant_keys_are_the_ones_the_resume_check_ignores(tmp_path):
    """The same list, read from the config, decides the resume check: an earlier run's
    directory with another trainer.epochs is resumed when the key is in the list and
    refused when it is not. (No data: each command stops at the dataset, after the check.)"""
    args = ["data=esc50", f"data.root={tmp_path / 'nowhere'}", *TINY_MODEL,
            _with_invariant("trainer.epochs")]
    first = run_command(tmp_path, *args, "trainer.epochs=1")
    assert first.returncode == 2 and "ESC-50 data not found" in first.stderr, first.stderr
    (saved,) = (tmp_path / "runs" / "base-esc50").glob("*/config.yaml")
    run_dir_ = saved.parent
    assert "trainer.epochs" not in run_dir_.name
    (run_dir_ / "fold_1").mkdir()  # an unfinished fold of the earlier run

    second = run_command(tmp_path, *args, "trainer.epochs=2")  # same directory, resumed
    assert second.returncode == 2, second.stderr
    assert "ESC-50 data not found" in second.stderr and "different config" not in second.stderr
    assert OmegaConf.load(saved).trainer.epochs == 2

    # The default list: the same directory (forced here) is refused, naming the key.
    third = run_command(tmp_path, *args[:-1], "trainer.epochs=3", f"hydra.run.dir='{run_dir_}'")
    assert third.returncode == 2
    assert "different config (trainer.epochs: 2 -> 3)" in third.stderr, third.stderr
    assert "ESC-50 data not found" not in third.stderr


def test_test_folds_that_train_are_refused_before_any_work(tmp_path):
    out = run_command(tmp_path, "experiment=quickstart", "data.folds=[1]",
                      "data.train_folds=[1,2]")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "data.train_folds=[1, 2] and data.folds=[1]" in out.stderr
    assert "share fold(s) [1]" in out.stderr
    assert not (tmp_path / "cache").exists()  # no data generated, no features
    # Nothing of ours was written (no lock, config, fold or results), so the directory
    # Hydra made for the command is removed again.
    assert not list((tmp_path / "runs").iterdir())
    for overrides, key in ((["data.folds=[1]", "data.train_folds=[1,2]"], "data.train_folds"),
                           (["data.folds=[3]", "data.val_folds=[3]"], "data.val_folds"),
                           (["data.train_folds=[1]", "data.val_folds=[1]"], "data.train_folds")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config(make("experiment=quickstart", *overrides))


# ------------------------------------------------------------ trainer.verbose, warmup


def test_fit_verbosity_is_bars_on_a_terminal_and_a_line_per_epoch_in_a_log(monkeypatch):
    import io

    from src.config import fit_verbosity

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    assert fit_verbosity("auto") == 1
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert fit_verbosity("auto") == 2
    assert [fit_verbosity(v) for v in (0, 1, 2)] == [0, 1, 2]
    assert make().trainer.verbose == "auto"
    for bad in (3, "bars", True):
        with pytest.raises(ConfigError, match=r"trainer\.verbose=.* use auto"):
            fit_verbosity(bad)
    with pytest.raises(ConfigError, match=r"trainer\.verbose=3"):
        validate_config(make("experiment=quickstart", "trainer.verbose=3"))


def test_a_warmup_as_long_as_training_is_warned_about(caplog):
    cfg = make("experiment=quickstart", "trainer.epochs=2",
               "trainer.schedule.warmup_epochs=2")
    with caplog.at_level("WARNING", logger="src.config"):
        validate_config(cfg)
    assert "trainer.schedule.warmup_epochs=2 >= trainer.epochs=2" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="src.config"):
        validate_config(make("experiment=quickstart", "trainer.epochs=5",
                             "trainer.schedule.warmup_epochs=2"))
    assert "warmup_epochs" not in caplog.text


def test_a_run_directory_with_nothing_but_hydras_files_is_removed(tmp_path):
    from src.training.rundir import remove_if_nothing_ran

    runs = tmp_path / "runs"
    for extra in ("config.yaml", ".lock", "fold_1"):  # an earlier run's or a running one's
        kept = runs / "esc50" / extra.strip(".")
        (kept / ".hydra").mkdir(parents=True)
        (kept / "train.log").write_text("")
        (kept / extra).mkdir() if extra.startswith("fold") else (kept / extra).write_text("")
        assert not remove_if_nothing_ran(kept, runs) and (kept / extra).exists()
    empty = runs / "quickstart" / "model.num_heads=3"
    (empty / ".hydra").mkdir(parents=True)
    (empty / "train.log").write_text("error")
    assert remove_if_nothing_ran(empty, runs)
    assert not (runs / "quickstart").exists() and (runs / "esc50").exists()
    outside = tmp_path / "elsewhere"
    (outside / ".hydra").mkdir(parents=True)
    assert not remove_if_nothing_ran(outside, runs) and outside.exists()


def test_an_input_error_is_written_once_to_the_terminal_and_once_to_the_log(tmp_path, capsys):
    """Hydra's console handler and the error line would print it twice: stderr gets the
    `error:` line, the log file the record, the console handler nothing."""
    import io
    import logging

    from src.training.rundir import stop_on_error

    run_dir = tmp_path / "runs" / "x"
    (run_dir / "fold_1").mkdir(parents=True)  # something ran: the directory stays
    console_text = io.StringIO()
    console = logging.StreamHandler(console_text)
    log_file = logging.FileHandler(run_dir / "train.log")
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(log_file)
    try:
        with pytest.raises(SystemExit) as stop:
            stop_on_error(logging.getLogger("src.train"), ConfigError("data.folds: no"),
                          run_dir, tmp_path / "runs")
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: data.folds: no\n"
    assert console_text.getvalue() == ""
    assert (run_dir / "train.log").read_text() == "data.folds: no\n"


def test_the_wandb_group_is_the_setting_not_the_launch():
    """The folds of one cross-validation run by several commands, its seeds, and the same
    setting launched with other run-invariant keys share one W&B group."""
    from src.train import wandb_group

    cfg = make("experiment=quickstart", "logger=wandb")
    base = ["model.num_heads=4"]
    group = wandb_group(cfg, base)
    assert group == "quickstart-model.num_heads=4"
    for extra in (["data.folds=[3]"], ["seed=2"], ["logger=wandb", "name=quickstart"],
                  ["experiment=quickstart", "trainer.verbose=0"]):
        assert wandb_group(cfg, base + extra) == group, extra
    assert wandb_group(cfg, ["model.num_heads=2"]) != group
    assert wandb_group(cfg, []) == "quickstart"
    assert wandb_group(make("experiment=quickstart", "logger=wandb", "logger.group=abl"),
                       base) == "abl"


def test_a_sweep_with_a_bad_job_is_refused_before_any_job_runs():
    from src.config import sweep_config_error

    message = sweep_config_error(["-m", "experiment=quickstart", "model.num_heads=1,3,2"])
    assert message.startswith("job #1 of the sweep (experiment=quickstart, model.num_heads=3) "
                              "is refused, so no job was started: ")
    assert "not divisible by num_heads=3" in message
    assert sweep_config_error(["-m", "experiment=quickstart", "model.num_heads=1,2",
                               "seed=1,2"]) is None
    assert sweep_config_error(["experiment=quickstart", "model.num_heads=3"]) is None  # no -m
    assert sweep_config_error(["-m", "model.num_heads=interval(1,4)"]) is None  # a sweeper's


@pytest.mark.parametrize("swept", ["trainer.exact_resume=true,false", "logger=none,wandb",
                                   "data.max_skipped_fraction=0.1,0.2"])
def test_a_sweep_over_a_run_invariant_key_is_refused(swept):
    """Its jobs' directories leave the key out of their name: one run, not two."""
    from src.config import sweep_config_error

    message = sweep_config_error(["-m", "experiment=quickstart", swept])
    assert message.startswith(f"{swept} sweeps a run-invariant key"), message
    assert "run one command per value" in message
    big = sweep_config_error(["-m", "experiment=quickstart", "seed=range(0,300)", swept])
    assert big is not None and big.startswith(f"{swept} sweeps a run-invariant key")
    # the folds of one run, one job each, are what separate commands do: allowed
    assert sweep_config_error(["-m", "experiment=quickstart", "data.folds=[1],[2]"]) is None
    both = sweep_config_error(["-m", "experiment=quickstart", "data.folds=[1],[2]", swept])
    assert both is not None and both.startswith(f"{swept} sweeps")


def test_a_run_directory_path_as_a_value_is_refused_with_its_quoted_form(capsys):
    """A run directory is named after its overrides: as a value, its '=' and ',' are
    Hydra syntax (a parse error; a sweep of two paths in a single run)."""
    from src.config import exit_on_bad_overrides, unquoted_path_value

    path = "runs/esc50/model.num_heads=2,model.ff_dim=64/fold_1/model.keras"
    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_overrides(["experiment=esc50", f"model.pretrained={path}"], "train")
    assert exit_info.value.code == 2
    assert f"quote it: \"model.pretrained='{path}'\"" in capsys.readouterr().err
    assert "quote it" in unquoted_path_value(["+model.pretrained=runs/a,b/m.keras"])
    for fine in ([f"model.pretrained='{path}'"], ["model.num_heads=2,4"],
                 ["-m", "model.pretrained=runs/a/m.keras,runs/b/m.keras"],
                 ["model.pretrained=runs/a/model.keras"],
                 # a multirun set by the config (Optuna) or by hydra.mode, not by -m
                 ["hparams_search=optuna", "model.pretrained=runs/a/m.keras,runs/b/m.keras"],
                 ["hydra.mode=MULTIRUN", "model.pretrained=runs/a/m.keras,runs/b/m.keras"]):
        assert unquoted_path_value(fine) is None, fine
    assert "quote it" in unquoted_path_value(
        ["hparams_search=null", "model.pretrained=runs/a/m.keras,runs/b/m.keras"])


@pytest.mark.parametrize("override,needle", [
    ("trainer.epochs=1.5", "trainer.epochs must be a whole number, got 1.5"),
    ("trainer.batch_size=true", "trainer.batch_size must be a whole number"),
    ("model.num_heads=two", "model.num_heads must be a whole number, got 'two'"),
    ("model.ff_dim=0", "model.ff_dim must be positive"),
    ("model.stride=12.5", "model.stride must be a whole number"),
])
def test_whole_number_keys_name_themselves(override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(make("experiment=quickstart", override))
    validate_config(make("experiment=quickstart", "trainer.epochs=3.0"))  # a whole number


def test_an_unknown_config_option_is_refused_with_the_options(capsys):
    from src.config import exit_on_bad_overrides

    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_overrides(["experiment=esc05", "trainer.epochs=1"], "train")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Could not find 'experiment/esc05'" in err and "\tesc50\n" in err
    assert "Config search path" not in err


def test_a_long_run_directory_name_keeps_the_settings_readable():
    """Over 100 characters the name is cut and a digest added: the settings come first
    and a path shows its last part, so two sweep jobs' names show their values."""
    from src.training.rundir import run_dirname

    base = ["data.root=/home/someone/datasets/audio/ESC-50-master", "model.embed_dim=32",
            "model.ff_dim=32", "model.num_layers=1", "trainer.epochs=2"]
    one, two = (run_dirname([*base, f"model.num_heads={h}"]) for h in (1, 2))
    assert one.startswith("model.embed_dim=32,model.ff_dim=32,model.num_heads=1,")
    assert two.startswith("model.embed_dim=32,model.ff_dim=32,model.num_heads=2,")
    assert len(one) <= 91 and one != two
    assert run_dirname(["data.root=/a/ESC-50-master", "model.num_heads=2"]) == (
        "data.root=_a_ESC-50-master,model.num_heads=2")  # short names are as they were


def test_the_run_directory_check_counts_deletions(tmp_path, monkeypatch):
    """`~key` names its own run directory (Hydra's `_key`): a lock held on the one
    without the deletion does not refuse it, and one on its own does."""
    from src.config import run_dir_in_use
    from src.training.rundir import RunLock

    monkeypatch.setenv("AUDIO_RUNS_DIR", str(tmp_path / "runs"))
    plain = tmp_path / "runs" / "quickstart" / "default"
    deleted = tmp_path / "runs" / "quickstart" / "_augment.mixup_alpha"
    with RunLock(plain):
        assert run_dir_in_use(["experiment=quickstart", "~augment.mixup_alpha"], "train") is None
        assert "is in use" in run_dir_in_use(["experiment=quickstart"], "train")
    with RunLock(deleted):
        assert "is in use" in run_dir_in_use(["experiment=quickstart", "~augment.mixup_alpha"],
                                             "train")
