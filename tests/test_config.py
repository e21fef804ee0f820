"""Every config group composes, and overrides land where they should."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.config import ConfigError, validate_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=False)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = make(f"experiment={experiment}")
    OmegaConf.resolve(cfg)
    assert cfg.name == experiment
    validate_config(cfg)


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_every_model_data_pair_validates(model, data):
    validate_config(make(f"model={model}", f"data={data}"))


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


def test_slurm_launcher_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=submitit_slurm",
                                                      "hydra.launcher.timeout_min=120"],
                      return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.timeout_min == 120
