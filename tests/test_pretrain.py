"""Masked patch pretraining (SSAST): the masking, the losses, and `python -m src.pretrain`
as a user runs it, on generated WAV files."""

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, TINY_MODEL, epochs_logged, kill_after_epochs, train_env
from hydra import compose, initialize_config_dir

from src.config import ConfigError
from src.data.index import DatasetError

SR = 16000
# 1 s crops, 32 mel bins, 16 x 16 patches: a 2 x 6 grid, 6 of its 12 patches masked.
TINY = [*TINY_MODEL, "trainer.batch_size=8", "pretrain.mask.count=6"]


def write_clip(path, seconds, cls=0, index=0):
    from src.data.synthetic import synthesize_clip

    path.parent.mkdir(parents=True, exist_ok=True)
    x = synthesize_clip(cls, index, seed=0, sample_rate=SR, duration=seconds)
    sf.write(path, x, SR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of 6 clips of 1 to 2.5 s (one subfolder each; unlabeled for
    pretraining), one clip shorter than a patch and one unreadable file."""
    root = tmp_path_factory.mktemp("audio") / "audio"
    for c in range(3):
        for i in range(6):
            write_clip(root / f"class{c}" / f"{i}.wav", 1.0 + 0.3 * i, c, i)
    write_clip(root / "class0" / "short.wav", 0.1)  # > one window, < one patch
    (root / "class1" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    return root


def pretrain_args(root, *extra):
    return [sys.executable, "-m", "src.pretrain", "experiment=ssast", f"data.root={root}",
            *TINY, "data.skip_bad_files=true", *extra]


def env_for(tmp, **extra):
    """train_env, and the exported backbones under ``tmp`` too."""
    return train_env(tmp, AUDIO_WEIGHTS_DIR=str(tmp / "weights"), **extra)


def wandb_env(tmp):
    env = env_for(tmp, WANDB_BASE_URL="http://127.0.0.1:9")  # never the internet
    env.pop("WANDB_MODE", None)  # conftest disables W&B; this run logs offline
    return env


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    out = subprocess.run(
        pretrain_args(folder, "trainer.epochs=2", "logger=wandb", "logger.project=tests"),
        cwd=ROOT, env=wandb_env(tmp), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (results,) = list((tmp / "runs").rglob("results.json"))
    return tmp, results.parent, json.loads(results.read_text()), out


def make(*overrides, config="pretrain"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


# ----------------------------------------------------------------------------- masking


def _block(anchor, k, grid):
    """The reference cluster: the k x k block around ``anchor`` clipped at the edges."""
    (af, at), (f_dim, t_dim) = anchor, grid
    lo_f, lo_t = af - (k - 1) // 2, at - (k - 1) // 2
    return {f * t_dim + t for f in range(max(lo_f, 0), min(lo_f + k, f_dim))
            for t in range(max(lo_t, 0), min(lo_t + k, t_dim))}


@pytest.mark.parametrize("grid,count", [((8, 12), 75), ((2, 6), 6), ((4, 5), 15)])
def test_cluster_masks_are_exact_unions_of_clipped_blocks(grid, count):
    import tensorflow as tf

    from src.models.ssast import cluster_masks

    batch = 24
    index, ks, anchors = cluster_masks(tf.constant([3, 9]), batch, grid, count,
                                       return_clusters=True)
    index, ks, anchors = index.numpy(), ks.numpy(), anchors.numpy()
    assert index.shape == (batch, count) and index.dtype == np.int32
    assert set(ks.tolist()) <= {3, 4, 5} and len(set(ks.tolist())) > 1  # drawn per clip
    for b in range(batch):
        mask = set(index[b].tolist())
        assert len(mask) == count and list(index[b]) == sorted(mask)
        assert all(0 <= i < grid[0] * grid[1] for i in mask)
        # Clusters in order: every earlier one whole, then the first cells of the next.
        union = set()
        for anchor in anchors[b]:
            block = _block(anchor, int(ks[b]), grid)
            if len(union | block) >= count:
                new = sorted(block - union)
                assert mask == union | set(new[: count - len(union)])
                break
            union |= block
        else:
            pytest.fail("the clusters never reached the count")
    # Different clips, different masks; another seed, other masks; the same seed, the same.
    assert len({tuple(r) for r in index}) >= 8
    again = cluster_masks(tf.constant([3, 9]), batch, grid, count).numpy()
    other = cluster_masks(tf.constant([4, 9]), batch, grid, count).numpy()
    assert np.array_equal(again, index) and not np.array_equal(other, index)


def test_cluster_masks_reach_any_count():
    """A count close to the whole grid is still exact (cells no cluster reached are
    drawn at random)."""
    import tensorflow as tf

    from src.models.ssast import cluster_masks

    index = cluster_masks(tf.constant([1, 2]), 16, (3, 4), 11).numpy()
    assert all(len(set(r.tolist())) == 11 for r in index)


def test_mask_count_from_count_or_fraction():
    from src.models.ssast import mask_count

    assert mask_count(512, fraction=0.78) == 399
    assert mask_count(512, count=400) == 400
    for bad in ({"count": 512}, {"count": 1}, {"fraction": 1.0}, {"fraction": 0.001}):
        with pytest.raises(ValueError, match="pretrain.mask"):
            mask_count(512, **bad)


# ----------------------------------------------------------------------------- losses


def test_info_nce_and_accuracy_match_a_hand_computation():
    from src.models.ssast import (
        info_nce,
        masked_patch_losses,
        retrieval_accuracy,
        retrieval_logits,
    )

    # One clip, two masked patches of three values.
    pred = np.array([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]], np.float32)
    target = np.array([[[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]], np.float32)
    # logits[j][i] = pred_j . target_i
    l00, l01 = 1.0, 2.0  # pred 0 . target 0, pred 0 . target 1
    l10, l11 = 1.0, 2.0  # pred 1 . target 0, pred 1 . target 1
    logits = retrieval_logits(pred, target)
    np.testing.assert_allclose(np.asarray(logits), [[[l00, l01], [l10, l11]]])
    # -log p(own patch) for each prediction, averaged.
    hand = -(
        math.log(math.exp(l00) / (math.exp(l00) + math.exp(l01)))
        + math.log(math.exp(l11) / (math.exp(l10) + math.exp(l11)))
    ) / 2
    assert float(info_nce(logits)) == pytest.approx(hand, rel=1e-6)
    # Prediction 0 picks patch 1 (wrong), prediction 1 picks patch 1 (right).
    assert float(retrieval_accuracy(logits)) == pytest.approx(0.5)

    recon = target + np.array([[[0.5, 0.0, 0.0], [0.0, 0.0, -1.0]]], np.float32)
    parts = masked_patch_losses(logits, recon, target, mse_weight=10.0)
    mse = (0.25 + 1.0) / 6
    assert float(parts["mse"]) == pytest.approx(mse)
    assert float(parts["loss"]) == pytest.approx(hand + 10.0 * mse, rel=1e-6)
    assert float(parts["accuracy"]) == pytest.approx(0.5)


def test_constant_patches_are_left_out_of_the_losses():
    """A masked patch of constant content (padding: the features of silence) is neither
    an anchor nor a negative: the losses are those of the other patches alone, and a
    clip with only constant masked patches adds nothing."""
    from src.models.ssast import (
        info_nce,
        informative_targets,
        masked_patch_losses,
        retrieval_accuracy,
        retrieval_logits,
    )

    pred = np.array([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [3.0, 3.0, 3.0]]], np.float32)
    target = np.array([[[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [-2.0, -2.0, -2.0]]], np.float32)
    recon = target + np.array([[[0.5, 0.0, 0.0], [0.0, 0.0, -1.0], [9.0, 9.0, 9.0]]],
                              np.float32)
    np.testing.assert_array_equal(np.asarray(informative_targets(target)), [[1.0, 1.0, 0.0]])
    full = masked_patch_losses(retrieval_logits(pred, target), recon, target)
    kept = masked_patch_losses(retrieval_logits(pred[:, :2], target[:, :2]), recon[:, :2],
                               target[:, :2])
    for key in ("nce", "mse", "accuracy", "loss"):
        assert float(full[key]) == pytest.approx(float(kept[key]), rel=1e-6), key
    assert float(full["mse"]) == pytest.approx((0.25 + 1.0) / 6)
    # Without the weights the constant patch counts (and its own row is a sure miss).
    logits = retrieval_logits(pred, target)
    assert float(info_nce(logits)) != pytest.approx(float(full["nce"]))
    assert float(retrieval_accuracy(logits)) == pytest.approx(1 / 3)
    # A second clip whose masked patches are all padding changes nothing.
    pad = np.full((1, 3, 3), -2.0, np.float32)
    both = masked_patch_losses(retrieval_logits(np.concatenate([pred, pred]),
                                                np.concatenate([target, pad])),
                               np.concatenate([recon, pad]), np.concatenate([target, pad]))
    for key in ("nce", "mse", "accuracy"):
        assert float(both[key]) == pytest.approx(float(kept[key]), rel=1e-6), key


def test_retrieval_accuracy_over_a_batch():
    from src.models.ssast import retrieval_accuracy

    eye = np.eye(4, dtype=np.float32)
    shuffled = eye[[1, 0, 2, 3]]  # two of four predictions point at the wrong patch
    logits = np.stack([eye, shuffled])
    assert float(retrieval_accuracy(logits)) == pytest.approx((4 + 2) / 8)


# ----------------------------------------------------------------------------- model


def _tiny_backbone(**model):
    from omegaconf import OmegaConf

    from src.models.build import build_model

    cfg = dict(type="transformer", embed_dim=16, num_layers=1, num_heads=2, ff_dim=32,
               patch_size=16, f_stride=16, t_stride=16, dropout_rate=0.0)
    cfg.update(model)
    built = build_model(OmegaConf.create(cfg), OmegaConf.create({"name": "logmel",
                        "sample_rate": SR, "n_mels": 32}), num_classes=2, clip_samples=SR)
    return built.backbone


def test_patch_targets_line_up_with_the_patch_embedding():
    """patch_targets(x)[:, n] is what the patch embedding's projection sees at patch n."""
    from src.models.ssast import patch_targets

    bb = _tiny_backbone(embed_dim=256, num_heads=4)
    pe = bb.patch_embed
    kernel = np.eye(256, dtype=np.float32).reshape(16, 16, 1, 256)  # pixel (i, j) -> i*16+j
    pe.projection.set_weights([kernel, np.zeros(256, np.float32)])
    x = np.random.default_rng(0).normal(size=(2, 98, 32)).astype(np.float32)
    grid = np.asarray(pe.patch_grid(x)).reshape(2, -1, 256)
    targets = np.asarray(patch_targets(x, 16, pe.f_dim, pe.t_dim))
    assert targets.shape == (2, 12, 256)
    np.testing.assert_allclose(grid, targets, atol=1e-5)


def test_masked_content_is_hidden_from_the_encoder():
    """The mask token replaces the masked patches: changing what they hold changes
    nothing the heads see; changing a visible patch does."""
    from src.models.ssast import MaskedPatchPretrainer

    pre = MaskedPatchPretrainer(_tiny_backbone())
    pre.build()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 98, 32)).astype(np.float32)
    index = np.array([[0, 1, 2, 6, 7, 8]], np.int32)  # time columns 0-2 of both rows
    run = lambda feats: np.asarray(  # noqa: E731
        pre({"features": feats, "mask_index": index}, training=False)["reconstruction"])
    base = run(x)
    hidden = x.copy()
    hidden[:, :48] += 3.0  # frames 0-47: the masked columns only
    np.testing.assert_allclose(run(hidden), base, atol=1e-5)
    visible = x.copy()
    visible[:, 60:70] += 3.0  # inside a visible column
    assert np.abs(run(visible) - base).max() > 1e-3


def _frames_of_columns(cols):
    return np.concatenate([np.arange(16 * c, 16 * c + 16) for c in cols])


def test_structured_patchout_masks_the_grid_a_step_keeps():
    """With model.patchout.time, a training step keeps 4 of the 6 time columns and the
    masks index that 2 x 4 grid: each kept position maps to one whole-grid patch, in
    order, the same for every clip; the targets are those patches' contents; what the
    step drops or masks reaches nothing the heads see, and a kept visible patch does.
    In evaluation the whole grid is used."""
    from src.models.ssast import MaskedPatchPretrainer, patch_targets

    bb = _tiny_backbone(patchout={"time": 2})
    pre = MaskedPatchPretrainer(bb)
    pre.build()
    pe = bb.patch_embed
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 98, 32)).astype(np.float32)
    index = np.array([[0, 1, 2, 3], [1, 3, 4, 6]], np.int32)  # on the kept 2 x 4 grid
    state = pe.seed_generator.state.numpy()

    def run(feats, training=True):
        pe.seed_generator.state.assign(state)  # the same columns kept in every call
        out = pre({"features": feats, "mask_index": index}, training=training)
        return {k: np.asarray(v) for k, v in out.items()}

    out = run(x)
    patch = out["patch_index"]
    rows, cols = patch // 6, patch % 6
    np.testing.assert_array_equal(rows, index // 4)  # no frequency rows dropped
    kept = {}
    for r, c in zip((index % 4).ravel(), cols.ravel(), strict=True):
        assert kept.setdefault(int(r), int(c)) == c  # one whole-grid column per kept one
    assert sorted(kept) == [0, 1, 2, 3] and list(kept.values()) == sorted(kept.values())
    content = np.asarray(patch_targets(np.asarray(bb.normalize(x)), 16, 2, 6))
    expected = np.take_along_axis(content, patch[..., None], axis=1)
    np.testing.assert_allclose(out["target"], expected, atol=1e-5)

    dropped = sorted(set(range(6)) - set(kept.values()))
    assert len(dropped) == 2
    changed = x.copy()
    changed[:, _frames_of_columns(dropped)] += 3.0  # columns the step drops: nothing moves
    again = run(changed)
    for key in ("reconstruction", "logits", "target"):
        np.testing.assert_allclose(again[key], out[key], atol=1e-5)
    changed[0][np.ix_(_frames_of_columns(list(kept.values())), np.arange(16))] += 3.0
    np.testing.assert_allclose(  # clip 0's masked patches: only their targets move
        run(changed)["reconstruction"], out["reconstruction"], atol=1e-5)
    visible = x.copy()
    visible[0][np.ix_(_frames_of_columns([kept[0]]), np.arange(16, 32))] += 3.0  # kept, visible
    assert np.abs(run(visible)["reconstruction"][0] - out["reconstruction"][0]).max() > 1e-3

    whole = run(x, training=False)  # evaluation: the masks index the whole 2 x 6 grid
    np.testing.assert_array_equal(whole["patch_index"], index)


@pytest.mark.parametrize("setting", ["mixed_bfloat16", "xla"])
def test_structured_patchout_trains_under_mixed_precision_and_xla(setting):
    """A fit step with patchout on the kept grid's masks, in bfloat16 and under XLA:
    finite losses over the kept grid's masks (K = 4 of its 8 patches)."""
    import keras
    import tensorflow as tf

    from src.models.ssast import MaskedPatchPretrainer, cluster_masks, training_grid

    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if setting == "mixed_bfloat16" else "float32")
    try:
        bb = _tiny_backbone(patchout={"time": 2})
        pre = MaskedPatchPretrainer(bb)
        pre.build()
        pre.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=setting == "xla")
        assert training_grid(bb) == (2, 4)
        x = np.random.default_rng(4).normal(size=(4, 98, 32)).astype(np.float32)
        masks = cluster_masks(tf.constant([0, 2]), 4, (2, 4), 4)
        logs = pre.train_on_batch({"features": x, "mask_index": masks}, return_dict=True)
        assert all(math.isfinite(float(logs[k])) for k in ("loss", "nce_loss", "mse_loss"))
        out = pre({"features": x, "mask_index": masks}, training=True)
        assert tuple(out["logits"].shape) == (4, 4, 4)
        assert int(np.max(out["patch_index"])) < 12
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_pretraining_trains_the_shared_layers():
    """One fit step moves the backbone's own layers (the same objects, not a copy; the
    patch embedding too, though model.freeze=1 keeps it fixed in fine-tuning), the mask
    token and both heads; the backbone's classifier head stays as it was."""
    import keras
    import tensorflow as tf

    from src.models.ssast import MaskedPatchPretrainer, cluster_masks

    bb = _tiny_backbone(freeze=1)
    pre = MaskedPatchPretrainer(bb)
    pre.build()
    pre.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = {v.path: v.numpy().copy() for v in pre.weights}
    x = np.random.default_rng(2).normal(size=(4, 98, 32)).astype(np.float32)
    masks = cluster_masks(tf.constant([0, 1]), 4, bb.grid, 6)
    hist = pre.fit(tf.data.Dataset.from_tensors({"features": x, "mask_index": masks}),
                   epochs=1, verbose=0)
    assert {"loss", "nce_loss", "mse_loss", "retrieval_accuracy"} <= set(hist.history)
    moved = {v.path for v in pre.weights if not np.allclose(v.numpy(), before[v.path])}
    assert any("block_0" in p for p in moved) and any("projection" in p for p in moved)
    assert any("mask_token" in p for p in moved)
    assert any("disc_out" in p for p in moved) and any("gen_out" in p for p in moved)
    assert not any("classifier" in p or "head_norm" in p for p in moved)
    assert pre.release_backbone() is bb and bb.classifier.trainable
    assert not bb.patch_embed.trainable and bb.blocks[0].trainable  # freeze=1 again


def test_a_silent_split_scores_nan_and_batches_weigh_by_informative_patches():
    """Silence has no informative masked patch: its metrics are NaN, not a perfect 0
    loss; and a silent batch does not pull the mean of the others' metrics."""
    import keras
    import tensorflow as tf

    from src.models.ssast import MaskedPatchPretrainer, cluster_masks

    bb = _tiny_backbone()
    pre = MaskedPatchPretrainer(bb)
    pre.build()
    pre.compile(optimizer=keras.optimizers.Adam(1e-3))
    masks = cluster_masks(tf.constant([0, 1]), 2, bb.grid, 6)
    silent = {"features": np.zeros((2, 98, 32), np.float32), "mask_index": masks}
    noisy = {"features": np.random.default_rng(3).normal(size=(2, 98, 32)).astype(np.float32),
             "mask_index": masks}
    keys = ("loss", "nce_loss", "mse_loss", "retrieval_accuracy")

    def evaluate(*batches):
        ds = tf.data.Dataset.from_tensors(batches[0])
        for b in batches[1:]:
            ds = ds.concatenate(tf.data.Dataset.from_tensors(b))
        return pre.evaluate(ds, return_dict=True, verbose=0)

    assert all(np.isnan(evaluate(silent)[k]) for k in keys)
    alone, mixed = evaluate(noisy), evaluate(silent, noisy)
    assert all(np.isfinite(alone[k]) and np.isfinite(mixed[k]) for k in keys)
    for k in keys[1:]:
        assert mixed[k] == pytest.approx(alone[k], rel=1e-5)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,needle", [
    (["model.stride=10"], "model.f_stride=10"),
    (["model.t_stride=8"], "non-overlapping"),
    (["model.patchout.random=1"], "model.patchout.random=1"),
    (["model.patchout.time=5"], "model.patchout keeps"),  # 2 patches left: 1 masked
    (["pretrain.mask.count=12"], "pretrain.mask.count=12"),
    (["pretrain.mask.count=null", "pretrain.mask.fraction=1.5"], "pretrain.mask.fraction"),
    (["pretrain.mask.cluster_min=4", "pretrain.mask.cluster_max=3"], "cluster_min"),
    (["pretrain.mask.cluster_max=7"], "cluster_max=7 is wider than the patch grid"),
    (["pretrain.head_hidden=abc"], "pretrain.head_hidden must be a whole number"),
    (["pretrain.head_hidden=2.5"], "pretrain.head_hidden must be a whole number"),
    (["pretrain.head_hidden=0"], "pretrain.head_hidden must be positive"),
    (["data.store.content=waveform"], "data.store.content=waveform"),
])
def test_config_errors_name_the_key(overrides, needle):
    from src.pretrain import validate_pretrain_config

    cfg = make("experiment=ssast", *TINY, *overrides)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_pretrain_config(cfg)


def test_linear_model_is_refused():
    from src.pretrain import validate_pretrain_config

    cfg = make("experiment=ssast", "model=linear_baseline")
    with pytest.raises(ConfigError, match=r"model\.type=linear"):
        validate_pretrain_config(cfg)


def test_default_masking_is_ssast():
    from src.pretrain import validate_pretrain_config

    checked = validate_pretrain_config(make("experiment=ssast"))
    assert checked["grid"] == [8, 62]  # 10 s, 128 mel bins: 496 patches (SSAST: 512)
    assert checked["mask_count"] == round(0.78 * 496)
    assert checked["cluster_sizes"] == [3, 5]


def test_patchout_shrinks_the_training_grid_only():
    from src.pretrain import validate_pretrain_config

    checked = validate_pretrain_config(make("experiment=ssast", *TINY, "model.patchout.time=2"))
    assert checked["grid"] == [2, 6] and checked["mask_count"] == 6
    assert checked["train_grid"] == [2, 4] and checked["train_mask_count"] == 4  # 6/12 of 8
    plain = validate_pretrain_config(make("experiment=ssast", *TINY))
    assert plain["train_grid"] == [2, 6] and plain["train_mask_count"] == 6


def _run_in_process(tmp_path, root, *overrides):
    from src.pretrain import run

    cfg = make("experiment=ssast", f"data.root={root}", *TINY,
               f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    return run(cfg, tmp_path / "run")


def test_pretraining_with_structured_patchout(tmp_path, folder):
    """A run with model.patchout.time: training steps on the kept grid, validation on
    the whole one, both recorded."""
    results = _run_in_process(tmp_path, folder, "model.patchout.time=2", "trainer.epochs=1",
                              "data.skip_bad_files=true")
    assert results["grid"] == [2, 6] and results["mask_count"] == 6
    assert results["train_grid"] == [2, 4] and results["train_mask_count"] == 4
    for key in ("loss", "nce_loss", "val_loss", "val_retrieval_accuracy"):
        assert math.isfinite(results["final"][key]), key
    assert (tmp_path / "run" / "backbone.keras").is_file()


def test_a_silent_validation_split_is_reported_as_nan_with_a_warning(tmp_path, caplog):
    from src.pretrain import _carve

    root = tmp_path / "audio"
    write_clip(root / "a.wav", 2.0)
    root.joinpath("b.wav").parent.mkdir(exist_ok=True)
    sf.write(root / "b.wav", np.zeros(2 * SR, np.float32), SR)  # digital silence
    seed = next(s for s in range(100) if list(_carve(np.arange(2), 0.5, s)[1]) == [1])
    with caplog.at_level(logging.WARNING):
        results = _run_in_process(tmp_path / "given", root, "trainer.epochs=1", "data.val_fraction=0.5",
                                  f"data.split_seed={seed}", "pretrain.export=null")
    assert (results["num_train"], results["num_val"]) == (1, 1)
    for key in ("val_loss", "val_nce_loss", "val_retrieval_accuracy"):
        assert math.isnan(results["final"][key]), key
    assert math.isfinite(results["final"]["nce_loss"])
    assert "the 1 validation clip(s) have no masked patch whose content varies" in caplog.text


def test_a_folder_of_silence_is_refused_and_warned_of(tmp_path, caplog):
    """Silent clips give constant features: the statistics refuse them by name; given
    statistics, the run trains on nothing and says so."""
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(3):
        sf.write(root / f"{i}.wav", np.zeros(2 * SR, np.float32), SR)
    with pytest.raises(DatasetError, match=r"training clip\(s\) give one constant value"):
        _run_in_process(tmp_path / "stats", root)
    with caplog.at_level(logging.WARNING):
        results = _run_in_process(tmp_path / "given", root, "trainer.epochs=1",
                                  "data.norm_mean=-8", "data.norm_std=3",
                                  "pretrain.export=null")
    assert math.isnan(results["final"]["nce_loss"])
    assert f"no masked patch of the {results['num_train']} training clip(s) had content " \
        "that varies" in caplog.text


def test_empty_folder_fails_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no audio files"):
        _run_in_process(tmp_path, tmp_path / "empty")
    assert not (tmp_path / "cache").exists()


def test_clips_shorter_than_one_patch_are_refused(tmp_path):
    for i in range(3):
        write_clip(tmp_path / "short" / f"{i}.wav", 0.1, index=i)  # 8 frames < 16
    with pytest.raises(DatasetError, match="shorter than one patch"):
        _run_in_process(tmp_path, tmp_path / "short")


def test_unreadable_files_stop_the_run_unless_skipped(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_bytes(b"not audio at all")
    (bad / "b.wav").write_bytes(b"")
    with pytest.raises(DatasetError, match="skip_bad_files") as err:
        _run_in_process(tmp_path, bad)
    assert "a.wav" in str(err.value) and "b.wav" in str(err.value)
    with pytest.raises(DatasetError, match="no readable audio"):
        _run_in_process(tmp_path, bad, "data.skip_bad_files=true")


def test_cli_reports_config_errors(tmp_path, folder):
    out = subprocess.run(pretrain_args(folder, "model.stride=10"), cwd=ROOT,
                         env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "model.f_stride=10" in out.stderr and "model.stride=16" in out.stderr
    assert not (tmp_path / "cache").exists()  # nothing was decoded


# ----------------------------------------------------------------------------- runs


def test_pretraining_writes_a_backbone_and_logs_both_losses(pretrained):
    from tests.wandb_offline import read_offline_history, read_offline_summary

    tmp, run_dir, r, out = pretrained
    backbone = run_dir / "backbone.keras"
    assert backbone.is_file() and r["backbone"] == str(backbone)
    assert (tmp / "weights" / "ssast.keras").read_bytes() == backbone.read_bytes()
    assert f"model.pretrained={tmp / 'weights' / 'ssast.keras'} model.pooling=mean" in out.stdout
    assert ("fine-tune with: python -m src.train <data overrides> model=ssast "
            "model.embed_dim=16 model.num_layers=1 model.num_heads=2 model.ff_dim=32 "
            "model.patch_size=16 ") in out.stdout
    assert r["epochs"] == 2 and r["grid"] == [2, 6] and r["mask_count"] == 6
    # The 18 clips of 1 s or more: the unreadable and the short one are left out.
    assert r["num_train"] + r["num_val"] == 18
    assert [p["path"].endswith("broken.wav") for p in r["skipped_files"]] == [True]
    assert [p.endswith("short.wav") for p in r["short_files"]] == [True]
    for key in ("nce_loss", "mse_loss", "retrieval_accuracy", "val_nce_loss",
                "val_mse_loss", "val_retrieval_accuracy", "learning_rate"):
        assert len(r["history"][key]) == 2, key
    np.testing.assert_allclose(
        r["history"]["loss"],
        np.array(r["history"]["nce_loss"]) + 10 * np.array(r["history"]["mse_loss"]), rtol=1e-4)
    (wandb_dir,) = list((tmp / "runs").rglob("offline-run-*"))
    rows = [row for row in read_offline_history(wandb_dir) if "nce_loss" in row]
    assert len(rows) == 2
    assert [row["nce_loss"] for row in rows] == pytest.approx(r["history"]["nce_loss"])
    assert [row["val_retrieval_accuracy"] for row in rows] == pytest.approx(
        r["history"]["val_retrieval_accuracy"])
    assert all("mse_loss" in row and "retrieval_accuracy" in row for row in rows)
    assert read_offline_summary(wandb_dir)["backbone"] == str(backbone)


def test_backbone_loads_for_fine_tuning_with_overlapping_strides(pretrained):
    """model.pretrained puts the non-overlapping pretrained weights into a stride-10,
    mean-pooled model: the blocks copied, the position grid interpolated (2 x 6 -> 2 x 9)."""
    from src.models import load_model
    from src.models.pretrained import adapt_position_embedding, load_pretrained

    _, run_dir, _, _ = pretrained
    saved = load_model(run_dir / "backbone.keras").backbone
    target = _tiny_backbone(f_stride=10, t_stride=10, pooling="mean", norm_first=True,
                            activation="gelu")
    report = load_pretrained(target, run_dir / "backbone.keras")
    assert report.position_grid == ((2, 6), (2, 9))
    np.testing.assert_allclose(
        target.patch_embed.position_embedding.numpy(),
        adapt_position_embedding(saved.patch_embed.position_embedding.numpy(), (2, 6), (2, 9),
                                 1, 1))
    for a, b in zip(target.blocks[0].weights, saved.blocks[0].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(target.patch_embed.projection.kernel.numpy(),
                                  saved.patch_embed.projection.kernel.numpy())
    logits = target(np.zeros((2, 98, 32), np.float32))
    assert logits.shape == (2, 2) and np.isfinite(np.asarray(logits)).all()


def test_freeze_keeps_the_pretrained_patch_embedding(pretrained):
    """model.freeze=1 (experiment=ssast_quickstart): fine-tuning trains the blocks and the
    head, not the pretrained patch embedding; freeze=0 trains everything."""
    import keras

    from src.models.pretrained import load_pretrained

    _, run_dir, _, _ = pretrained
    x = np.random.default_rng(3).normal(size=(4, 98, 32)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    for freeze in (1, 0):
        bb = _tiny_backbone(freeze=freeze, pooling="mean", norm_first=True, activation="gelu")
        load_pretrained(bb, run_dir / "backbone.keras")
        before = {v.path: v.numpy().copy() for v in bb.weights}
        bb.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
        bb.fit(x, y, epochs=1, verbose=0)
        moved = {v.path for v in bb.weights if not np.allclose(v.numpy(), before[v.path])}
        assert any("block_0" in m for m in moved) and any("classifier" in m for m in moved)
        assert any("patch_embed" in m for m in moved) == (freeze == 0), moved
    with pytest.raises(ValueError, match="model.freeze=3"):
        _tiny_backbone(freeze=3)  # one block: at most 2 stages


def _fine_tune(pretrained, folder, *overrides):
    """`python -m src.train` on the folder from the pretrained backbone (model=ssast, the
    tiny model, mean pooling), with ``overrides``."""
    tmp, run_dir, _, _ = pretrained
    return subprocess.run(
        [sys.executable, "-m", "src.train", "data=folder", f"data.root={folder}",
         "data.labels_from_subdirs=true", "data.num_folds=2", "data.folds=[1]",
         "data.skip_bad_files=true", "data.max_skipped_fraction=0.1",  # 1 of 11
         "model=ssast", *TINY_MODEL, "model.pooling=mean",
         # The run dir's name holds "=" and ",": quoted for Hydra, as src.pretrain prints it.
         f"model.pretrained='{run_dir / 'backbone.keras'}'", "trainer.epochs=1", *overrides],
        cwd=ROOT, env=train_env(tmp), capture_output=True, text=True, timeout=300,
    )


def test_fine_tuning_run_from_the_backbone(pretrained, folder):
    """`python -m src.train ... model.pretrained=PATH model.pooling=mean` with stride 10."""
    tmp, run_dir, _, _ = pretrained
    out = _fine_tune(pretrained, folder, "model.stride=10", "trainer.attention_maps=0",
                     "name=finetune")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (res,) = list((tmp / "runs" / "finetune").rglob("fold_1/results.json"))
    r = json.loads(res.read_text())
    assert "position grid 2x6 -> 2x9" in r["pretrained"]
    assert r["pretrained"].startswith(str(run_dir / "backbone.keras"))


def test_freezing_without_pretrained_weights_is_warned_of(tmp_path, folder):
    """model=ssast keeps its patch embedding fixed (model.freeze=1): without
    model.pretrained it would stay at its random start, and the log says so."""
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "data=folder", f"data.root={folder}",
         "data.labels_from_subdirs=true", "data.num_folds=2", "data.folds=[1]",
         "data.skip_bad_files=true", "data.max_skipped_fraction=0.1",  # 1 of 11
         "model=ssast", *TINY_MODEL, "trainer.epochs=1",
         "trainer.attention_maps=0"],
        cwd=ROOT, env=train_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "model.freeze=1 keeps the lowest stage(s) fixed, but no weights are loaded" in (
        out.stdout + out.stderr)


def test_pretraining_on_a_single_recording_finishes_without_validation(tmp_path):
    """One long recording: no validation split, so Keras' CSV log holds `NA` columns;
    the run still writes its backbone and results, with the training metrics only."""
    root = tmp_path / "one"
    write_clip(root / "rec.wav", 3.0)
    out = subprocess.run(pretrain_args(root, "trainer.epochs=2", "pretrain.export=null"),
                         cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "one clip only: no validation split" in out.stdout + out.stderr
    (results,) = list((tmp_path / "runs").rglob("results.json"))
    r = json.loads(results.read_text())
    assert (r["num_train"], r["num_val"]) == (1, 0)
    assert (results.parent / "backbone.keras").is_file()
    assert len(r["history"]["nce_loss"]) == 2 and all(np.isfinite(r["history"]["nce_loss"]))
    assert not any(k.startswith("val_") and r["history"][k] for k in r["history"])

    # Rerun: complete on the same audio; refused (exit 2) once the recording changed, so
    # that the old backbone is not reported (and exported) as if pretrained on it.
    args = pretrain_args(root, "trainer.epochs=2", "pretrain.export=null")
    again = subprocess.run(args, cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "is complete" in again.stdout + again.stderr
    write_clip(root / "rec.wav", 3.0, cls=1)
    changed = subprocess.run(args, cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert f"the pretraining in {results.parent} was finished on other inputs" in (
        changed.stderr)
    assert json.loads(results.read_text()) == r


def test_a_pretrained_file_that_does_not_fit_fails_before_the_features(pretrained, folder):
    tmp = pretrained[0]
    out = _fine_tune(pretrained, folder, "model.num_layers=2", "name=misfit")
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-5000:]
    assert "does not fit the configured model: model.num_layers=2 (pretrained: 1)" in out.stderr
    assert "Set these keys to the pretrained values: model.num_layers=1" in out.stderr
    assert "store" not in out.stdout + out.stderr  # before the feature pass
    assert not list((tmp / "runs" / "misfit").rglob("fold_*"))


@pytest.mark.slow
def test_killed_pretraining_resumes_with_the_same_command(tmp_path, folder):
    args = pretrain_args(folder, "trainer.epochs=12", "name=resume")
    env = env_for(tmp_path)
    csv_path = kill_after_epochs(args, env, tmp_path / "runs" / "resume", "metrics.csv", 3)
    assert csv_path is not None, "the run finished or stalled before it could be killed"
    run_dir = csv_path.parent
    assert not (run_dir / "backbone.keras").exists()
    logged = epochs_logged(csv_path)
    resumed = json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"]
    # The backup is written after each epoch's log row: a kill between the two resumes
    # from the epoch before.
    assert logged - 1 <= resumed <= logged and 2 <= resumed < 12

    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert f"resuming after {resumed} completed epoch(s)" in out.stdout + out.stderr
    r = json.loads((run_dir / "results.json").read_text())
    assert r["epochs"] == 12 and len(r["history"]["nce_loss"]) == 12
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(12))
    # The schedule continued from the saved step: a fresh start would repeat the warmup.
    lrs = r["history"]["learning_rate"]
    assert lrs[resumed] > 2 * lrs[0]
    assert (run_dir / "backbone.keras").is_file() and not (run_dir / "backup").exists()
    # Every epoch as in a run that was never killed: the masks, crops and order of the
    # trained epochs replayed, the random generators restored with the weights.
    assert "replaying the input of the" in out.stdout + out.stderr
    whole = subprocess.run(args, cwd=ROOT, env=env_for(tmp_path / "whole"),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_csv,) = (tmp_path / "whole" / "runs" / "resume").rglob("metrics.csv")

    def epochs(path):
        import csv

        with open(path, newline="") as fh:
            return [{k: float(v) for k, v in row.items() if k != "epoch_time_s"}
                    for row in csv.DictReader(fh)]

    for a, b in zip(epochs(whole_csv), epochs(run_dir / "metrics.csv"), strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), (a, b)

    # A finished run only reports where its backbone is (and refreshes the stable copy).
    stable = tmp_path / "weights" / "resume.keras"
    stamp = (run_dir / "backbone.keras").stat().st_mtime_ns
    stable.unlink()
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and str(run_dir / "backbone.keras") in again.stdout
    assert (run_dir / "backbone.keras").stat().st_mtime_ns == stamp
    assert stable.read_bytes() == (run_dir / "backbone.keras").read_bytes()
    assert f"model.pretrained={stable} model.pooling=mean" in again.stdout
