"""Command-line utilities and experiment scripts, run as a user runs them."""

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_DATA, TINY_MODEL, train_env

from src.models import native

needs_compiler = pytest.mark.skipif(
    native._compiler() is None, reason="no C++ compiler to build the kernels")

TINY = [*TINY_DATA, *TINY_MODEL, "trainer.epochs=1"]


def _env(tmp_path):
    return train_env(tmp_path, WANDB_MODE="disabled", PYTHON=sys.executable)


def _finite_positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_pipeline_benchmark_report_is_consistent(tmp_path):
    """Relations the report must satisfy whatever the machine's speed: the clips it timed
    are the clips it generated, the feature shape is the frontend's, every timed stage has
    its rate and CPU use, and loading stored features beats computing them (the best of
    two repeats: one timing of a few tens of ms can meet a scheduling stall)."""
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "pipeline", "--clips", "12", "--seconds",
         "0.5", "--repeats", "2", "--json"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    from src.models.frontend import LogMel

    frames = LogMel(sample_rate=16000, n_mels=128).num_frames(8000)  # 0.5 s at 16 kHz
    assert (r["clips"], r["tfio_clips"], r["clip_seconds"]) == (12, 12, 0.5)
    assert (r["file_rate"], r["model_rate"], r["n_mels"]) == (44100, 16000, 128)
    assert r["feature_shape"] == [frames, 128]
    rates = {k[: -len("_clips_per_s")]: v for k, v in r.items() if k.endswith("_clips_per_s")}
    timed = ("decode_only", "decode_wav_only", "one_thread", "all_cores", "graph_sequential",
             "decode_resample", "tfio_resample")
    assert set(timed) | {"first_epoch_features", "cache_load", "cached_epoch"} <= set(rates)
    for stage, rate in rates.items():
        assert _finite_positive(rate), (stage, rate)
    for stage in timed:
        busy, others = r[f"{stage}_cpu_cores"], r[f"{stage}_other_processes_cpu_cores"]
        # process CPU time / wall time: at most the cores it may run on
        assert math.isfinite(busy) and 0.0 <= busy <= r["cpu_count"] + 0.5, (stage, busy)
        assert others is None or (math.isfinite(others) and others >= 0.0), (stage, others)
    # Reading the stored features (np.load) beats decoding, resampling and computing them.
    assert r["cache_load_clips_per_s"] > r["first_epoch_features_clips_per_s"]


@pytest.mark.parametrize(
    "script,key,values",
    [
        # All run the same sweep.sh, `make test-slow` runs them (tests/test_tables.py runs
        # a real Hydra sweep and its tables in `make test`).
        pytest.param("ablate_heads", "num_heads", [1, 2, 4, 8, 16], marks=pytest.mark.slow),
        pytest.param("ablate_ff_dim", "ff_dim", [64, 128, 256, 512], marks=pytest.mark.slow),
        pytest.param("ablate_depth", "num_layers", [1, 2, 4, 6], marks=pytest.mark.slow),
        pytest.param("patch_overlap", "stride", [10, 12, 14, 16], marks=pytest.mark.slow),
    ],
)
def test_experiment_script_smoke_run(tmp_path, script, key, values):
    args = [a for a in TINY if not a.startswith(f"model.{key}=")]
    out = subprocess.run(
        ["bash", str(ROOT / "experiments" / f"{script}.sh"), "experiment=quickstart",
         "logger=none", *args],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (sweep_dir,) = list((tmp_path / "runs" / script).glob("sweep-*"))
    runs = [p for p in sweep_dir.rglob("results.json") if not p.parent.name.startswith("fold_")]
    got = sorted(json.loads(p.read_text())["config"]["model"][key] for p in runs)
    assert got == values
    table = (sweep_dir / "table.md").read_text()
    assert table.count("\n| ") == len(values) + 1  # separator + one row per value
    assert (sweep_dir / f"{script}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\\begin{tabular}" in (sweep_dir / "table.tex").read_text()
    if script == "ablate_heads":  # same width: the head count leaves the parameters alone
        params = {json.loads(p.read_text())["parameters"] for p in runs}
        assert len(params) == 1
    if script == "patch_overlap":
        assert "0.347 / 0.459 mAP" in table  # AST Table 5 beside ours


def test_the_pinned_optuna_saves_and_resumes_a_study_in_sqlite(tmp_path):
    """hydra.sweeper.storage=sqlite:///...: the pinned optuna, SQLAlchemy and alembic
    create a study in a database file and load it again."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
    again = optuna.load_study(study_name="s", storage=url)
    again.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 3


@pytest.mark.slow
def test_optuna_search_runs_trials(tmp_path):
    import optuna

    db = tmp_path / "optuna.db"
    out = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "experiment=quickstart", "hparams_search=optuna",
         "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}",
         "hydra.sweeper.study_name=search",
         *[a for a in TINY if not a.startswith("model.num_heads")]],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best value" in out.stdout + out.stderr
    runs = [p for p in (tmp_path / "runs").rglob("results.json")
            if not p.parent.name.startswith("fold_")]
    assert len(runs) == 2
    assert len(optuna.load_study(study_name="search", storage=f"sqlite:///{db}").trials) == 2


def test_profile_splits_training_and_inference_by_part_and_op():
    import keras
    import numpy as np
    import tensorflow as tf

    from scripts.benchmark import profile_steps
    from src.models.build import build_model

    cfg = dict(embed_dim=16, num_layers=1, num_heads=2, ff_dim=32, f_stride=16, t_stride=16,
               norm_first=True, activation="gelu", pooling="cls_dist")
    backbone = build_model(cfg, dict(n_mels=32), num_classes=5,
                           clip_samples=63 * 160 + 400).backbone
    backbone.compile(optimizer=keras.optimizers.Adam(1e-4),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).standard_normal((4, 64, 32)).astype("float32")
    y = np.arange(4, dtype="int32")
    backbone.train_on_batch(x, y)
    infer = tf.function(lambda v: backbone(v, training=False))
    infer(x)
    train = profile_steps(lambda: backbone.train_on_batch(x, y), 2)
    inference = profile_steps(lambda: infer(x).numpy(), 2)
    for pr in (train, inference):
        assert pr["step_ms"] > 0 and pr["op_ms_per_step"] > 0
        for table in (pr["by_part"], pr["by_type"]):
            assert sum(row["share"] for row in table) == pytest.approx(1.0)
            assert sum(row["ms_per_step"] for row in table) == pytest.approx(pr["op_ms_per_step"])
        parts = {row["name"] for row in pr["by_part"]}
        assert {"MLP (fc1, GELU, fc2)", "attention projections (q, k, v, out)",
                "attention core (scores, softmax, weighted sum)"} <= parts
    assert "optimizer" in {row["name"] for row in train["by_part"]}
    assert "optimizer" not in {row["name"] for row in inference["by_part"]}


@pytest.mark.slow
def test_model_benchmark_reports_throughput_and_flops(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "model", "--embed", "16", "--layers", "1",
         "--heads", "2", "--ff", "32", "--mels", "32", "--frames", "64", "--stride", "16",
         "--batch", "4", "--repeats", "1", "--jit", "--fused", "--profile", "1", "--json"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("profile", "profile_inference"):  # under --jit: one XLA cluster, no ops
        assert r[key]["step_ms"] > 0 and "XLA" in r[key]["note"], key
        assert r[key]["op_ms_per_step"] == 0 and not r[key]["by_type"], key
    assert r["shape"]["patches"] == 2 * 4 and r["parameters"] > 0
    # FLOPs from the shapes: conv + 1 block (4 projections, 2 attention matmuls, FFN) + head,
    # over 8 patches + [CLS] + [DIST]. The (last) block computes the 2 pooled rows only:
    # keys and values for all 10 tokens, queries, attention, output and FFN for 2.
    n, rows = 10, 2
    conv, head = 2 * 8 * 256 * 16, 2 * 16 * 50
    full = conv + 2 * n * 16 * 16 * 4 + 4 * n * n * 16 + 4 * n * 16 * 32 + head
    pooled = conv + 4 * n * 16 * 16 + 4 * rows * 16 * 16 + 4 * rows * n * 16 + 4 * rows * 16 * 32
    assert r["gflops_per_clip_forward_all_rows"] * 1e9 == pytest.approx(full)
    assert r["gflops_per_clip_forward"] * 1e9 == pytest.approx(pooled + head)
    assert r["pooled_last_block"] is True
    assert r["grid"] == [2, 4] and r["train_patches"] == 8  # no patchout: every patch
    from src.models.build import build_model

    cfg = dict(embed_dim=16, num_layers=1, num_heads=2, ff_dim=32, f_stride=16, t_stride=16,
               norm_first=True, activation="gelu", pooling="cls_dist")
    model = build_model(cfg, dict(n_mels=32), num_classes=50, clip_samples=63 * 160 + 400)
    assert r["parameters"] == model.backbone.count_params()
    for key in ("train_clips_per_s", "infer_clips_per_s", "latency_ms", "peak_gflops_per_s"):
        assert _finite_positive(r[key]), key
    # The derived rates are the FLOPs per clip times the measured clips per second, and a
    # fraction of the measured peak (a 16-wide model is nowhere near it).
    assert r["train_gflops_per_s"] == pytest.approx(
        3 * r["gflops_per_clip_train_forward"] * r["train_clips_per_s"])
    assert r["infer_gflops_per_s"] == pytest.approx(
        r["gflops_per_clip_forward"] * r["infer_clips_per_s"])
    for kind in ("train", "infer"):
        fraction = r[f"{kind}_fraction_of_peak"]
        assert fraction == pytest.approx(r[f"{kind}_gflops_per_s"] / r["peak_gflops_per_s"])
        assert 0.0 < fraction < 1.0


@needs_compiler
def test_model_benchmark_measures_a_kernel_a_b_in_one_process(capsys):
    import keras

    from scripts.benchmark import main

    tiny = ["model", "--embed", "16", "--layers", "1", "--heads", "2", "--ff", "32",
            "--mels", "32", "--frames", "64", "--stride", "16", "--batch", "4"]
    try:
        assert main([*tiny, "--repeats", "1", "--precision", "mixed_bfloat16",
                     "--ab", "bias,layer_norm", "--ab-pairs", "3", "--json"]) == 0
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ab = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ab"]
    assert ab["kernels"] == ["bias", "layer_norm"] and ab["pairs"] == 3
    assert ab["not_used"] == []  # bfloat16: both run
    for what in ("train", "infer"):
        r = ab[what]
        assert _finite_positive(r["speedup"]) and _finite_positive(r["step_ms"])
        assert r["speedup_quartiles"][0] <= r["speedup"] <= r["speedup_quartiles"][1]
    # float32: the bias kernel is not used, and the report says so
    assert main([*tiny, "--repeats", "1", "--ab", "bias", "--ab-pairs", "1"]) == 0
    assert "bias: not used under float32 (only in bfloat16)" in capsys.readouterr().out
    # adam: the other model trains with Keras' own Adam update, XLA or not
    assert main([*tiny, "--repeats", "1", "--jit", "--ab", "adam", "--ab-pairs", "1",
                 "--json"]) == 0
    ab = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ab"]
    assert ab["kernels"] == ["adam"] and _finite_positive(ab["train"]["speedup"])
    for argv, needle in (([*tiny, "--ab", "bias,softmax"], "of attention, layer_norm, "
                          "bias_gelu, bias, adam; got 'bias,softmax'"),
                         ([*tiny, "--ab", "bias", "--jit"], "--ab with --jit measures nothing"),
                         ([*tiny, "--ab", "bias", "--ab-pairs", "0"], "at least 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err


def test_optimizer_benchmark_times_the_fused_adam_against_keras(capsys):
    from scripts.benchmark import main

    tiny = ["optimizer", "--embed", "16", "--layers", "1", "--heads", "2", "--ff", "32",
            "--mels", "32", "--frames", "64", "--stride", "16", "--pairs", "3"]
    assert main([*tiny, "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["weights"] > 10 and r["parameters"] > 1000 and r["pairs"] == 3
    assert _finite_positive(r["fused_ms"]) and _finite_positive(r["keras_ms"])
    assert r["speedup_quartiles"][0] <= r["speedup"] <= r["speedup_quartiles"][1]
    assert main(tiny) == 0
    assert "ms per update" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny[:-1], "0"])
    assert exit_info.value.code == 2 and "at least 1, got 0" in capsys.readouterr().err


def test_cpu_description_names_the_model_and_its_matmul_features():
    from scripts.benchmark import cpu_description

    intel = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
             "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile sse4_2\n\n"
             "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_description(intel) == (
        "Intel(R) Xeon(R) Platinum 8480+ (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile)")
    assert cpu_description("model name : AMD EPYC\nflags : fpu avx2 sse4_2\n") == (
        "AMD EPYC (avx2)")
    assert cpu_description("model name : Some CPU\nflags : fpu\n") == "Some CPU"


def test_pretrain_benchmark_times_patchout_against_the_whole_grid(capsys):
    from scripts.benchmark import main

    assert main(["pretrain", "--embed", "16", "--layers", "1", "--heads", "2", "--ff", "32",
                 "--mels", "32", "--frames", "98", "--batch", "4", "--repeats", "1",
                 "--patchout", "2,0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["grid"] == [2, 6] and r["patches"] == 12  # 32 mels x 98 frames, 16 x 16
    assert isinstance(r["cpu"], str) and r["cpu"]
    assert r["train_grid"] == [2, 4] and r["train_patches"] == 8
    assert r["mask_count"] == round(0.78 * 12) and r["train_mask_count"] == round(9 * 8 / 12)
    for key in ("train_clips_per_s", "train_clips_per_s_without_patchout"):
        assert _finite_positive(r[key]), key
    assert r["patchout_train_speedup"] == pytest.approx(
        r["train_clips_per_s"] / r["train_clips_per_s_without_patchout"])
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--patchout", "2,0,1"])
    assert exit_info.value.code == 2 and "random patchout" in capsys.readouterr().err
    for patchout, needle in (("6,0", "model.patchout.time=6 drops all 6 time columns"),
                             ("5,1", "pretrain.mask: 9 of 12 patches masked is 1 of the 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["pretrain", "--embed", "16", "--layers", "1", "--heads", "2", "--ff", "32",
                  "--mels", "32", "--frames", "98", "--batch", "2", "--patchout", patchout])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_ast_esc50_script_smoke_run_from_imported_weights(tmp_path):
    """experiments/ast_esc50.sh with tiny imported checkpoints under the known names:
    AST-S starts from the DeiT (4x4 grid interpolated to 12x24), AST-P from the AST
    (12x50 cut to 12x24), then one table with the paper's numbers."""
    weights = tmp_path / "weights"
    fixtures = ROOT / "tests" / "fixtures"
    for fmt, src, name in (("hf-deit", "hf_deit", "deit_base_distilled_384"),
                           ("hf-ast", "hf_ast", "ast_audioset")):
        out = subprocess.run(
            [sys.executable, "-m", "scripts.import_weights", "--from", fmt,
             str(fixtures / src), "--out", str(weights / f"{name}.keras")],
            cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
    tiny = [*TINY_DATA, "data=quickstart", "data.clip_seconds=1.0", "data.target_frames=246",
            "model.embed_dim=64", "model.num_layers=2", "model.num_heads=4", "model.ff_dim=128",
            "trainer.epochs=1", "trainer.batch_size=16", "trainer.verbose=0",
            "trainer.attention_maps=0", "data.folds=[1]", "logger=none"]
    out = subprocess.run(
        ["bash", str(ROOT / "experiments" / "ast_esc50.sh"), *tiny],
        cwd=ROOT, env=_env(tmp_path) | {"AUDIO_WEIGHTS_DIR": str(weights)},
        capture_output=True, text=True, timeout=400,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (sweep,) = list((tmp_path / "runs" / "ast_esc50").glob("sweep-*"))
    s = json.loads((sweep / "ast_s" / "results.json").read_text())
    p = json.loads((sweep / "ast_p" / "results.json").read_text())
    assert s["config"]["trainer"]["optimizer"]["lr"] == 1e-4
    assert p["config"]["trainer"]["optimizer"]["lr"] == 1e-5
    assert s["config"]["frontend"]["name"] == "kaldi_fbank"
    assert "position grid 4x4 -> 12x24, new classifier head" in s["per_fold"][0]["pretrained"]
    assert "position grid 12x50 -> 12x24, new classifier head" in p["per_fold"][0]["pretrained"]
    table = (sweep / "table.md").read_text()
    assert "88.7 ± 0.7 (AST-S)" in table and "95.6 ± 0.4 (AST-P)" in table
    assert (sweep / "ast_esc50.png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_benchmark_times_the_backbone_on_any_device(tmp_path):
    # On CI this runs on the CPU with the TensorFlow backend; on a GPU machine the same
    # script (with KERAS_BACKEND=jax where TensorFlow is missing) gave the README's table.
    report = tmp_path / "gpu.json"
    out = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark_gpu", "--shapes", "tiny", "--precisions",
         "float32,mixed_bfloat16", "--steps", "2", "--fused", "--patchout", "1,1",
         "--json-out", str(report)],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert [r["precision"] for r in rows] == ["float32", "mixed_bfloat16"]
    for r in rows:
        assert r["backend"] == "tensorflow" and r["fused"] is True
        o = r["ours"]
        assert o["parameters"] > 0 and o["train_clips_per_s"] > 0 and o["infer_clips_per_s"] > 0
        assert math.isfinite(o["loss_after_steps"]) and o["loss_after_steps"] < o["first_loss"]
        assert r["patchout"] == {"time": 1, "freq": 1, "random": 0}
        q = r["ours_patchout"]
        assert q["parameters"] == o["parameters"] and q["train_clips_per_s"] > 0
        assert math.isfinite(q["loss_after_steps"])
    assert "tiny (batch 4), mixed_bfloat16, fused: ours train" in out.stdout
    assert "with patchout t=1, f=1: train" in out.stdout


def test_compute_stats_takes_overrides_after_an_option(tmp_path, capsys):
    """Hydra overrides may follow --fold: data.root given after it is the one read."""
    from scripts.compute_stats import main

    missing = tmp_path / "nowhere"
    assert main(["data=esc50", "--fold", "2", f"data.root={missing}", "--json"]) == 2
    assert f"ESC-50 data not found at {missing}" in capsys.readouterr().err
    # a misspelled key is named with its close matches, as src.train names it
    assert main(["data=folder", f"data.rot={missing}"]) == 2
    assert "data.rot is not a config key (did you mean data.root?)" in capsys.readouterr().err


@pytest.mark.parametrize("clips,needle", [("40", "at least 100 clips"),
                                          ("100,ten", "comma-separated whole numbers")])
def test_memory_benchmark_refuses_sets_it_cannot_split(clips, needle, capsys):
    from scripts.benchmark import main

    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--clips", clips])
    assert exit_info.value.code == 2 and needle in capsys.readouterr().err
