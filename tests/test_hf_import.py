"""Hugging Face AST / DeiT import against the reference implementations.

The fixtures in tests/fixtures/hf_ast and hf_deit were written by
``python -m scripts.make_reference_fixtures`` (PyTorch, transformers, torchaudio; see
tests/fixtures/versions.json): small random checkpoints in the hub layout and
what the reference code computes from them. Nothing here needs PyTorch.
"""

import contextlib
import io
import json
import os
import shutil
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import src.models  # noqa: F401  (registers the layers)
from src.models.hf_import import (
    WeightImportError,
    canonical_names,
    fetch_checkpoint,
    import_hf_ast,
    import_hf_deit,
    is_multi_label,
    read_checkpoint,
)
from src.models.pretrained import (
    PretrainedError,
    adapt_position_embedding,
    load_pretrained,
    resize_axis,
    resolve_pretrained,
)
from tests.helpers import ROOT

AST_DIR = ROOT / "tests" / "fixtures" / "hf_ast"
CLASS_NAMES = ["dog", "rain", "crying_baby", "door_knock", "helicopter"]
DEIT_DIR = ROOT / "tests" / "fixtures" / "hf_deit"


@pytest.fixture(scope="module")
def ast_ref():
    return dict(np.load(AST_DIR / "reference.npz"))


@pytest.fixture(scope="module")
def deit_ref():
    return dict(np.load(DEIT_DIR / "reference.npz"))


@pytest.fixture(scope="module")
def ast_model():
    return import_hf_ast(AST_DIR)


@pytest.fixture(scope="module")
def deit_backbone():
    return import_hf_deit(DEIT_DIR)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The AST fixture imported with the command, as it is (5 classes: softmax) and with
    ``--multi-label``; each file with what the command printed."""
    from scripts import import_weights

    d = tmp_path_factory.mktemp("imported")
    out = {}
    for kind, flags in (("single", []), ("multi", ["--multi-label"])):
        path = d / f"ast_{kind}.keras"
        printed, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
            code = import_weights.main(
                ["--from", "hf-ast", str(AST_DIR), "--out", str(path), *flags])
        assert code == 0, err.getvalue()
        out[kind] = (path, printed.getvalue())
    assert not list(d.glob("*.tmp.keras"))
    return out


def _softmax(z):
    e = np.exp(np.asarray(z, np.float64) - np.max(z))
    return e / e.sum()


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _predict_json(argv, capsys):
    from src.predict import main as predict_main

    code = predict_main([str(a) for a in argv] + ["--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


# ----------------------------------------------------------------- AST


def test_ast_architecture_follows_the_checkpoint_config(ast_model):
    h = ast_model.backbone.hparams
    assert (h["embed_dim"], h["num_layers"], h["num_heads"], h["ff_dim"]) == (64, 2, 4, 128)
    assert (h["num_frames"], h["num_mels"], h["f_stride"], h["t_stride"]) == (512, 128, 10, 10)
    assert h["norm_first"] and h["pooling"] == "cls_dist" and h["head_norm"] and h["qkv_bias"]
    assert h["activation"] == "gelu" and h["epsilon"] == 1e-12
    assert (h["norm_mean"], h["norm_std"]) == (pytest.approx(-4.2677393), pytest.approx(4.5689974))
    assert ast_model.backbone.grid == (12, 50)
    assert ast_model.class_names == CLASS_NAMES
    assert ast_model.target_frames == 512 and ast_model.frontend.n_mels == 128
    # 5 classes and no problem_type: a single-label (softmax) head; the model removes
    # each window's mean itself, as AST's dataloader does.
    assert ast_model.multi_label is False and ast_model.remove_mean is True


def test_ast_logits_match_the_reference_model(ast_model, ast_ref):
    # Raw fbank-like input; the backbone pads nothing and applies (x - mean) / (2 std).
    logits = np.asarray(ast_model.backbone(ast_ref["model_input"].astype(np.float32)))
    ref = ast_ref["model_logits"]
    assert np.abs(ref).max() > 1.0  # O(1) logits: a mis-mapped weight cannot hide
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_kaldi_fbank_matches_torchaudio_at_128_bins(ast_model, ast_ref):
    """torchaudio.compliance.kaldi.fbank with AST's settings, 128 bins (some empty)."""
    import soundfile as sf

    wave, rate = sf.read(AST_DIR / "clip.wav", dtype="float32")
    assert rate == 16000
    features = np.asarray(ast_model.frontend((wave - wave.mean())[None]))[0]
    ref = ast_ref["clip_features"]
    assert features.shape == ref.shape == (498, 128)
    # Measured: 4.8e-4 (float32 STFT and mel sums in different orders).
    assert np.abs(features - ref).max() < 1e-3
    floor = np.log(np.finfo(np.float32).eps)
    empty = np.all(ref == np.float32(floor), axis=0)
    assert empty.any() and np.all(features[:, empty] == np.float32(floor))


def test_full_waveform_path_matches_the_reference(ast_model, ast_ref, tmp_path):
    """WAV file -> our decoder -> (the model:) mean removal -> fbank -> pad to 512 ->
    normalise -> AST, against torchaudio fbank + Hugging Face AST on the same file."""
    from src.data.audio import read_audio

    audio = read_audio(AST_DIR / "clip.wav", 16000)  # as it is: the model removes the mean
    assert abs(float(audio.mean())) > 1e-3
    logits = np.asarray(ast_model(audio[None]))
    # Measured: 8e-7; the 1e-4 bound leaves room for the 5e-4 feature differences.
    np.testing.assert_allclose(logits, ast_ref["clip_logits"], atol=1e-4, rtol=0)
    # The mean removal happens in the model: given the mean-free waveform, the same.
    centred = np.asarray(ast_model((audio - audio.mean())[None]))
    np.testing.assert_allclose(centred, logits, atol=1e-5, rtol=0)


def test_imported_model_predicts_from_the_command_line(imported, ast_ref, capsys):
    path, printed = imported["single"]
    assert "64 wide, 2 layers, 4 heads, patch grid 12x50" in printed
    assert "5 classes, softmax outputs" in printed
    doc = _predict_json([path, f"audio={AST_DIR / 'clip.wav'}", "top_k=5"], capsys)
    assert doc["multi_label"] is False
    (entry,) = doc["files"]
    # The 5 s clip is shorter than the model's 512 frames: its features are zero-padded
    # (not its waveform), so the probabilities are the reference's.
    assert entry["windows"] == 1 and entry["labels"] is None
    ref = _softmax(ast_ref["clip_logits"][0])
    probs = {t["label"]: t["prob"] for t in entry["top"]}
    assert [t["label"] for t in entry["top"][:2]] == ["door_knock", "dog"]
    np.testing.assert_allclose([probs[c] for c in CLASS_NAMES], ref, atol=1e-5)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)


def test_an_imported_model_exported_to_tflite_gives_the_reference_on_a_short_clip(
    imported, ast_ref, tmp_path
):
    """The 5 s reference clip goes into the TFLite model as it is (AST pads its features,
    not its waveform): the reference logits, not those of the clip zero-padded."""
    import json

    import tensorflow as tf

    from scripts.export import main as export_main
    from src.data.audio import read_audio

    path, _ = imported["single"]
    out = tmp_path / "ast.tflite"
    assert export_main([str(path), "--format", "tflite", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["short_input"] == "as_is" and meta["input_samples"][1] > 5 * 16000
    audio = read_audio(AST_DIR / "clip.wav", 16000)
    interpreter = tf.lite.Interpreter(model_path=str(out))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [1, len(audio)])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], audio[None].astype(np.float32))
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(logits, ast_ref["clip_logits"], atol=1e-4, rtol=0)


def test_imported_multi_label_model_predicts_sigmoids_of_the_reference(
    imported, ast_ref, capsys
):
    from src.models import load_model

    path, printed = imported["multi"]
    assert "5 classes, sigmoid outputs" in printed
    assert load_model(path).multi_label is True
    doc = _predict_json([path, f"audio={AST_DIR / 'clip.wav'}", "top_k=5"], capsys)
    assert doc["multi_label"] is True
    (entry,) = doc["files"]
    ref = _sigmoid(ast_ref["clip_logits"][0])  # Hugging Face's logits, through a sigmoid
    probs = {t["label"]: t["prob"] for t in entry["top"]}
    np.testing.assert_allclose([probs[c] for c in CLASS_NAMES], ref, atol=1e-5)
    assert abs(sum(probs.values()) - 1.0) > 0.5  # independent sigmoids, not a softmax
    assert [t["label"] for t in entry["top"]] == [CLASS_NAMES[i] for i in np.argsort(-ref)]
    expected = [CLASS_NAMES[i] for i in np.argsort(-ref) if ref[i] >= 0.5]
    assert expected and len(expected) < 5
    assert [t["label"] for t in entry["labels"]] == expected


def test_which_ast_heads_import_as_multi_label(tmp_path):
    assert is_multi_label({}, 527) is True  # AudioSet
    assert is_multi_label({}, 5) is False
    assert is_multi_label({"problem_type": "single_label_classification"}, 527) is False
    assert is_multi_label({"problem_type": "multi_label_classification"}, 5) is True
    assert import_hf_ast(AST_DIR, multi_label=True).multi_label is True
    for name in ("model.safetensors", "preprocessor_config.json"):
        shutil.copy(AST_DIR / name, tmp_path / name)
    config = json.loads((AST_DIR / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert import_hf_ast(tmp_path).multi_label is True
    assert import_hf_ast(tmp_path, multi_label=False).multi_label is False


# ----------------------------------------------------------------- DeiT


def test_deit_encoder_matches_the_reference_on_a_one_channel_image(deit_backbone, deit_ref):
    # The reference fed an RGB image with three equal channels; the summed kernel on one
    # channel computes the same convolution.
    tokens, _ = deit_backbone.encode(deit_ref["spectrogram"].astype(np.float32))
    ref = deit_ref["last_hidden_state"]
    assert tokens.shape == ref.shape == (1, 18, 64)
    np.testing.assert_allclose(np.asarray(tokens), ref, atol=1e-4, rtol=0)
    kernel = deit_backbone.patch_embed.projection.kernel
    assert tuple(kernel.shape) == (16, 16, 1, 64)


@pytest.mark.parametrize("grid", [(12, 50), (2, 7), (5, 3)])
def test_position_grid_adaptation_matches_ast(deit_backbone, deit_ref, grid):
    """AST's code (cut from the middle / torch bilinear) on the 4x4 DeiT grid."""
    pos = deit_backbone.patch_embed.position_embedding.numpy()
    got = adapt_position_embedding(pos, (4, 4), grid, 2, 2)
    np.testing.assert_allclose(got, deit_ref[f"position_embedding_{grid[0]}x{grid[1]}"],
                               atol=1e-6, rtol=0)


def test_position_grid_cut_matches_ast(ast_model, ast_ref):
    pos = ast_model.backbone.patch_embed.position_embedding.numpy()
    got = adapt_position_embedding(pos, (12, 50), (12, 24), 2, 2)
    np.testing.assert_array_equal(got, ast_ref["cut_position_embedding"])


def test_resize_axis_bilinear_can_also_shrink():
    x = np.arange(8, dtype=np.float32)[None]
    assert resize_axis(x, 1, 4, "auto").tolist() == [[2, 3, 4, 5]]  # cut from the middle
    assert resize_axis(x, 1, 4, "bilinear").tolist() == [[0.5, 2.5, 4.5, 6.5]]
    assert resize_axis(x, 1, 16, "auto")[0, :3].tolist() == [0.0, 0.25, 0.75]
    with pytest.raises(ValueError, match="pretrained_adapt"):
        resize_axis(x, 1, 4, "nearest")


# ----------------------------------------------------------------- model.pretrained


def _backbone(**overrides):
    from src.models.audio_transformer import SpectrogramTransformer

    kwargs = dict(
        num_classes=3, num_frames=246, num_mels=128, embed_dim=64, num_layers=2, num_heads=4,
        ff_dim=128, f_stride=10, t_stride=10, norm_first=True, activation="gelu",
        pooling="cls_dist", dropout_rate=0.0,
    )
    kwargs.update(overrides)
    model = SpectrogramTransformer(**kwargs)
    model.build((None, kwargs["num_frames"], kwargs["num_mels"]))
    return model


def test_load_pretrained_adapts_grid_and_replaces_the_head(ast_model, ast_ref):
    target = _backbone()
    head_before = target.classifier.kernel.numpy().copy()
    report = load_pretrained(target, ast_model)
    assert report.position_grid == ((12, 50), (12, 24)) and report.new_head
    np.testing.assert_array_equal(
        target.patch_embed.position_embedding.numpy(), ast_ref["cut_position_embedding"]
    )
    for a, b in zip(target.blocks, ast_model.backbone.blocks):
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
    np.testing.assert_array_equal(target.classifier.kernel.numpy(), head_before)


def test_load_pretrained_keeps_the_head_for_the_same_classes(ast_model):
    target = _backbone(num_classes=5, num_frames=512)
    report = load_pretrained(target, ast_model)
    assert not report.new_head
    x = np.random.default_rng(0).standard_normal((1, 512, 128)).astype(np.float32)
    # Same weights, same grid; only the normalisation statistics differ (the run's own).
    target.normalize.mean, target.normalize.std = (ast_model.backbone.normalize.mean,
                                                   ast_model.backbone.normalize.std)
    np.testing.assert_allclose(np.asarray(target(x)), np.asarray(ast_model.backbone(x)),
                               atol=1e-5)


def test_load_pretrained_names_mismatched_keys(ast_model, deit_backbone):
    with pytest.raises(PretrainedError, match=r"model\.embed_dim=32 \(pretrained: 64\)"):
        load_pretrained(_backbone(embed_dim=32, num_heads=4, ff_dim=128), ast_model)
    with pytest.raises(PretrainedError, match="model.norm_first"):
        load_pretrained(_backbone(norm_first=False), deit_backbone)
    report = load_pretrained(_backbone(pooling="cls"), deit_backbone)  # dist token dropped
    assert any("distillation token dropped" in n for n in report.notes)


def test_resolve_pretrained_errors_name_the_key(tmp_path):
    with pytest.raises(PretrainedError, match="model.pretrained=.*no such file"):
        resolve_pretrained(tmp_path / "missing.keras", tmp_path)
    kept = tmp_path / "deit_base_distilled_384.keras"
    kept.write_bytes(b"x")  # a known name already imported: no download
    assert resolve_pretrained("deit_base_distilled_384", tmp_path) == kept
    run = tmp_path / "pretrain_run"
    run.mkdir()
    with pytest.raises(PretrainedError, match="is a directory without backbone.keras"):
        resolve_pretrained(run, tmp_path)
    (run / "backbone.keras").write_bytes(b"garbage")
    assert resolve_pretrained(run, tmp_path) == run / "backbone.keras"  # a pretraining run
    with pytest.raises(PretrainedError, match="is not a Keras model file"):
        load_pretrained(_backbone(), run / "backbone.keras")


# ----------------------------------------------------------------- reading and fetching


def test_both_parameter_layouts_are_understood():
    _, _, tensors = read_checkpoint(AST_DIR)
    legacy, unused = canonical_names(tensors, "audio_spectrogram_transformer")
    assert not unused
    renamed = {}
    for name, value in tensors.items():
        new = (name.replace("encoder.layer.", "layers.")
               .replace("attention.attention.query", "attention.q_proj")
               .replace("attention.attention.key", "attention.k_proj")
               .replace("attention.attention.value", "attention.v_proj")
               .replace("attention.output.dense", "attention.o_proj")
               .replace("intermediate.dense", "mlp.fc1")
               .replace("output.dense", "mlp.fc2"))
        renamed[new] = value
    assert renamed.keys() != tensors.keys()
    current, unused = canonical_names(renamed, "audio_spectrogram_transformer")
    assert not unused and current.keys() == legacy.keys()


def test_incomplete_checkpoint_directory_is_named(tmp_path):
    shutil.copy(AST_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightImportError,
                       match="missing model.safetensors or pytorch_model.bin"):
        fetch_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip")
    assert fetch_checkpoint(tmp_path) == tmp_path
    with pytest.raises(WeightImportError, match="not a zip-format torch checkpoint"):
        import_hf_ast(tmp_path)
    with pytest.raises(WeightImportError, match="not a directory and not a hub id"):
        fetch_checkpoint(str(tmp_path / "nope" / "deeper"))


def test_wrong_format_is_refused(tmp_path):
    with pytest.raises(WeightImportError, match="--from hf-deit"):
        import_hf_ast(DEIT_DIR)
    with pytest.raises(WeightImportError, match="--from hf-ast"):
        import_hf_deit(AST_DIR)


class _Hub(BaseHTTPRequestHandler):
    """Serves ``/<owner>/<name>/resolve/main/<file>`` from a directory, as the hub does."""

    def log_message(self, *args):
        pass

    def do_GET(self, root, seen):
        seen.append((self.path, self.headers.get("Authorization")))
        parts = self.path.strip("/").split("/")
        if len(parts) != 5 or parts[2:4] != ["resolve", "main"]:
            self.send_error(400)
            return
        path = root / parts[4]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hub(tmp_path):
    root, seen = tmp_path / "served", []
    shutil.copytree(AST_DIR, root)
    handler = type("Handler", (_Hub,), {"do_GET": lambda self: _Hub.do_GET(self, root, seen)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield partial(str, f"http://127.0.0.1:{server.server_port}"), root, seen
    server.shutdown()
    server.server_close()


def test_hub_id_is_downloaded_once_and_imported(hub, tmp_path, monkeypatch):
    endpoint, _, seen = hub
    monkeypatch.setenv("HF_ENDPOINT", endpoint())
    monkeypatch.setenv("HF_TOKEN", "secret")
    cache = tmp_path / "cache"
    got = fetch_checkpoint("someone/tiny-ast", cache, progress=False)
    assert got == cache / "someone--tiny-ast" / "main"
    assert sorted(p.name for p in got.iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert {auth for _, auth in seen} == {"Bearer secret"}
    requests = len(seen)
    model = import_hf_ast(got)
    assert model.backbone.grid == (12, 50)
    fetch_checkpoint("someone/tiny-ast", cache, progress=False)
    assert len(seen) == requests  # cached


def test_hub_checkpoint_with_only_pytorch_model_bin(hub, tmp_path, monkeypatch):
    endpoint, root, seen = hub
    for name in ("model.safetensors", "preprocessor_config.json", "config.json"):
        (root / name).unlink()
    shutil.copy(DEIT_DIR / "config.json", root / "config.json")
    shutil.copy(DEIT_DIR / "pytorch_model.bin", root / "pytorch_model.bin")
    monkeypatch.setenv("HF_ENDPOINT", endpoint())
    got = fetch_checkpoint("someone/tiny-deit", tmp_path / "cache", progress=False)
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert import_hf_deit(got).grid == (4, 4)
    (root / "pytorch_model.bin").unlink()
    with pytest.raises(WeightImportError, match="neither model.safetensors nor pytorch_model"):
        fetch_checkpoint("someone/other", tmp_path / "cache", progress=False)


def test_torch_state_dict_is_read_without_torch():
    from src.models.torch_checkpoint import load_state_dict

    got = load_state_dict(ROOT / "tests" / "fixtures" / "torch_state.bin")
    expected = np.load(ROOT / "tests" / "fixtures" / "torch_state_expected.npz")
    assert sorted(got) == sorted(expected.files)
    for name in expected.files:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert got["transposed"].shape == (6, 4) and got["scalar"].shape == ()


def test_torch_reader_refuses_code(tmp_path):
    """A pickle that would call os.system is refused, not run."""
    import pickle
    import zipfile

    from src.models.torch_checkpoint import TorchCheckpointError, load_state_dict

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(TorchCheckpointError, match="refusing to load"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_fixture_versions_are_recorded():
    versions = json.loads((ROOT / "tests" / "fixtures" / "versions.json").read_text())
    assert {"torch", "torchaudio", "transformers"} <= set(versions)
    assert Path(AST_DIR / "model.safetensors").stat().st_size < 1_000_000


def test_pretrained_weights_load_into_the_fused_qkv_layout(ast_model):
    target = _backbone(num_classes=5, num_frames=512, fused_qkv=True, fused_attention=True)
    load_pretrained(target, ast_model)
    target.normalize.mean, target.normalize.std = (ast_model.backbone.normalize.mean,
                                                   ast_model.backbone.normalize.std)
    x = np.random.default_rng(1).standard_normal((1, 512, 128)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(target(x)), np.asarray(ast_model.backbone(x)),
                               atol=1e-4)


def test_attention_map_of_an_imported_model(imported, ast_ref, tmp_path, capsys):
    from scripts import attention_map

    out = tmp_path / "map.png"
    model_file, _ = imported["single"]
    assert attention_map.main([str(model_file), str(AST_DIR / "clip.wav"), "--out", str(out)]) == 0
    label, prob = capsys.readouterr().out.strip().splitlines()[-1].split()[-2:]
    ref = _softmax(ast_ref["clip_logits"][0])
    assert label == "door_knock" and float(prob) == pytest.approx(ref[3], abs=1e-3)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_load_pretrained_notes_a_different_frontend(ast_model):
    from src.models.frontend import LogMel

    report = load_pretrained(_backbone(), ast_model, frontend=LogMel(n_mels=128))
    assert any("KaldiFbank frontend" in w and "LogMel" in w for w in report.warnings)
    report = load_pretrained(_backbone(), ast_model, frontend=ast_model.frontend)
    assert not report.warnings


def test_predict_on_an_imported_model_ends_with_a_full_window(ast_model, tmp_path):
    import soundfile as sf

    from src.predict import load_audio, predict_files

    wave, rate = sf.read(AST_DIR / "clip.wav", dtype="int16")
    path = tmp_path / "twice.wav"
    sf.write(path, np.concatenate([wave, wave[::-1]]), rate, subtype="PCM_16")
    (entry,) = predict_files(ast_model, [path], per_window=True, top_k=5)
    audio = load_audio(path, 16000)
    clip, hop = ast_model.clip_samples, ast_model.clip_samples // 2
    assert (len(audio), clip, hop) == (160000, 82160, 41080)
    # Windows at 0 and 41080 end inside the file; the last one ends at its end (77840).
    starts = [0, hop, len(audio) - clip]
    assert entry["windows"] == 3
    assert [w["start_s"] for w in entry["per_window"]] == pytest.approx(
        [s / 16000 for s in starts])
    logits = np.asarray(ast_model(np.stack([audio[s:s + clip] for s in starts])))
    probs = [_softmax(row) for row in logits]
    for got, p in zip(entry["per_window"], probs):
        assert got["label"] == ast_model.class_names[int(p.argmax())]
        assert got["prob"] == pytest.approx(float(p.max()), abs=1e-5)
    mean = np.mean(probs, axis=0)
    top = {t["label"]: t["prob"] for t in entry["top"]}
    np.testing.assert_allclose([top[c] for c in CLASS_NAMES], mean, atol=1e-5)


def test_ast_checkpoint_without_a_head_is_named(tmp_path):
    from safetensors.numpy import save_file

    _, _, tensors = read_checkpoint(AST_DIR)
    save_file({k: v for k, v in tensors.items() if not k.startswith("classifier.")},
              str(tmp_path / "model.safetensors"))
    shutil.copy(AST_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightImportError, match=r"no classifier head \(classifier\.layernorm"):
        import_hf_ast(tmp_path)
