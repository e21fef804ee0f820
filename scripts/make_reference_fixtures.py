"""Make the reference fixtures: Hugging Face AST / DeiT and torchaudio's Kaldi fbank.

Run once by a developer (not by CI); needs torch, transformers and torchaudio::

    python -m scripts.make_reference_fixtures [--out tests/fixtures]

Writes two small randomly initialised checkpoints in the Hugging Face layout
(config.json + model.safetensors for the AST, pytorch_model.bin for the DeiT, as
older hub checkpoints) and what the reference implementations
compute from them, and ``torchaudio_fbank.npz`` / ``.json``: torchaudio's
``compliance.kaldi.fbank`` over a range of its options (windows, bin counts,
sample rates, edges, energy, ...) with the matching ``KaldiFbank`` arguments, and
``torch_state.bin``: a small ``torch.save``d dict (dtypes, views, a scalar) with its
expected arrays, for the torch-free checkpoint reader.

``hf_ast/``
    ``ASTForAudioClassification`` (64 wide, 2 layers, 4 heads, MLP 128, 128 mel
    bins, 512 frames, strides 10, 5 classes) and its feature extractor's
    ``preprocessor_config.json``. ``clip.wav``: a fixed 5 s, 16 kHz, 16-bit
    waveform. ``reference.npz``:

    - ``model_input`` (2, 512, 128): log-mel-like values (float16, exact in
      float32), ``model_logits``: the model's logits for ``(input - mean) / (2 std)``;
    - ``clip_features`` (498, 128): ``torchaudio.compliance.kaldi.fbank`` of the
      clip with AST's settings, ``clip_logits``: the logits of the full AST
      path (fbank, zero-pad to 512 frames, normalise, model);
    - ``cut_position_embedding``: the position embedding adapted to a
      (12, 24) patch grid (246 frames) with AST's code (cut from the middle).

``hf_deit/``
    ``DeiTForImageClassificationWithTeacher`` (64 wide, 2 layers, 4 heads,
    MLP 128, 64x64 images, patch 16). ``reference.npz``:

    - ``spectrogram`` (1, 64, 64) (frames, mel bins), float16;
      ``last_hidden_state``: DeiT's encoder output for the image whose three
      channels all hold ``spectrogram`` transposed to (freq, time);
    - ``position_embedding_<f>x<t>``: the 4x4 position grid adapted to an
      (f, t) grid with AST's code (cut from the middle or bilinear interpolation).

Weights are drawn with unit-scale statistics (not the 0.02 initialiser), so
the logits vary by O(1) and a mis-mapped weight cannot hide below the tolerance.
"""

from __future__ import annotations

import argparse
import json
import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
CLIP_SECONDS = 5.0
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet statistics (the feature extractor's)
AST_LABELS = ["dog", "rain", "crying_baby", "door_knock", "helicopter"]
# Target grids for the DeiT position-embedding adaptation: (f, t).
DEIT_TARGETS = [(12, 50), (2, 7), (5, 3)]


def _randomise(model, seed: int) -> None:
    """Replace every parameter with O(1)-scale random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            if "layernorm" in name and name.endswith("weight"):
                value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
            elif name.endswith("bias"):
                value = 0.2 * torch.randn(shape, generator=gen)
            elif param.dim() >= 2 and "embeddings" not in name.split(".")[-1]:
                fan_in = int(np.prod(shape[1:]))
                value = torch.randn(shape, generator=gen) / np.sqrt(fan_in)
            else:  # cls / distillation tokens, position embeddings
                value = 0.5 * torch.randn(shape, generator=gen)
            param.copy_(value)


def _clip(seed: int = 0) -> np.ndarray:
    """5 s: noise, two tones, a chirp and a decaying click train, as int16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * CLIP_SECONDS)) / SAMPLE_RATE
    x = 0.05 * rng.standard_normal(t.size)
    x += 0.2 * np.sin(2 * np.pi * 440 * t) * (t < 2.5)
    x += 0.1 * np.sin(2 * np.pi * 3000 * t) * (t > 1.5)
    x += 0.15 * np.sin(2 * np.pi * (200 * t + 600 * t**2))
    clicks = (np.mod(t, 0.25) < 0.004) * np.exp(-t)
    x += 0.5 * clicks
    return np.clip(np.round(x / np.max(np.abs(x)) * 0.8 * 32767), -32768, 32767).astype(np.int16)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(SAMPLE_RATE)
        fh.writeframes(samples.tobytes())


def ast_adapt(pos, src_grid, dst_grid):
    """AST's position-embedding adaptation (its ASTModel.__init__), on a (1, N + 2, D) tensor."""
    import torch
    import torch.nn.functional as F

    (src_f, src_t), (f_dim, t_dim) = src_grid, dst_grid
    dim = pos.shape[-1]
    grid = pos[:, 2:, :].reshape(1, src_f * src_t, dim).transpose(1, 2).reshape(1, dim, src_f, src_t)
    if t_dim <= src_t:
        start = int(src_t / 2) - int(t_dim / 2)
        grid = grid[:, :, :, start : start + t_dim]
    else:
        grid = F.interpolate(grid, size=(src_f, t_dim), mode="bilinear", align_corners=False)
    if f_dim <= src_f:
        start = int(src_f / 2) - int(f_dim / 2)
        grid = grid[:, :, start : start + f_dim, :]
    else:
        grid = F.interpolate(grid, size=(f_dim, t_dim), mode="bilinear", align_corners=False)
    grid = grid.reshape(1, dim, f_dim * t_dim).transpose(1, 2)
    return torch.cat([pos[:, :2, :], grid], dim=1)


def make_ast(out: Path) -> None:
    import torch
    import torchaudio.compliance.kaldi as kaldi
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    out.mkdir(parents=True, exist_ok=True)
    config = ASTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_mel_bins=128,
        max_length=512,
        frequency_stride=10,
        time_stride=10,
        num_labels=len(AST_LABELS),
        id2label=dict(enumerate(AST_LABELS)),
        label2id={name: i for i, name in enumerate(AST_LABELS)},
    )
    model = ASTForAudioClassification(config).eval()
    _randomise(model, seed=1)
    model.save_pretrained(out)
    ASTFeatureExtractor(
        num_mel_bins=128, max_length=512, mean=AST_MEAN, std=AST_STD, sampling_rate=SAMPLE_RATE
    ).save_pretrained(out)

    rng = np.random.default_rng(2)
    model_input = (rng.standard_normal((2, 512, 128)) * 4.0 - 5.0).astype(np.float16)
    x = torch.from_numpy(model_input.astype(np.float32))
    with torch.no_grad():
        model_logits = model(input_values=(x - AST_MEAN) / (AST_STD * 2)).logits.numpy()

    samples = _clip()
    _write_wav(out / "clip.wav", samples)
    waveform = torch.from_numpy(samples.astype(np.float32) / 32768.0)[None]
    waveform = waveform - waveform.mean()  # AST's dataloader
    features = kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=SAMPLE_RATE,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )  # (498, 128)
    padded = torch.nn.functional.pad(features, (0, 0, 0, 512 - features.shape[0]))
    with torch.no_grad():
        clip_logits = model(input_values=((padded - AST_MEAN) / (AST_STD * 2))[None]).logits

    pos = model.audio_spectrogram_transformer.embeddings.position_embeddings.detach()
    cut = ast_adapt(pos, (12, 50), (12, 24))
    np.savez_compressed(
        out / "reference.npz",
        model_input=model_input,
        model_logits=model_logits.astype(np.float32),
        clip_features=features.numpy().astype(np.float32),
        clip_logits=clip_logits.numpy().astype(np.float32),
        cut_position_embedding=cut.numpy().astype(np.float32),
    )


def make_deit(out: Path) -> None:
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    out.mkdir(parents=True, exist_ok=True)
    config = DeiTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=64,
        patch_size=16,
        num_labels=7,
    )
    model = DeiTForImageClassificationWithTeacher(config).eval()
    _randomise(model, seed=3)
    # As older hub checkpoints: pytorch_model.bin (torch.save of the state dict with the
    # hub's parameter names), not safetensors.
    model.save_pretrained(out)
    from safetensors.torch import load_file

    weights = out / "model.safetensors"
    torch.save(load_file(str(weights)), out / "pytorch_model.bin")
    weights.unlink()

    rng = np.random.default_rng(4)
    spectrogram = rng.standard_normal((1, 64, 64)).astype(np.float16)  # (B, frames, mels)
    image = torch.from_numpy(spectrogram.astype(np.float32)).transpose(1, 2)  # (B, F, T)
    image = image[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model.deit(pixel_values=image).last_hidden_state.numpy()
    pos = model.deit.embeddings.position_embeddings.detach()
    adapted = {
        f"position_embedding_{f}x{t}": ast_adapt(pos, (4, 4), (f, t)).numpy().astype(np.float32)
        for f, t in DEIT_TARGETS
    }
    np.savez_compressed(
        out / "reference.npz",
        spectrogram=spectrogram,
        last_hidden_state=hidden.astype(np.float32),
        **adapted,
    )


# name -> (sample rate, amplitude, torchaudio.compliance.kaldi.fbank options). Options not
# given are torchaudio's defaults (window povey, energy_floor 1.0, dither set to 0 here).
FBANK_CASES = {
    "ast": (16000, 1.0, dict(num_mel_bins=128, window_type="hanning", htk_compat=True,
                             use_energy=False)),
    "povey_23": (16000, 1.0, dict(num_mel_bins=23)),
    "hamming_40": (16000, 1.0, dict(num_mel_bins=40, window_type="hamming")),
    "blackman_80": (16000, 1.0, dict(num_mel_bins=80, window_type="blackman")),
    "rectangular_40": (16000, 1.0, dict(num_mel_bins=40, window_type="rectangular")),
    "rate_8k": (8000, 1.0, dict(num_mel_bins=23)),
    "rate_22k": (22050, 1.0, dict(num_mel_bins=64, window_type="hanning")),
    "rate_44k": (44100, 1.0, dict(num_mel_bins=128, window_type="hanning")),
    "no_snip_edges": (16000, 1.0, dict(num_mel_bins=40, snip_edges=False)),
    "no_preemphasis_no_dc": (16000, 1.0, dict(num_mel_bins=40, preemphasis_coefficient=0.0,
                                              remove_dc_offset=False)),
    "band_edges": (16000, 1.0, dict(num_mel_bins=40, low_freq=64.0, high_freq=-400.0)),
    "no_power_of_two": (16000, 1.0, dict(num_mel_bins=40, round_to_power_of_two=False)),
    "magnitude": (16000, 1.0, dict(num_mel_bins=40, use_power=False)),
    "linear": (16000, 1.0, dict(num_mel_bins=40, use_log_fbank=False)),
    "frame_50ms": (16000, 1.0, dict(num_mel_bins=40, frame_length=50.0, frame_shift=12.5)),
    "energy": (16000, 1.0, dict(num_mel_bins=40, use_energy=True, energy_floor=0.0)),
    "energy_htk": (16000, 1.0, dict(num_mel_bins=40, use_energy=True, htk_compat=True)),
    "energy_not_raw": (16000, 1.0, dict(num_mel_bins=40, use_energy=True, raw_energy=False)),
    "energy_floor_quiet": (16000, 0.01, dict(num_mel_bins=40, use_energy=True)),
    "int16_scale": (16000, 32768.0, dict(num_mel_bins=40)),
}
_OUR_NAMES = {"num_mel_bins": "n_mels", "frame_length": "frame_length_ms",
              "frame_shift": "frame_shift_ms", "preemphasis_coefficient": "preemphasis"}


def our_fbank_kwargs(rate: int, options: dict) -> dict:
    """``KaldiFbank`` arguments for torchaudio's fbank options (torchaudio's defaults
    where ours differ: povey window, energy floor 1.0)."""
    ours = dict(sample_rate=rate, window_type="povey", energy_floor=1.0)
    for key, value in options.items():
        ours[_OUR_NAMES.get(key, key)] = value
    return ours


def make_fbank(out: Path) -> None:
    import torch
    import torchaudio.compliance.kaldi as kaldi

    arrays, cases = {}, {}
    for name, (rate, amplitude, options) in FBANK_CASES.items():
        rng = np.random.default_rng(5)
        t = np.arange(int(rate * 0.5)) / rate
        x = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (300 * t + 1800 * t**2))
        x = (amplitude * (x + 0.02)).astype(np.float32)  # + a DC offset
        features = kaldi.fbank(torch.from_numpy(x)[None], sample_frequency=rate, dither=0.0,
                               **options)
        wave_key = f"waveform/{rate}/{amplitude:g}"  # shared by the cases that use it
        arrays[wave_key] = x
        arrays[f"{name}/features"] = features.numpy().astype(np.float32)
        cases[name] = {"torchaudio": dict(sample_frequency=rate, dither=0.0, **options),
                       "ours": our_fbank_kwargs(rate, options), "waveform": wave_key}
    np.savez_compressed(out / "torchaudio_fbank.npz", **arrays)
    (out / "torchaudio_fbank.json").write_text(json.dumps(cases, indent=1) + "\n")


def make_torch_state(out: Path) -> None:
    """A small ``torch.save``d dict with every case the torch-free reader handles."""
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    state = {
        "float32": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
        "transposed": base.t(),  # strides (1, 6) into a shared storage
        "row_view": base[2],  # storage offset 12
        "float16": torch.linspace(-2, 2, 7).half(),
        "bfloat16": torch.tensor([1.5, -2.25, 3.0e-3, 1.0e4], dtype=torch.bfloat16),
        "float64": torch.linspace(0, 1, 5, dtype=torch.float64),
        "int64": torch.tensor([1, -2, 3], dtype=torch.int64),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save(state, out / "torch_state.bin")
    np.savez(out / "torch_state_expected.npz",
             **{k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
                for k, v in state.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/fixtures", help="fixture directory")
    args = parser.parse_args(argv)
    import torch
    import torchaudio
    import transformers

    out = Path(args.out)
    make_ast(out / "hf_ast")
    make_deit(out / "hf_deit")
    make_fbank(out)
    make_torch_state(out)
    versions = {
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"wrote {out / 'hf_ast'}, {out / 'hf_deit'} and {out / 'torchaudio_fbank.*'} "
          f"with {versions}")


if __name__ == "__main__":
    main()
