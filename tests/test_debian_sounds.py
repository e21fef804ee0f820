"""scripts.debian_sounds on .deb files built here with dpkg-deb (and a stand-in apt-get
that serves them), then read back by the folder dataset."""

import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None,
                                reason="needs Debian's dpkg-deb")

RATE = 22050


def _tone(seconds, freq=440.0):
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _build_deb(tmp_path, package, files, version="1.0-1"):
    """A .deb of ``package`` holding ``files`` ({path inside: bytes | (seconds, fmt)})."""
    tree = tmp_path / f"tree-{package}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: Test <t@example.org>\nDescription: sounds for a test\n")
    doc = tree / "usr/share/doc" / package
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: x\n\nFiles: *\nLicense: GPL-2+\n")
    for rel, content in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):  # a symbolic link to this target
            path.symlink_to(content)
        else:
            seconds, fmt = content
            sf.write(str(path), _tone(seconds), RATE, format=fmt)
    out = tmp_path / "built"
    out.mkdir(exist_ok=True)
    deb = out / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)],
                   check=True, capture_output=True)
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("debs")
    _build_deb(tmp, "game-sounds", {
        "usr/share/game/sfx/boom.wav": (0.8, "WAV"),
        "usr/share/game/sfx/zap.oga": (0.5, "OGG"),
        "usr/share/game/sfx/tick.wav": (0.05, "WAV"),          # shorter than --min-seconds
        "usr/share/game/sfx/broken.wav": b"RIFF\x00\x00not audio",
        "usr/share/game/music/theme.flac": (3.0, "FLAC"),
        "usr/share/game/sfx/boom2.wav": "boom.wav",              # a second name
        "usr/share/game/readme.txt": b"not audio",
    })
    _build_deb(tmp, "desktop-theme", {"usr/share/sounds/bell.ogg": (0.4, "OGG")})
    return tmp / "built"


def _run(args, env=None):
    return subprocess.run([sys.executable, "-m", "scripts.debian_sounds", *map(str, args),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env=env)


def _manifest(out):
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def test_corpus_from_local_debs_keeps_the_readable_audio(debs, tmp_path):
    out = tmp_path / "corpus"
    res = _run([out, "--debs", debs])
    assert res.returncode == 0, res.stderr
    rows = {r["file"]: r for r in _manifest(out)}
    assert set(rows) == {
        "game-sounds/usr__share__game__sfx__boom.wav",
        "game-sounds/usr__share__game__sfx__zap.ogg",        # .oga -> .ogg
        "game-sounds/usr__share__game__music__theme.flac",
        "desktop-theme/usr__share__sounds__bell.ogg",
    }
    boom = rows["game-sounds/usr__share__game__sfx__boom.wav"]
    assert boom["source"] == "usr/share/game/sfx/boom.wav"
    assert boom["version"] == "1.0-1" and boom["license"] == "GPL-2+"
    assert float(boom["seconds"]) == pytest.approx(0.8, abs=1e-3)
    assert int(boom["sample_rate"]) == RATE and int(boom["channels"]) == 1
    for name in rows:  # copied as they are: they decode to the same samples
        assert sf.info(str(out / "audio" / name)).samplerate == RATE
    with (out / "skipped.csv").open() as f:
        skipped = {r["source"]: r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == {"usr/share/game/sfx/tick.wav", "usr/share/game/sfx/broken.wav",
                            "usr/share/game/sfx/boom2.wav"}
    assert skipped["usr/share/game/sfx/boom2.wav"] == "symbolic link to boom.wav"
    assert "--min-seconds" in skipped["usr/share/game/sfx/tick.wav"]
    assert skipped["usr/share/game/sfx/broken.wav"].startswith("unreadable")
    assert "4 files" in res.stdout

    # The folder dataset reads it, one class per package.
    from src.data.folder import read_folder

    index = read_folder(out / "audio", labels_from_subdirs=True)
    assert list(index.class_names) == ["desktop-theme", "game-sounds"]
    assert len(index.records) == 4


def test_limits_on_length_and_count(debs, tmp_path):
    out = tmp_path / "corpus"
    res = _run([out, "--debs", debs, "--max-seconds", "2", "--max-files", "1"])
    assert res.returncode == 0, res.stderr
    files = [r["file"] for r in _manifest(out)]
    assert len([f for f in files if f.startswith("game-sounds/")]) == 1
    assert not any(f.endswith(".flac") for f in files)


def test_download_uses_apt_get_once_and_refuses_held_out_packages(debs, tmp_path):
    # A stand-in apt-get that serves the .deb files built above and logs its calls.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "apt-get"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
[ "$1" = download ] || exit 1
for f in {debs}/"$2"_*.deb; do [ -e "$f" ] || {{ echo "E: Unable to locate package $2" >&2; exit 100; }}; cp "$f" .; done
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "corpus"

    res = _run([out, "--packages", "game-sounds", "desktop-theme"], env=env)
    assert res.returncode == 0, res.stderr
    assert calls.read_text().split("\n")[:2] == ["download game-sounds",
                                                 "download desktop-theme"]
    assert sorted(p.name for p in (out / "debs").glob("*.deb")) == [
        "desktop-theme_1.0-1_all.deb", "game-sounds_1.0-1_all.deb"]
    assert len(_manifest(out)) == 4
    res = _run([out, "--packages", "game-sounds", "desktop-theme"], env=env)  # kept .debs
    assert res.returncode == 0 and len(calls.read_text().splitlines()) == 2

    res = _run([out, "--packages", "game-sounds"], env=env)  # one package less
    assert res.returncode == 0
    assert "also holds desktop-theme from an earlier run" in res.stdout
    assert {r["package"] for r in _manifest(out)} == {"game-sounds"}

    res = _run([out, "--packages", "no-such-package"], env=env)
    assert res.returncode == 2
    assert "apt-get download no-such-package failed" in res.stderr
    assert "Unable to locate package" in res.stderr

    res = _run([out, "--packages", "game-sounds", "hydrogen-drumkits"], env=env)
    assert res.returncode == 2
    assert "'hydrogen-drumkits' is kept for a held-out evaluation" in res.stderr
    assert len(calls.read_text().splitlines()) == 3  # refused before any download


def test_a_held_out_deb_on_disk_is_refused_too(tmp_path):
    deb = _build_deb(tmp_path, "sonic-pi-samples", {"x/a.wav": (0.5, "WAV")})
    res = _run([tmp_path / "corpus", "--debs", deb])
    assert res.returncode == 2 and "held-out" in res.stderr


def test_no_audio_at_all_is_a_clear_error(tmp_path):
    deb = _build_deb(tmp_path, "docs-only", {"usr/share/x/readme.txt": b"text"})
    res = _run([tmp_path / "corpus", "--debs", deb])
    assert res.returncode == 2
    assert "no audio file of at least 0.3 s in 1 package(s)" in res.stderr


@pytest.mark.slow
def test_low_label_script_on_a_corpus_keeps_the_test_fold_out_of_pretraining(tmp_path):
    """experiments/ssast_low_label.sh SET=debian, one epoch everywhere, on a corpus of two
    .deb files built here: the labelled view, the unlabeled view without folds 4 and 5,
    and the table."""
    from helpers import train_env

    for package, freq in (("bells-sounds", 880.0), ("drums-sounds", 110.0)):
        files = {}
        for i in range(12):
            path = tmp_path / f"src-{package}-{i}.wav"
            sf.write(str(path), _tone(0.6 + 0.05 * i, freq * (1 + 0.02 * i)), RATE)
            files[f"usr/share/{package}/s{i:02d}.wav"] = path.read_bytes()
        _build_deb(tmp_path, package, files)
    corpus = tmp_path / "corpus"
    assert _run([corpus, "--debs", tmp_path / "built"]).returncode == 0
    out = tmp_path / "out"
    env = train_env(tmp_path, WANDB_MODE="disabled", PYTHON=sys.executable, SET="debian",
                    CORPUS=str(corpus), OUT=str(out), KS="2", SEEDS="0", MIN_FILES="10",
                    PER_CLASS="10", CLIP_SECONDS="1", PRETRAIN_EPOCHS="1")
    res = subprocess.run(["experiments/ssast_low_label.sh", "trainer.epochs=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    labelled = sorted(p.relative_to(out / "labelled").as_posix()
                      for p in (out / "labelled").rglob("*.wav"))
    unlabeled = {p.relative_to(out / "unlabeled").as_posix()
                 for p in (out / "unlabeled").rglob("*.wav")}
    assert len(labelled) == 20  # 10 of the 12 files of each package
    from src.data.folder import read_folder

    index = read_folder(out / "labelled", labels_from_subdirs=True, num_folds=5)
    held = {r.key for r in index.records if r.fold in (4, 5)}
    assert len(held) == 8 and not held & unlabeled
    assert len(unlabeled) == 24 - 8  # everything else, incl. the 2 x 2 unlabelled-only
    table = (out / "table.md").read_text()
    assert "| 2 |" in table and "pretrained - scratch" in table
    for variant in ("pretrained", "scratch", "linear"):
        results = next((out / variant).glob("lr*/k2-seed0/results.json"))
        assert json.loads(results.read_text())["dataset"] == "folder"

    # A backbone pretrained anew (another seed, the pretraining started over): the
    # finished fine-tuning from the old one is not put in the table as if it came from it.
    env.update(PRETRAIN_ARGS="trainer.resume=false seed=1")
    again = subprocess.run(["experiments/ssast_low_label.sh", "trainer.epochs=1"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was finished on other inputs" in again.stderr
    assert "model.pretrained (" in again.stderr and "sha256" in again.stderr
