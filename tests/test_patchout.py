"""PaSST's patchout and disentangled position embeddings, and loading pretrained
position embeddings across the two kinds."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from src.models.audio_transformer import SpectrogramTransformer
from src.models.build import build_model
from src.models.patch import PatchEmbedding
from src.models.pretrained import (
    disentangled_to_grid,
    grid_to_disentangled,
    load_pretrained,
    resize_disentangled,
)

RNG = np.random.default_rng(0)
MELS, FRAMES = 32, 64  # stride 8: a 3 x 7 patch grid; stride 16: 2 x 4
PATCHOUT = dict(time=2, freq=1, random=3)


def rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


def npy(x):
    return keras.ops.convert_to_numpy(x)


def backbone(frames=FRAMES, build=True, **overrides):
    kwargs = dict(num_classes=5, num_frames=frames, num_mels=MELS, embed_dim=16, num_layers=2,
                  num_heads=2, ff_dim=32, f_stride=8, t_stride=8, dropout_rate=0.0)
    kwargs.update(overrides)
    model = SpectrogramTransformer(**kwargs)
    if build:
        model.build((None, frames, MELS))
    return model


# ---------------------------------------------------------------- patchout


@pytest.mark.parametrize("pos_embedding", ["grid", "disentangled"])
@pytest.mark.parametrize("pooling,pooled_last_block",
                         [("cls", True), ("cls", False), ("cls_dist", True),
                          ("cls_dist", False), ("mean", True)])
def test_patchout_changes_training_only(pos_embedding, pooling, pooled_last_block):
    kw = dict(pooling=pooling, pooled_last_block=pooled_last_block, pos_embedding=pos_embedding)
    plain = backbone(**kw)
    dropped = backbone(patchout=PATCHOUT, **kw)
    dropped.set_weights(plain.get_weights())
    x = rand(3, FRAMES, MELS)
    # Inference: every patch, the same logits as the model without patchout.
    np.testing.assert_array_equal(npy(dropped(x)), npy(plain(x)))
    np.testing.assert_array_equal(npy(dropped(x, training=False)), npy(plain(x, training=False)))
    prefix = 2 if pooling == "cls_dist" else 1
    assert dropped.encode(x)[0].shape == (3, prefix + 3 * 7, 16)
    # Training: (3 - 1) x (7 - 2) - 3 = 7 patches, and other logits.
    tokens, _ = dropped.encode(x, training=True)
    assert tokens.shape == (3, prefix + 7, 16)
    assert dropped.patch_embed.num_train_patches == 7
    train = npy(dropped(x, training=True))
    assert train.shape == (3, 5) and np.isfinite(train).all()
    assert not np.allclose(train, npy(plain(x, training=True)), atol=1e-4)


@pytest.mark.parametrize(
    "patchout,patches",
    [(dict(time=3), 3 * 4), (dict(freq=2), 1 * 7), (dict(random=20), 1),
     (dict(time=6, freq=2), 1), (dict(time=1, freq=1, random=11), 1)],
)
def test_number_of_tokens_after_patchout(patchout, patches):
    model = backbone(patchout=patchout)
    tokens, _ = model.encode(rand(2, FRAMES, MELS), training=True)
    assert tokens.shape == (2, 1 + patches, 16)


def _identified_patch_embedding(pos_embedding, patchout, frames=FRAMES):
    """A patch embedding whose channel 0 carries the grid position of each token:
    100 * frequency row + time column + 1 (the prefix: 0), and whose other channels
    carry the input."""
    emb = PatchEmbedding(8, f_stride=8, t_stride=8, num_mels=MELS, num_frames=frames,
                         pos_embedding=pos_embedding, patchout=patchout)
    emb.build((None, frames, MELS))
    kernel, bias = emb.projection.get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.0
    emb.projection.set_weights([kernel, bias])
    emb.cls_token.assign(np.zeros((1, 1, 8), "float32"))
    f, t = np.meshgrid(np.arange(emb.f_dim), np.arange(emb.t_dim), indexing="ij")
    ids = (100 * f + t + 1).astype("float32")  # (f_dim, t_dim)
    if pos_embedding == "grid":
        pos = np.zeros((1, 1 + emb.num_patches, 8), "float32")
        pos[0, 1:, 0] = ids.reshape(-1)  # frequency-major
        emb.position_embedding.assign(pos)
    else:
        freq = np.zeros((emb.f_dim, 8), "float32")
        time = np.zeros((emb.t_dim, 8), "float32")
        freq[:, 0] = 100 * np.arange(emb.f_dim)
        time[:, 0] = np.arange(emb.t_dim) + 1
        emb.freq_embedding.assign(freq)
        emb.time_embedding.assign(time)
        emb.prefix_embedding.assign(np.zeros((1, 1, 8), "float32"))
    return emb


@pytest.mark.parametrize("pos_embedding", ["grid", "disentangled"])
@pytest.mark.parametrize("random", [0, 4])
def test_dropped_patches_are_shared_by_the_batch_and_redrawn_each_step(pos_embedding, random):
    emb = _identified_patch_embedding(pos_embedding, dict(time=3, freq=1, random=random))
    x = rand(4, FRAMES, MELS)
    full = npy(emb(x))
    np.testing.assert_array_equal(full[0, 1:, 0], (100 * np.arange(3)[:, None]
                                                   + np.arange(7) + 1).reshape(-1))
    drawn = set()
    for _ in range(6):
        out = npy(emb(x, training=True))
        assert out.shape == (4, 1 + 2 * 4 - random, 8)
        ids = np.rint(out[:, :, 0]).astype(int)
        assert (ids[:, 0] == 0).all()  # the [CLS] token is never dropped
        ids = ids[:, 1:]
        assert (ids == ids[0]).all()  # the same patches for every example
        assert not np.allclose(out[0, 1:, 1:], out[1, 1:, 1:])  # of different examples
        assert (np.diff(ids[0]) > 0).all()  # in grid order
        rows, cols = set(ids[0] // 100), set(ids[0] % 100 - 1)
        assert len(rows) <= 2 and len(cols) <= 4  # whole rows and columns dropped
        if not random:
            assert len(rows) == 2 and len(cols) == 4
            assert set(ids[0]) == {100 * r + c + 1 for r in rows for c in cols}
        # each kept patch is the full (not patched-out) token of its position
        where = [int(np.flatnonzero(full[0, 1:, 0] == i)[0]) for i in ids[0]]
        np.testing.assert_allclose(out[:, 1:], full[:, 1:][:, where], atol=1e-6)
        drawn.add(tuple(ids[0]))
    assert len(drawn) > 1  # new patches each step


def test_patchout_can_be_turned_off_per_call_and_attention_maps_cover_the_grid():
    model = backbone(patchout=PATCHOUT)
    x = rand(2, FRAMES, MELS)
    assert npy(model.patch_embed(x, training=True, patchout=False)).shape == (2, 22, 16)
    _, weights = model(x, training=True, return_attention_scores=True)
    assert weights[0].shape == (2, 2, 22, 22)


@pytest.mark.parametrize("pooling", ["cls", "cls_dist"])
def test_pooled_last_block_with_patchout_gives_the_full_computation(pooling):
    kw = dict(pooling=pooling, patchout=PATCHOUT, norm_first=True)
    pruned = backbone(pooled_last_block=True, **kw)
    full = backbone(pooled_last_block=False, **kw)
    full.set_weights(pruned.get_weights())
    x = rand(3, FRAMES, MELS)
    for _ in range(2):
        # the same random state: the same patches dropped
        full.patch_embed.seed_generator.state.assign(pruned.patch_embed.seed_generator.state)
        a, b = npy(pruned(x, training=True)), npy(full(x, training=True))
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, npy(pruned(x)), atol=1e-4)


@pytest.mark.parametrize(
    "precision,jit,pos_embedding",
    [("mixed_bfloat16", False, "disentangled"), ("mixed_bfloat16", True, "grid")],
)
def test_fit_with_patchout(precision, jit, pos_embedding):
    keras.utils.set_random_seed(0)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = backbone(patchout=dict(time=2, freq=1, random=2), pooling="cls_dist",
                         pos_embedding=pos_embedding, norm_first=True, activation="gelu")
        assert model.patch_embed.compute_dtype == ("bfloat16" if "bf" in precision
                                                   else "float32")
        x = rand(32, FRAMES, MELS)
        y = (np.arange(32) % 2).astype("int32")
        x[y == 1, :, :8] += 2.0
        model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        state = npy(model.patch_embed.seed_generator.state).copy()
        hist = model.fit(x, y, epochs=12, batch_size=16, verbose=0).history["loss"]
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.isfinite(hist).all() and np.mean(hist[-3:]) < 0.5 * hist[0]
    # the patchout draws advanced inside the (compiled) training step
    assert not np.array_equal(npy(model.patch_embed.seed_generator.state), state)
    assert npy(model(x)).shape == (32, 5)


@pytest.mark.parametrize(
    "patchout,match",
    [
        (dict(time=60), r"model\.patchout\.time=60 drops more time columns than the patch grid "
                        r"has \(12 x 50 for 128 mel bins x 512 frames\)"),
        (dict(time=50), r"model\.patchout\.time=50 drops all 50 time columns .*12 x 50"),
        (dict(freq=13), r"model\.patchout\.freq=13 drops more frequency rows .*12 x 50"),
        (dict(freq=12), r"model\.patchout\.freq=12 drops all 12 frequency rows"),
        (dict(time=49, freq=11, random=1), r"model\.patchout\.random=1 drops all of the 1 "),
        (dict(random=601), r"model\.patchout\.random=601 drops more than the 600 patches"),
        (dict(tim=3), r"unknown key model\.patchout\.tim"),
        (dict(time=-1), r"model\.patchout\.time must be >= 0"),
        (dict(time=1.5), r"model\.patchout\.time must be a whole number"),
        (7, r"model\.patchout must be a mapping"),
    ],
)
def test_bad_patchout_fails_at_construction(patchout, match):
    with pytest.raises(ValueError, match=match):
        SpectrogramTransformer(5, 512, 128, f_stride=10, t_stride=10, patchout=patchout)


def test_largest_patchout_leaves_one_patch():
    model = SpectrogramTransformer(5, 512, 128, f_stride=10, t_stride=10,
                                   patchout=dict(time=49, freq=11))
    assert model.patch_embed.num_train_patches == 1


def test_bad_patchout_is_a_config_error():
    from hydra import compose, initialize_config_dir

    from src.config import ConfigError, validate_config
    from tests.helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        good = compose(config_name="train", overrides=["experiment=esc50_passt"])
        bad = compose(config_name="train",
                      overrides=["experiment=esc50_passt", "model.patchout.time=60"])
    assert dict(good.model.patchout) == dict(time=10, freq=3, random=0)
    assert good.model.pos_embedding == "disentangled"
    with pytest.raises(ConfigError, match=r"model\.patchout\.time=60 .*\(12 x 50 for 128 mel"):
        validate_config(bad)
    with pytest.raises(ValueError, match="model.pos_embedding must be one of"):
        backbone(pos_embedding="learned", build=False)


# ---------------------------------------------------------------- position embeddings


def test_disentangled_embedding_of_a_shorter_input_by_hand():
    emb = PatchEmbedding(8, f_stride=8, t_stride=8, num_mels=MELS, num_frames=FRAMES,
                         pos_embedding="disentangled", distillation_token=True)
    emb.build((None, FRAMES, MELS))
    assert (emb.f_dim, emb.t_dim) == (3, 7)
    frames = 40  # (40 - 16) // 8 + 1 = 4 patch columns
    x = rand(2, frames, MELS)
    out = npy(emb(x))
    assert out.shape == (2, 2 + 3 * 4, 8)
    kernel, bias = emb.projection.get_weights()  # (16, 16, 1, D): (freq, time) patch
    freq, time = emb.freq_embedding.numpy(), emb.time_embedding.numpy()
    prefix = emb.prefix_embedding.numpy()
    spec = x.transpose(0, 2, 1)  # (B, mels, frames)
    expected = np.zeros((2, 3, 4, 8), "float64")
    for i in range(3):
        for j in range(4):
            patch = spec[:, 8 * i:8 * i + 16, 8 * j:8 * j + 16]
            expected[:, i, j] = np.einsum("bft,ftd->bd", patch, kernel[:, :, 0]) + bias
            expected[:, i, j] += freq[i] + time[j]  # the first 4 time positions
    np.testing.assert_allclose(out[:, 2:], expected.reshape(2, 12, 8), atol=1e-4)
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(emb.cls_token.numpy()[0, 0]
                                                          + prefix[0, 0], (2, 8)), atol=1e-6)
    np.testing.assert_allclose(out[:, 1], np.broadcast_to(emb.dist_token.numpy()[0, 0]
                                                          + prefix[0, 1], (2, 8)), atol=1e-6)
    # Training: the same 4 columns of the time embedding, from a random offset (0..3).
    without_time = expected - time[None, None, :4]
    offsets = set()
    for _ in range(12):
        got = npy(emb(x, training=True))[:, 2:].reshape(2, 3, 4, 8)
        for o in range(4):
            if np.allclose(got, without_time + time[None, None, o:o + 4], atol=1e-4):
                offsets.add(o)
                break
        else:
            raise AssertionError("training tokens use no contiguous run of time positions")
    assert len(offsets) > 1


def fn_train(model, x):
    """The tokens of a training-mode encode traced for any length (dynamic shapes)."""
    fn = tf.function(lambda v: model.encode(v, training=True)[0],
                     input_signature=[tf.TensorSpec((None, None, MELS))])
    return fn(x)


def test_disentangled_model_takes_any_length_up_to_the_training_one():
    model = backbone(pos_embedding="disentangled", patchout=PATCHOUT)
    x = rand(2, FRAMES, MELS)
    full = npy(model(x))
    short = npy(model(x[:, :30]))
    assert short.shape == (2, 5) and not np.allclose(short, full)
    # one traced function for every length
    fn = tf.function(lambda v: model(v), input_signature=[tf.TensorSpec((None, None, MELS))])
    np.testing.assert_allclose(npy(fn(x)), full, atol=1e-5)
    np.testing.assert_allclose(npy(fn(x[:, :30])), short, atol=1e-5)
    assert npy(model.encode(x[:, :30])[0]).shape == (2, 1 + 3 * 2, 16)
    # and training on the shorter clips (random time offset; patchout drops the share it
    # drops of the 7 training columns: 1 of 4 columns, then 2 of the 6 patches left, as 3
    # of 10 at the training length)
    tokens, _ = model.encode(x[:, :40], training=True)
    assert tokens.shape == (2, 1 + (3 - 1) * (4 - 1) - 2, 16)
    # one column: none of it dropped, and at least one patch kept
    tokens, _ = model.encode(x[:, :20], training=True)
    assert tokens.shape == (2, 1 + (3 - 1) * 1 - 1, 16)
    tokens = fn_train(model, x[:, :20])
    assert tokens.shape == (2, 1 + (3 - 1) * 1 - 1, 16)
    # a symbolic input of any length
    out = model(keras.Input((None, MELS)))
    assert tuple(out.shape) == (None, 5)
    fresh = backbone(pos_embedding="disentangled", build=False)
    fresh.build((None, None, MELS))
    assert npy(fresh(x[:, :20])).shape == (2, 5)
    # longer than the position embedding: the caller must cut windows
    with pytest.raises(ValueError, match="cut the input into windows of at most 64 frames"):
        model(rand(2, 72, MELS))
    with pytest.raises(tf.errors.InvalidArgumentError, match="cut it into windows"):
        fn(rand(2, 72, MELS))
    with pytest.raises(ValueError, match="fewer than one patch"):
        model(rand(2, 12, MELS))


def test_grid_model_needs_the_training_length():
    model = backbone()
    msg = ("got 48 frames: a grid position embedding fixes the input to 64 frames; pad/crop or "
           "window the input, or use model.pos_embedding=disentangled")
    with pytest.raises(ValueError, match=msg):
        model(rand(2, 48, MELS))
    with pytest.raises(ValueError, match="fixes the input to 64 frames"):
        backbone(build=False).build((None, 72, MELS))
    fn = tf.function(lambda v: model(v), input_signature=[tf.TensorSpec((None, None, MELS))])
    assert npy(fn(rand(2, FRAMES, MELS))).shape == (2, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="fixes the input to 64 frames"):
        fn(rand(2, 48, MELS))


@pytest.mark.parametrize("pos_embedding", ["grid", "disentangled"])
def test_keras_round_trip(pos_embedding, tmp_path):
    model = build_model(
        dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, pooling="cls_dist",
             pos_embedding=pos_embedding, patchout=dict(time=1, freq=1, random=1)),
        dict(n_mels=MELS), num_classes=4, clip_samples=8000, norm_mean=-1.0, norm_std=2.0,
    )
    x = rand(2, 8000)
    before = npy(model(x))
    model.save(tmp_path / "m.keras")
    from src.models import load_model

    loaded = load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(npy(loaded(x)), before)
    h = loaded.backbone.hparams
    assert h == model.backbone.hparams
    assert h["pos_embedding"] == pos_embedding
    assert h["patchout"] == dict(time=1, freq=1, random=1)
    feats = model.features(x)
    n = loaded.backbone.patch_embed.num_train_patches
    assert loaded.backbone.encode(feats, training=True)[0].shape[1] == 2 + n


# ---------------------------------------------------------------- pretrained


def test_grid_to_disentangled_by_hand():
    # prefix 2, grid 2 x 3, D = 2
    grid = np.arange(12, dtype="float32").reshape(2, 3, 2) ** 2
    prefix = np.array([[[-1, -2], [-3, -4]]], "float32")
    pos = np.concatenate([prefix, grid.reshape(1, 6, 2)], axis=1)
    p, freq, time = grid_to_disentangled(pos, (2, 3), (2, 3), 2, 1)
    np.testing.assert_array_equal(p, prefix[:, :1])
    np.testing.assert_allclose(freq, [grid[0].mean(0), grid[1].mean(0)], rtol=1e-6)
    np.testing.assert_allclose(time, [grid[:, j].mean(0) for j in range(3)], rtol=1e-6)
    # to a 2 x 2 grid: AST's middle cut (columns 0, 1 of 3), then the means
    _, freq, time = grid_to_disentangled(pos, (2, 3), (2, 2), 2, 2)
    np.testing.assert_allclose(freq, [grid[0, :2].mean(0), grid[1, :2].mean(0)], rtol=1e-6)
    np.testing.assert_allclose(time, [grid[:, 0].mean(0), grid[:, 1].mean(0)], rtol=1e-6)
    # to 2 x 6: linear interpolation over time (half-pixel centres), then the means
    _, freq, time = grid_to_disentangled(pos, (2, 3), (2, 6), 2, 2)
    # sources of the 6 columns: max(0, (j + 0.5) / 2 - 0.5) = 0, .25, .75, 1.25, 1.75, 2.25
    w = [(0, 0, 0.0), (0, 1, .25), (0, 1, .75), (1, 2, .25), (1, 2, .75), (2, 2, .25)]
    cols = np.stack([grid[:, a] * (1 - f) + grid[:, b] * f for a, b, f in w], axis=1)
    np.testing.assert_allclose(time, cols.mean(0), rtol=1e-5)
    np.testing.assert_allclose(freq, cols.mean(1), rtol=1e-5)


def test_disentangled_to_grid_and_between_disentangled_by_hand():
    prefix = np.array([[[1.0, 2.0], [3.0, 4.0]]], "float32")
    freq = np.array([[0, 10], [20, 30], [40, 50]], "float32")
    time = np.array([[1, 0], [2, 0], [3, 0], [4, 0]], "float32")
    pos = disentangled_to_grid(prefix, freq, time, (3, 4), 2)
    assert pos.shape == (1, 2 + 12, 2)
    np.testing.assert_array_equal(pos[:, :2], prefix)
    for i in range(3):
        for j in range(4):
            np.testing.assert_array_equal(pos[0, 2 + 4 * i + j], freq[i] + time[j])
    cut = disentangled_to_grid(prefix, freq, time, (3, 2), 1)  # then AST's middle cut
    np.testing.assert_array_equal(cut[0, 1:].reshape(3, 2, 2), (freq[:, None] + time[None, 1:3]))
    # disentangled -> disentangled
    p, f2, t2 = resize_disentangled(prefix, freq, time, (3, 2), 1)
    np.testing.assert_array_equal(p, prefix[:, :1])
    np.testing.assert_array_equal(f2, freq)
    np.testing.assert_array_equal(t2, time[:2])  # the first positions, as a shorter clip
    _, f2, t2 = resize_disentangled(prefix, freq, time, (2, 8), 2)
    np.testing.assert_array_equal(f2, freq[0:2])  # middle cut: start 3 // 2 - 1 = 0
    # 8 from 4 time positions: sources max(0, (j + .5) / 2 - .5) = 0, .25, .75, ..., 3.25
    src = np.maximum((np.arange(8) + 0.5) / 2 - 0.5, 0)
    np.testing.assert_allclose(t2[:, 0], np.interp(src, np.arange(4), time[:, 0]), rtol=1e-6)
    _, _, t2 = resize_disentangled(prefix, freq, time, (3, 2), 2, "bilinear")
    np.testing.assert_allclose(t2[:, 0], [1.5, 3.5], rtol=1e-6)


def test_load_pretrained_across_position_embeddings():
    grid_src = backbone(norm_first=True, pooling="cls_dist", f_stride=16, t_stride=16)
    dis_src = backbone(frames=96, pos_embedding="disentangled", norm_first=True,
                       pooling="cls_dist", f_stride=16, t_stride=16)
    assert grid_src.grid == (2, 4) and dis_src.grid == (2, 6)
    x = rand(2, FRAMES, MELS)

    # disentangled -> grid, same grid: the same function
    dis_same = backbone(pos_embedding="disentangled", norm_first=True, pooling="cls_dist",
                        f_stride=16, t_stride=16)
    to_grid = backbone(norm_first=True, pooling="cls_dist", f_stride=16, t_stride=16,
                       num_classes=5)
    report = load_pretrained(to_grid, dis_same)
    assert any("summed into a grid" in n for n in report.notes) and not report.new_head
    np.testing.assert_allclose(npy(to_grid(x)), npy(dis_same(x)), atol=1e-5)

    # disentangled (96 frames) -> disentangled (64 frames): the pretrained model on 64 frames
    shorter = backbone(pos_embedding="disentangled", norm_first=True, pooling="cls_dist",
                       f_stride=16, t_stride=16)
    report = load_pretrained(shorter, dis_src)
    assert report.position_grid == ((2, 6), (2, 4))
    np.testing.assert_allclose(npy(shorter(x)), npy(dis_src(x)), atol=1e-5)

    # grid -> disentangled: the means of the grid
    target = backbone(pos_embedding="disentangled", norm_first=True, pooling="cls",
                      f_stride=16, t_stride=16)
    report = load_pretrained(target, grid_src)
    assert any("split into frequency and time" in n for n in report.notes)
    pos = grid_src.patch_embed.position_embedding.numpy()
    grid = pos[0, 2:].reshape(2, 4, 16)
    pe = target.patch_embed
    np.testing.assert_allclose(pe.freq_embedding.numpy(), grid.mean(1), atol=1e-6)
    np.testing.assert_allclose(pe.time_embedding.numpy(), grid.mean(0), atol=1e-6)
    np.testing.assert_array_equal(pe.prefix_embedding.numpy(), pos[:, :1])
    for a, b in zip(target.blocks[0].get_weights(), grid_src.blocks[0].get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- benchmark


def test_flops_of_passt_audioset_shape_with_patchout():
    from scripts.benchmark import model_flops

    d, ff = 192, 768
    full, patches = model_flops(d, 4, ff, 128, 998, 16, 10, 10, 527)
    dropped, same = model_flops(d, 4, ff, 128, 998, 16, 10, 10, 527, patchout=(40, 4, 0))
    assert patches == same == 12 * 99

    def forward(n):  # 4 blocks over n tokens: q/k/v/out, two attention matmuls, MLP
        return 4 * (2 * 4 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * ff)

    conv, head = 2 * 1188 * 256 * d, 2 * d * 527  # the convolution sees every patch
    assert full == conv + forward(1188 + 2) + head
    assert dropped == conv + forward(8 * 59 + 2) + head
    assert full / dropped > 2.5


@pytest.mark.slow
def test_model_benchmark_times_patchout_against_no_patchout(tmp_path):
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT, train_env

    cmd = [sys.executable, "-m", "scripts.benchmark", "model", "--embed", "16", "--layers", "1",
           "--heads", "2", "--ff", "32", "--mels", "32", "--frames", "64", "--stride", "16",
           "--batch", "4", "--repeats", "1", "--full-last-block"]
    env = train_env(tmp_path, WANDB_MODE="disabled")
    out = subprocess.run(cmd + ["--patchout", "1,1,1", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grid"] == [2, 4] and r["train_patches"] == (2 - 1) * (4 - 1) - 1
    assert r["patchout"] == dict(time=1, freq=1, random=1)
    # every row of the one block: 8 patches at inference, 2 in training (+ [CLS], [DIST])
    conv, head = 2 * 8 * 256 * 16, 2 * 16 * 50

    def forward(n):
        return conv + 2 * 4 * n * 16 * 16 + 2 * 2 * n * n * 16 + 2 * 2 * n * 16 * 32 + head

    assert r["gflops_per_clip_forward"] * 1e9 == pytest.approx(forward(10))
    assert r["gflops_per_clip_train_forward"] * 1e9 == pytest.approx(forward(4))
    for key in ("train_clips_per_s_without_patchout", "infer_clips_per_s_without_patchout",
                "patchout_train_speedup", "patchout_infer_ratio"):
        assert r[key] > 0
    bad = subprocess.run(cmd + ["--patchout", "3"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--patchout takes T,F or T,F,R" in bad.stderr
