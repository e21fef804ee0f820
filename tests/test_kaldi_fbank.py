"""The KaldiFbank frontend against kaldi-native-fbank (Kaldi's fbank), and its edge cases."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from src.models import load_model
from src.models.build import build_frontend, build_model
from src.models.kaldi import EPSILON, KaldiFbank, kaldi_mel_banks

SR = 16000
CONF = Path(__file__).resolve().parents[1] / "conf"
# Stated tolerances on the log filterbank (natural log). Both implementations run
# in float32; in filters 80+ dB below the clip's loudest one (the leakage of a
# tone or chirp far from its frequency) float32 rounding is a large *relative*
# error, which the log shows as an absolute one: there the two sides differ from
# a float64 computation by about as much as from each other (up to ~1e-2 at
# 1 s of a chirp), so those filters get the looser bound.
LOUD_DB = 80.0
ATOL_LOUD = 1e-3  # filters within LOUD_DB of the clip's loudest one
ATOL_ALL = 2e-2  # every filter


def signals():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    return {
        "noise": (0.1 * rng.standard_normal(SR)).astype("float32"),
        "tone": (0.5 * np.sin(2 * np.pi * 1000 * t)).astype("float32"),
        "chirp": (0.5 * np.sin(2 * np.pi * (100 * t + 3000 * t**2))).astype("float32"),
    }


def kaldi_reference(x, n_mels, window_type="hanning", snip_edges=True, use_energy=False):
    """kaldi-native-fbank with AST's settings, fed the samples our layer sees."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = snip_edges
    opts.frame_opts.window_type = window_type
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = n_mels
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = use_energy
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SR, x.tolist())
    fbank.input_finished()
    frames = [np.asarray(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)]
    return np.array(frames, dtype=np.float32).reshape(len(frames), n_mels + int(use_energy))


def ours(x, **kwargs):
    return keras.ops.convert_to_numpy(KaldiFbank(sample_rate=SR, **kwargs)(x[None]))[0]


def assert_close(out, ref):
    assert out.shape == ref.shape
    loud = ref > ref.max() - LOUD_DB / 10.0 * np.log(10.0)
    np.testing.assert_allclose(out[loud], ref[loud], atol=ATOL_LOUD, rtol=0)
    np.testing.assert_allclose(out, ref, atol=ATOL_ALL, rtol=0)


@pytest.mark.parametrize("name", ["noise", "tone", "chirp"])
@pytest.mark.parametrize("n_mels", [23, 40, 80])
@pytest.mark.parametrize("window_type", ["hanning", "povey"])
def test_matches_kaldi_native_fbank(name, n_mels, window_type):
    x = signals()[name]
    ref = kaldi_reference(x, n_mels, window_type)
    out = ours(x, n_mels=n_mels, window_type=window_type)
    assert out.shape == (KaldiFbank(n_mels=n_mels).num_frames(SR), n_mels) == (98, n_mels)
    assert_close(out, ref)
    if name == "noise":  # every filter is loud: the tight bound holds everywhere
        np.testing.assert_allclose(out, ref, atol=ATOL_LOUD, rtol=0)


@pytest.mark.parametrize("name", ["noise", "chirp"])
def test_matches_kaldi_native_fbank_without_snip_edges_and_with_energy(name):
    x = signals()[name]
    ref = kaldi_reference(x, 40, snip_edges=False, use_energy=True)
    out = ours(x, n_mels=40, snip_edges=False, use_energy=True)
    assert out.shape == (100, 41)
    assert_close(out, ref)
    np.testing.assert_allclose(out[:, 0], ref[:, 0], atol=1e-5, rtol=0)  # log energy


@pytest.mark.parametrize("num_samples", [79, 80, 100, 240, 399, 400, 401, 560])
@pytest.mark.parametrize("snip_edges", [True, False])
def test_short_clips_match_kaldi(num_samples, snip_edges):
    x = signals()["noise"][:num_samples]
    ref = kaldi_reference(x, 23, snip_edges=snip_edges)
    layer = KaldiFbank(n_mels=23, snip_edges=snip_edges)
    out = keras.ops.convert_to_numpy(layer(x[None]))[0]
    assert out.shape == (layer.num_frames(num_samples), 23) == (len(ref), 23)
    if len(ref):
        np.testing.assert_allclose(out, ref, atol=ATOL_LOUD, rtol=0)


def test_waveform_scale_matches_kaldi_on_int16_scale():
    x = signals()["noise"]
    ref = kaldi_reference(x * 32768.0, 40)
    assert_close(ours(x, n_mels=40, waveform_scale=32768.0), ref)
    # Scaling the waveform by a shifts every log filter by 2 ln(a).
    np.testing.assert_allclose(
        ours(x, n_mels=40, waveform_scale=32768.0),
        ours(x, n_mels=40) + 2 * np.log(32768.0),
        atol=1e-3,
    )


def test_ast_default_128_bins_gives_the_log_floor_in_empty_filters():
    # Kaldi refuses 128 bins with a 512-point FFT (a triangle at the low end falls
    # between two FFT bins); torchaudio, which AST uses, keeps it as a zero filter
    # so its output is log(eps). This layer does the same.
    layer = KaldiFbank()
    assert layer.n_mels == 128 and layer.n_fft == 512
    banks = kaldi_mel_banks(128, 512, SR, 20.0, 0.0)
    assert banks.shape == (257, 128)
    assert not banks[-1].any()  # the Nyquist bin carries no weight, as in Kaldi
    empty = np.flatnonzero(~banks.any(axis=0))
    assert empty.tolist() == [3]
    out = keras.ops.convert_to_numpy(layer(signals()["noise"][None]))[0]
    assert out.shape == (98, 128) and np.isfinite(out).all()
    np.testing.assert_allclose(out[:, empty], np.log(np.float32(1.1920929e-07)), rtol=1e-6)
    assert (out[:, 4:] > np.log(EPSILON) + 1).all()


def test_silence_gives_the_log_floor():
    out = ours(np.zeros(8000, "float32"), n_mels=32)
    np.testing.assert_allclose(out, np.log(EPSILON), rtol=1e-6)


def test_frame_count():
    layer = KaldiFbank(n_mels=32)
    assert (layer.win_samples, layer.hop_samples, layer.n_fft) == (400, 160, 512)
    for n in (0, 399, 400, 559, 560, 16000, 32000):
        expected = 0 if n < 400 else 1 + (n - 400) // 160
        assert layer.num_frames(n) == expected
    assert layer.num_frames(32000) == 198
    out = layer(np.zeros((2, 32000), "float32"))
    assert out.shape == (2, 198, 32)
    centred = KaldiFbank(n_mels=32, snip_edges=False)
    assert [centred.num_frames(n) for n in (79, 80, 16000)] == [0, 1, 100]
    unrounded = KaldiFbank(n_mels=32, round_to_power_of_two=False)
    assert unrounded.n_fft == 400
    assert unrounded(np.zeros((1, 1000), "float32")).shape == (1, 4, 32)


def test_config_round_trip():
    layer = KaldiFbank(n_mels=40, window_type="povey", use_energy=True, waveform_scale=2.0)
    clone = KaldiFbank.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.n_mels == 41 and clone.num_bins == 40


def test_model_save_load_round_trip(tmp_path):
    model = build_model(
        {"embed_dim": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 1},
        {"name": "kaldi_fbank", "n_mels": 32},
        num_classes=2,
        clip_samples=8000,
    )
    assert isinstance(model.frontend, KaldiFbank)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8000)).astype("float32")
    before = keras.ops.convert_to_numpy(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_model(path)
    assert isinstance(loaded.frontend, KaldiFbank)
    assert loaded.frontend.get_config() == model.frontend.get_config()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), before)


def test_config_file_builds_the_ast_frontend():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from src.config import validate_config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["frontend=kaldi_fbank"])
    validate_config(cfg)
    cfg.data.sample_rate = SR
    layer = build_frontend(OmegaConf.to_container(cfg.frontend, resolve=True))
    assert isinstance(layer, KaldiFbank)
    assert layer.get_config() | {"name": None} == KaldiFbank().get_config() | {"name": None}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dither=1.0), "dither=1.0 is not supported"),
        (dict(window_type="hann"), "window_type must be one of"),
        (dict(low_freq=9000.0), "low_freq < high_freq"),
        (dict(high_freq=-9000.0), "low_freq < high_freq"),
        (dict(n_mels=0), "n_mels must be positive"),
        (dict(frame_length_ms=0.05), "frame length and shift"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KaldiFbank(**kwargs)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config key frontend.num_mel_bins"):
        build_frontend({"name": "kaldi_fbank", "num_mel_bins": 40})


# torchaudio.compliance.kaldi.fbank (what AST calls) over its options, from a committed
# fixture (scripts/make_reference_fixtures.py; tests/fixtures/versions.json).
TORCHAUDIO = Path(__file__).resolve().parent / "fixtures" / "torchaudio_fbank"
_CASES = json.loads(TORCHAUDIO.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def torchaudio_arrays():
    return dict(np.load(TORCHAUDIO.with_suffix(".npz")))


@pytest.mark.parametrize("name", sorted(_CASES))
def test_matches_torchaudio_fbank(name, torchaudio_arrays):
    case = _CASES[name]
    layer = KaldiFbank(**case["ours"])
    wave = torchaudio_arrays[case["waveform"]]
    got = np.asarray(layer(wave[None]))[0]
    ref = torchaudio_arrays[f"{name}/features"]
    assert got.shape == ref.shape
    if case["ours"].get("use_log_fbank", True):
        # Measured: at most 5.8e-4 (blackman, 80 bins), most cases below 1e-4.
        assert np.abs(got - ref).max() < 1e-3
    else:  # mel energies, not logs: relative
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6 * ref.max())
