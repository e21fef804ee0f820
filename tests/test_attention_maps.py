"""Attention rollout: the arithmetic, the pictures, and the command line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from src.evaluation.attention_maps import (
    attention_maps,
    patch_relevance,
    rollout,
    save_attention_maps,
    spread_patches,
)
from src.models.build import build_model

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_rollout_follows_the_cls_token_to_the_patch_it_attends():
    n = 5  # [CLS] + 4 patches
    a = np.full((1, 2, n, n), 1.0 / n)
    a[0, :, 0] = 0.0
    a[0, :, 0, 3] = 1.0  # [CLS] looks only at token 3 in both heads
    roll = rollout([a])
    np.testing.assert_allclose(roll.sum(-1), 1.0)
    np.testing.assert_allclose(roll[0, 0], [0.5, 0, 0, 0.5, 0])  # half residual, half token 3
    grid = patch_relevance(roll, 2, 2)
    assert grid.shape == (1, 2, 2) and grid[0].argmax() == 2  # token 3 = patch (1, 0)


def test_rollout_of_two_blocks_is_the_product():
    rng = np.random.default_rng(0)
    w = [rng.random((1, 3, 4, 4)) for _ in range(2)]
    w = [x / x.sum(-1, keepdims=True) for x in w]
    a1, a2 = (0.5 * np.eye(4) + 0.5 * x[0].mean(0) for x in w)
    np.testing.assert_allclose(rollout(w)[0], a2 @ a1, atol=1e-12)


def test_spread_patches_averages_overlaps():
    grid = np.array([[1.0, 3.0]])  # one row of two 4x4 patches with stride 2 in time
    pix = spread_patches(grid, 4, 6, 4, 4, 2)
    np.testing.assert_allclose(pix[:, :2], 1.0)
    np.testing.assert_allclose(pix[:, 2:4], 2.0)  # covered by both
    np.testing.assert_allclose(pix[:, 4:], 3.0)


@pytest.fixture(scope="module")
def model():
    return build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, t_stride=8),
                       dict(n_mels=32), num_classes=3, clip_samples=8000,
                       class_names=["a", "b", "c"])


def test_maps_and_pngs_from_a_real_model(model, tmp_path):
    feats = np.asarray(model.features(
        np.random.default_rng(1).standard_normal((2, 8000)).astype("float32") * 0.1))
    maps, probs = attention_maps(model.backbone, feats)
    assert maps.shape == (2, 32, feats.shape[1]) and np.isfinite(maps).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    paths = save_attention_maps(model.backbone, feats, [0, 2], ["a", "b", "c"], tmp_path)
    assert len(paths) == 2 and all(p.read_bytes()[:8] == PNG for p in paths)
    # multi-label clips: every true class (a list per clip, possibly empty)
    tagged = save_attention_maps(model.backbone, feats, [[0, 2], []], ["a", "b", "c"],
                                 tmp_path / "tags", multi_label=True)
    assert len(tagged) == 2 and all(p.read_bytes()[:8] == PNG for p in tagged)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_maps_of_a_disentangled_model_cover_the_frames_it_was_given():
    """A disentangled position embedding takes fewer frames than the clip's: the map has
    the input's frames, and its patch grid fewer columns."""
    small = build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=2, t_stride=8,
                             pos_embedding="disentangled"),
                        dict(n_mels=32), num_classes=3, clip_samples=16000)
    wave = 0.1 * np.random.default_rng(3).standard_normal((1, 6000)).astype("float32")
    feats = np.asarray(small.features(wave))
    assert feats.shape == (1, 36, 32)  # 1 + (6000 - 400) // 160 frames, not the clip's 98
    maps, probs = attention_maps(small.backbone, feats)
    assert maps.shape == (1, 32, 36)
    # Patch columns start every 8 frames: 0, 8, 16 cover frames 0..31; 32..35 no patch.
    assert (maps[0, :, :32] > 0).all() and (maps[0, :, 32:] == 0).all()
    np.testing.assert_allclose(probs, _softmax(small.backbone(feats, training=False)),
                               atol=1e-6)


def test_multi_label_maps_report_sigmoids(tmp_path, capsys):
    import keras

    from scripts import attention_map

    keras.utils.set_random_seed(6)
    tagger = build_model(dict(embed_dim=16, num_heads=2, ff_dim=32, num_layers=1),
                         dict(n_mels=32), num_classes=3, clip_samples=8000,
                         class_names=["dog", "rain", "siren"], multi_label=True)
    kernel, _ = tagger.backbone.classifier.get_weights()
    # Logits near the biases: sigmoids near 0.7, a softmax near 1/3.
    tagger.backbone.classifier.set_weights([0.01 * kernel, np.array([1.0, 0.9, 0.8], "float32")])
    wave = 0.3 + 0.1 * np.random.default_rng(4).standard_normal(8000)
    logits = np.asarray(tagger(wave[None].astype("float32"), training=False), np.float64)[0]
    sigmoid = 1.0 / (1.0 + np.exp(-logits))
    assert abs(sigmoid.max() - _softmax(logits).max()) > 0.1  # the two are told apart

    feats = np.asarray(tagger.features(wave[None].astype("float32")))
    _, probs = attention_maps(tagger.backbone, feats, multi_label=True)
    np.testing.assert_allclose(probs[0], sigmoid, atol=1e-6)

    tagger.save(tmp_path / "tagger.keras")
    wav = tmp_path / "clip.wav"
    sf.write(wav, wave, 16000, subtype="FLOAT")
    assert attention_map.main([str(tmp_path / "tagger.keras"), str(wav),
                               "--out", str(tmp_path / "map.png")]) == 0
    label, prob = capsys.readouterr().out.split()[-2:]
    assert label == ["dog", "rain", "siren"][int(sigmoid.argmax())]
    assert float(prob) == pytest.approx(sigmoid.max(), abs=6e-4)


def test_command_line_reads_the_window_as_predict_does(model, tmp_path, capsys):
    """A window with a DC offset goes to the model as it is (the model removes the mean);
    a window cut short by the end of the file is zero-padded to the clip (fixed grid)."""
    from scripts import attention_map

    model.save(tmp_path / "model.keras")
    rng = np.random.default_rng(5)
    wav = tmp_path / "offset.wav"
    sf.write(wav, (0.4 + 0.1 * rng.standard_normal(12000)).astype("float32"), 16000,
             subtype="FLOAT")
    wave, _ = sf.read(wav, dtype="float32")
    assert wave.mean() > 0.35 and np.abs(wave).max() < 1.0
    names = ["a", "b", "c"]
    for start, window in ((0.0, wave[:8000]), (0.5, np.pad(wave[8000:], (0, 4000)))):
        out = tmp_path / f"map_{start}.png"
        assert attention_map.main([str(tmp_path / "model.keras"), str(wav), "--out", str(out),
                                   "--start", str(start)]) == 0
        printed = capsys.readouterr()
        label, prob = printed.out.split()[-2:]
        assert f"the window [{start:g}-{min(start + 0.5, 0.75):g} s of 0.75 s" in printed.err
        p = _softmax(model(window[None], training=False))[0]
        assert label == names[int(p.argmax())] and float(prob) == pytest.approx(p.max(), abs=6e-4)
        assert out.read_bytes()[:8] == PNG
    assert attention_map.main([str(tmp_path / "model.keras"), str(wav), "--start", "0.75"]) == 2
    assert "past the end" in capsys.readouterr().err


def test_command_line_writes_a_png(model, tmp_path, capsys):
    from scripts import attention_map

    model.save(tmp_path / "model.keras")
    wav = tmp_path / "clip.wav"
    sf.write(wav, 0.1 * np.random.default_rng(2).standard_normal(12000), 16000, subtype="PCM_16")
    out = subprocess.run(
        [sys.executable, "-m", "scripts.attention_map", str(tmp_path / "model.keras"), str(wav),
         "--out", str(tmp_path / "map.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "map.png").read_bytes()[:8] == PNG
    assert out.stdout.split()[0] == str(tmp_path / "map.png")
    # Errors, in process (one subprocess is enough to show the module runs as a command).
    missing = tmp_path / "missing.wav"
    assert attention_map.main([str(tmp_path / "model.keras"), str(missing)]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert attention_map.main([str(tmp_path / "nowhere"), str(wav)]) == 2
    assert "does not exist" in capsys.readouterr().err
