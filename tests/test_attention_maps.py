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


def test_command_line_writes_a_png(model, tmp_path):
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
    bad = subprocess.run(
        [sys.executable, "-m", "scripts.attention_map", str(tmp_path / "model.keras"),
         str(tmp_path / "missing.wav")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "missing.wav" in bad.stderr
