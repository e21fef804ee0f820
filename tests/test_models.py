"""The hand-written attention, the transformer block and the audio model."""

import keras
import numpy as np
import pytest

from src.models.attention import MultiHeadSelfAttention
from src.models.audio_transformer import SpectrogramTransformer
from src.models.build import build_model
from src.models.patch import PatchEmbedding, grid_size
from src.models.spec import SpecAugment
from src.models.transformer import TransformerBlock
from src.models.waveform import preprocess_waveform

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype("float32")


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_attention_shapes_and_softmax_rows(heads):
    att = MultiHeadSelfAttention(32, heads)
    x = rand(3, 7, 32)
    out, w = att(x, return_attention_scores=True)
    assert out.shape == (3, 7, 32)
    assert w.shape == (3, heads, 7, 7)
    w = keras.ops.convert_to_numpy(w)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, atol=1e-5)  # softmax over the keys
    assert (w >= 0).all()


def test_attention_softmax_is_over_keys_not_queries():
    # With distinct keys, columns of the weight matrix do not sum to 1 in general;
    # rows do. A softmax over the wrong axis would swap the two.
    att = MultiHeadSelfAttention(16, 2)
    _, w = att(rand(2, 5, 16) * 3, return_attention_scores=True)
    w = keras.ops.convert_to_numpy(w)
    assert not np.allclose(w.sum(axis=-2), 1.0, atol=1e-3)


def test_masked_keys_get_zero_weight():
    att = MultiHeadSelfAttention(16, 4)
    x = rand(2, 6, 16)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    out, w = att(x, mask=mask, return_attention_scores=True)
    w = keras.ops.convert_to_numpy(w)
    assert np.all(w[0, :, :, 4:] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    # Padding content must not change the output of the unpadded positions.
    x2 = x.copy()
    x2[0, 4:] = rand(2, 16) * 10
    out2 = att(x2, mask=mask)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(out)[0, :4], keras.ops.convert_to_numpy(out2)[0, :4], atol=1e-5
    )


def test_matches_keras_multi_head_attention():
    d, h, s = 32, 4, 9
    ours = MultiHeadSelfAttention(d, h)
    x = rand(2, s, d)
    ours(x)
    ref = keras.layers.MultiHeadAttention(num_heads=h, key_dim=d // h)
    ref(x, x)
    # Keras' EinsumDense kernels are (D, H, D/H) for q/k/v and (H, D/H, D) for the output:
    # the same numbers as our (D, D) kernels, split by heads the way split_heads does.
    for ours_dense, ref_dense in [
        (ours.query_dense, ref._query_dense),
        (ours.key_dense, ref._key_dense),
        (ours.value_dense, ref._value_dense),
    ]:
        k, b = ours_dense.get_weights()
        ref_dense.set_weights([k.reshape(d, h, d // h), b.reshape(h, d // h)])
    k, b = ours.combine_heads.get_weights()
    ref._output_dense.set_weights([k.reshape(h, d // h, d), b])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(ours(x)), keras.ops.convert_to_numpy(ref(x, x)), atol=1e-5
    )


def test_attention_dropout_only_in_training():
    att = MultiHeadSelfAttention(16, 2, dropout_rate=0.5)
    x = rand(2, 5, 16)
    a = keras.ops.convert_to_numpy(att(x, training=False))
    b = keras.ops.convert_to_numpy(att(x, training=False))
    np.testing.assert_array_equal(a, b)
    c = keras.ops.convert_to_numpy(att(x, training=True))
    assert not np.allclose(a, c)


@pytest.mark.parametrize("embed,heads", [(30, 4), (64, 5), (7, 2)])
def test_attention_rejects_indivisible_heads(embed, heads):
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MultiHeadSelfAttention(embed, heads)


def test_attention_keeps_the_notes_attribute_names():
    att = MultiHeadSelfAttention(8, 2)
    for name in ("query_dense", "key_dense", "value_dense", "combine_heads"):
        assert isinstance(getattr(att, name), keras.layers.Dense)
    assert callable(att.split_heads) and callable(att.attention)


# ---------------------------------------------------------------- block


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("heads,ff", [(1, 16), (4, 64), (8, 128)])
def test_block_shapes(norm_first, activation, heads, ff):
    block = TransformerBlock(32, heads, ff, norm_first=norm_first, activation=activation)
    out = block(rand(2, 11, 32))
    assert out.shape == (2, 11, 32)


def test_post_norm_block_output_is_layer_normalised():
    block = TransformerBlock(32, 4, 64, norm_first=False)
    out = keras.ops.convert_to_numpy(block(rand(2, 5, 32) * 5 + 3))
    np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(-1), 1.0, atol=1e-2)


def test_pre_norm_block_is_residual():
    # Pre-norm: out = x + f(x); with zeroed output projections f is zero.
    block = TransformerBlock(16, 2, 32, norm_first=True)
    x = rand(2, 4, 16)
    block(x)
    for dense in (block.att.combine_heads, block.ffn.layers[-1]):
        dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)), x, atol=1e-6)


def test_ffn_output_goes_through_dropout2():
    # Only dropout2 drops anything here: if the FFN output skipped it (the notes
    # reused dropout1), training and inference outputs would be identical.
    block = TransformerBlock(16, 2, 32, dropout_rate=0.9)
    x = rand(2, 3, 16)
    block(x)
    block.dropout1.rate = 0.0
    a = keras.ops.convert_to_numpy(block(x, training=False))
    b = keras.ops.convert_to_numpy(block(x, training=True))
    assert not np.allclose(a, b)
    block.dropout2.rate = 0.0
    block.dropout1.rate = 0.9  # the attention output's dropout
    block.att.combine_heads.set_weights(
        [np.zeros_like(w) for w in block.att.combine_heads.get_weights()]
    )
    # The attention branch is zero, so dropout1 has nothing to drop.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(block(x, training=True)),
        keras.ops.convert_to_numpy(block(x, training=False)),
        atol=1e-6,
    )


def test_block_keeps_the_notes_attribute_names():
    block = TransformerBlock(16, 2, 32)
    for name in ("att", "ffn", "layernorm1", "layernorm2", "dropout1", "dropout2"):
        assert getattr(block, name) is not None
    assert block.layernorm1.epsilon == 1e-6


def test_block_rejects_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        TransformerBlock(16, 2, 32, activation="swishy")


# ---------------------------------------------------------------- patches + model


@pytest.mark.parametrize("stride", [16, 10, 6])
def test_patch_count_follows_ast_formula(stride):
    emb = PatchEmbedding(24, patch_size=16, f_stride=stride, t_stride=stride, num_mels=128,
                         num_frames=100)
    out = emb(rand(2, 100, 128))
    f = (128 - 16) // stride + 1
    t = (100 - 16) // stride + 1
    assert (emb.f_dim, emb.t_dim) == (f, t) == grid_size(128, 100, 16, stride, stride)
    assert out.shape == (2, f * t + 1, 24)


def test_ast_esc50_geometry():
    # AST on ESC-50: 128 bins x 512 frames, patch 16, stride 10 -> 12 x 50 = 600 patches.
    assert grid_size(128, 512, 16, 10, 10) == (12, 50)


def test_patch_embedding_rejects_bad_strides_and_small_inputs():
    with pytest.raises(ValueError, match="strides <= patch_size"):
        PatchEmbedding(8, patch_size=8, f_stride=9, t_stride=4, num_mels=64, num_frames=64)
    with pytest.raises(ValueError, match="smaller than one patch"):
        PatchEmbedding(8, patch_size=16, num_mels=8, num_frames=64)


def test_specaugment_masks_only_in_training():
    aug = SpecAugment(freq_mask_param=10, time_mask_param=20, seed=1)
    x = rand(4, 50, 32) + 5.0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(aug(x, training=False)), x)
    y = keras.ops.convert_to_numpy(aug(x, training=True))
    zero = y == 0.0
    assert zero.any()
    # Masks are whole frequency rows / time columns.
    for b in range(4):
        cols = zero[b].all(axis=0)  # masked mel bins
        rows = zero[b].all(axis=1)  # masked frames
        assert cols.sum() <= 10 and rows.sum() <= 20
        np.testing.assert_array_equal(zero[b], cols[None, :] | rows[:, None])


@pytest.mark.parametrize(
    "cfg",
    [
        dict(embed_dim=32, num_heads=2, ff_dim=64, num_layers=1),
        dict(embed_dim=32, num_heads=4, ff_dim=128, num_layers=2, f_stride=8, t_stride=8,
             pooling="mean", norm_first=True, activation="gelu"),
        dict(embed_dim=48, num_heads=8, ff_dim=48, num_layers=1, pooling="cls_dist"),
    ],
)
def test_audio_model_shapes(cfg):
    model = build_model(cfg, dict(n_mels=32), num_classes=5, clip_samples=8000)
    out = model(rand(3, 8000))
    assert out.shape == (3, 5)
    feats = model.features(rand(3, 8000))
    assert feats.shape == (3, model.frontend.num_frames(8000), 32)
    logits, weights = model.backbone(feats, return_attention_scores=True)
    assert len(weights) == cfg["num_layers"]
    n = model.backbone.patch_embed.num_tokens
    assert weights[0].shape == (3, cfg["num_heads"], n, n)


def test_keras_save_load_round_trip(tmp_path):
    model = build_model(
        dict(embed_dim=32, num_heads=4, ff_dim=64, num_layers=2, norm_first=True,
             activation="gelu", pooling="cls_dist"),
        dict(n_mels=32),
        num_classes=4,
        clip_samples=8000,
        augment_cfg=dict(freq_mask_param=4, time_mask_param=8),
        norm_mean=-3.0,
        norm_std=2.5,
        class_names=["a", "b", "c", "d"],
    )
    x = rand(2, 8000)
    before = keras.ops.convert_to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), before)
    assert loaded.class_names == ["a", "b", "c", "d"]
    assert isinstance(loaded.backbone, SpectrogramTransformer)
    assert loaded.backbone.hparams == model.backbone.hparams


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(embed_dim=30, num_heads=4), "not divisible by num_heads"),
        (dict(pooling="max"), "model.pooling"),
        (dict(num_layers=0), "model.num_layers"),
        (dict(patch_size=64), "smaller than one patch"),
        (dict(num_head=4), "unknown config key model.num_head"),
        (dict(type="cnn"), "unknown model.type"),
    ],
)
def test_bad_model_configs_raise_clear_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg, dict(n_mels=32), num_classes=3, clip_samples=8000)


def test_tiny_model_fits_and_learns():
    # A real Keras fit on separable features: the loss must drop.
    keras.utils.set_random_seed(0)
    model = build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=1),
                        dict(n_mels=16), num_classes=2, clip_samples=4000)
    backbone = model.backbone
    frames = model.frontend.num_frames(4000)
    x = rand(32, frames, 16)
    y = (np.arange(32) % 2).astype("int32")
    x[y == 1, :, :8] += 2.0
    backbone.compile(optimizer=keras.optimizers.Adam(3e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = backbone.fit(x, y, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert hist[-1] < 0.5 * hist[0]


def test_target_frames_pads_like_ast_and_survives_saving(tmp_path):
    # 0.5 s at 16 kHz -> 48 frames, zero-padded to 64 (AST pads 498 -> 512).
    model = build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=1),
                        dict(n_mels=32), num_classes=3, clip_samples=8000, target_frames=64)
    x = rand(2, 8000)
    feats = keras.ops.convert_to_numpy(model.features(x))
    # The waveform model's preprocessing (the clip's mean removed), then the frontend.
    raw = keras.ops.convert_to_numpy(model.frontend(preprocess_waveform(x, model.remove_mean)))
    assert raw.shape == (2, 48, 32) and feats.shape == (2, 64, 32)
    np.testing.assert_array_equal(feats[:, :48], raw)
    assert not feats[:, 48:].any()
    assert model.backbone.grid == (2, 4)  # (32 - 16) // 16 + 1, (64 - 16) // 16 + 1
    model.save(tmp_path / "m.keras")
    from src.models import load_model

    loaded = load_model(tmp_path / "m.keras")
    assert loaded.target_frames == 64
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))
    cropped = build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=1),
                          dict(n_mels=32), num_classes=3, clip_samples=8000, target_frames=40)
    assert keras.ops.convert_to_numpy(cropped.features(x)).shape == (2, 40, 32)


def test_fused_attention_matches_the_explicit_path():
    x = rand(2, 9, 32)
    mask = np.ones((2, 9), bool)
    mask[0, 6:] = False
    explicit = MultiHeadSelfAttention(32, 4)
    fused = MultiHeadSelfAttention(32, 4, fused=True)
    explicit(x)
    fused(x)
    fused.set_weights(explicit.get_weights())
    for m in (None, mask):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(fused(x, mask=m)),
            keras.ops.convert_to_numpy(explicit(x, mask=m)),
            atol=1e-5,
        )
    # Asking for the weights always takes the explicit path.
    _, w = fused(x, return_attention_scores=True)
    assert w.shape == (2, 4, 9, 9)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_qkv_projection_computes_the_same_function(fused, qkv_bias):
    x = rand(2, 9, 32)
    mask = np.ones((2, 9), bool)
    mask[1, 5:] = False
    three = MultiHeadSelfAttention(32, 4, qkv_bias=qkv_bias)
    one = MultiHeadSelfAttention(32, 4, qkv_bias=qkv_bias, fused_qkv=True, fused=fused)
    three(x)
    one(x)
    assert len(one.weights) == (2 if qkv_bias else 1) + 2  # qkv_dense + combine_heads
    one.set_qkv(three.get_qkv())
    one.combine_heads.set_weights(three.combine_heads.get_weights())
    for m in (None, mask):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(one(x, mask=m)),
            keras.ops.convert_to_numpy(three(x, mask=m)),
            atol=1e-5,
        )
    _, w1 = one(x, return_attention_scores=True)
    _, w3 = three(x, return_attention_scores=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(w1), keras.ops.convert_to_numpy(w3),
                               atol=1e-6)
    # get_qkv reads the fused kernel back in the three-layer layout.
    for part in "qkv":
        for a, b in zip(one.get_qkv()[part], three.get_qkv()[part]):
            np.testing.assert_array_equal(a, b)


def test_qkv_bias_false_keeps_the_output_bias():
    att = MultiHeadSelfAttention(16, 2, qkv_bias=False)
    att(rand(1, 3, 16))
    assert not att.query_dense.use_bias and att.combine_heads.use_bias


# ------------------------------------------------------ pooled last block


@pytest.mark.parametrize("fused,fused_qkv", [(False, False), (True, False), (False, True)])
def test_attention_from_the_first_queries_equals_the_first_rows(fused, fused_qkv):
    att = MultiHeadSelfAttention(32, 4, fused=fused, fused_qkv=fused_qkv)
    x = rand(2, 9, 32)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    for m in (None, mask):
        full = keras.ops.convert_to_numpy(att(x, mask=m))
        first = keras.ops.convert_to_numpy(att(x, mask=m, num_queries=2))
        assert first.shape == (2, 2, 32)
        np.testing.assert_allclose(first, full[:, :2], atol=1e-5)
    _, w = att(x, return_attention_scores=True, num_queries=3)
    assert w.shape == (2, 4, 3, 9)  # 3 queries over all 9 keys


@pytest.mark.parametrize("norm_first", [False, True])
def test_block_rows_of_the_first_tokens_equal_the_full_block(norm_first):
    block = TransformerBlock(32, 4, 64, dropout_rate=0.0, norm_first=norm_first)
    x = rand(2, 11, 32)
    full = keras.ops.convert_to_numpy(block(x))
    first = keras.ops.convert_to_numpy(block(x, num_queries=1))
    assert first.shape == (2, 1, 32)
    np.testing.assert_allclose(first, full[:, :1], atol=1e-5)


def _logits_and_grads(model, x, y):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    grads = tape.gradient(loss, model.trainable_variables)
    return keras.ops.convert_to_numpy(model(x)), [keras.ops.convert_to_numpy(g) for g in grads]


@pytest.mark.parametrize(
    "pooling,norm_first,fused_qkv",
    [("cls", False, False), ("cls_dist", True, False), ("cls_dist", True, True)],
)
def test_pooled_last_block_gives_the_same_logits_and_gradients(pooling, norm_first, fused_qkv):
    kw = dict(num_classes=5, num_frames=48, num_mels=32, embed_dim=32, num_layers=2,
              num_heads=4, ff_dim=64, dropout_rate=0.0, norm_first=norm_first,
              pooling=pooling, fused_qkv=fused_qkv)
    pruned = SpectrogramTransformer(pooled_last_block=True, **kw)
    full = SpectrogramTransformer(pooled_last_block=False, **kw)
    pruned.build((None, 48, 32))
    full.build((None, 48, 32))
    full.set_weights(pruned.get_weights())
    x, y = rand(3, 48, 32), np.array([0, 3, 4])
    logits_p, grads_p = _logits_and_grads(pruned, x, y)
    logits_f, grads_f = _logits_and_grads(full, x, y)
    np.testing.assert_allclose(logits_p, logits_f, atol=1e-5)
    assert len(grads_p) == len(grads_f)
    # Relative to each gradient, with a floor for those that are zero in exact
    # arithmetic (the key bias: a softmax ignores a constant shift of its scores).
    floor = 1e-5 * max(float(np.abs(g).max()) for g in grads_f)
    for gp, gf, var in zip(grads_p, grads_f, pruned.trainable_variables):
        assert np.abs(gp - gf).max() <= 1e-4 * float(np.abs(gf).max()) + floor, var.path
    # The last block's attention over all rows is still there for attention maps.
    _, weights = pruned(x, return_attention_scores=True)
    assert weights[-1].shape[2] == weights[-1].shape[3] == pruned.patch_embed.num_tokens


def test_mean_pooling_computes_every_row():
    model = SpectrogramTransformer(5, 48, 32, embed_dim=32, num_layers=1, num_heads=4,
                                   ff_dim=64, pooling="mean")
    assert model.pooled_rows() is None
    assert SpectrogramTransformer(5, 48, 32, pooling="cls_dist").pooled_rows() == 2


def test_models_saved_with_keras_layer_normalization_still_load(tmp_path):
    # Blocks used keras.layers.LayerNormalization before src.models.layers.LayerNorm:
    # the same weights under the same names, so such a file loads into today's blocks.
    from src.models import load_model
    from src.models.layers import LayerNorm

    kw = dict(num_classes=3, num_frames=48, num_mels=32, embed_dim=32, num_layers=2,
              num_heads=4, ff_dim=64, norm_first=True, activation="gelu", pooling="cls_dist")
    old = SpectrogramTransformer(**kw)
    for block in old.blocks:
        block.layernorm1 = keras.layers.LayerNormalization(epsilon=block.epsilon,
                                                           name="layernorm1")
        block.layernorm2 = keras.layers.LayerNormalization(epsilon=block.epsilon,
                                                           name="layernorm2")
    old.build((None, 48, 32))
    for block in old.blocks:
        for ln in (block.layernorm1, block.layernorm2):
            ln.set_weights([rand(32), rand(32)])
    x = rand(2, 48, 32)
    old.save(tmp_path / "old.keras")
    loaded = load_model(tmp_path / "old.keras")
    assert isinstance(loaded.blocks[0].layernorm1, LayerNorm)
    for a, b in zip(loaded.get_weights(), old.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(old(x)), atol=1e-5)
