"""Bad-input matrix for the dataset: broken, odd and valid audio files written to disk,
checked by src.data.check and by the ``scripts.check_data`` CLI; malformed metadata csv
files through the reader."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tensorflow as tf

from src.data.audio import decode_audio
from src.data.check import (
    CACHE_NAME,
    FATAL_KINDS,
    NOTE_KINDS,
    CheckReport,
    FileProblem,
    check_file,
    check_records,
    filter_records,
    inspect_file,
)
from src.data.esc50 import DatasetError, read_esc50
from src.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SR = 16000
DUR = 0.2
CLIP = int(SR * DUR)  # 3200


def _tone(seconds=DUR, sr=SR, channels=1, amp=0.5):
    x = amp * np.sin(2 * np.pi * 440.0 * np.arange(int(round(seconds * sr))) / sr)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _write(path, data, sr=SR, subtype="PCM_16", **kw):
    sf.write(path, data, sr, subtype=subtype, **kw)
    return path


def _bytes(path, data):
    path.write_bytes(data)
    return path


def _streamed(path, declared):
    """A WAV as a streaming recorder leaves it: the RIFF and data sizes say ``declared``
    (0 or 0xFFFFFFFF: unknown) whatever the file holds."""
    _write(path, _tone())
    data = bytearray(path.read_bytes())
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = struct.pack("<I", declared)
    return _bytes(path, bytes(data))


def _mkdir(path):
    path.mkdir()
    return path


def _truncate(path):
    """Cut a valid file's bytes in half: the header still declares all frames."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# name -> (writer(dir) -> path, expected kinds, fatal)
CASES = {
    "valid": (lambda d: _write(d / "valid.wav", _tone()), set(), False),
    "truncated": (
        lambda d: _truncate(_write(d / "truncated.wav", _tone())), {"truncated"}, True
    ),
    "text": (
        lambda d: _bytes(d / "text.wav", b"filename,fold\nnot audio at all\n"),
        {"unreadable"},
        True,
    ),
    "empty": (lambda d: _bytes(d / "empty.wav", b""), {"empty"}, True),
    "missing": (lambda d: d / "does-not-exist.wav", {"missing"}, True),
    "stereo": (lambda d: _write(d / "stereo.wav", _tone(channels=2)), {"stereo"}, False),
    "44k": (lambda d: _write(d / "44k.wav", _tone(sr=44100), sr=44100), {"resampled"}, False),
    "short": (lambda d: _write(d / "short.wav", _tone(DUR / 2)), {"short"}, False),
    "long": (lambda d: _write(d / "long.wav", _tone(DUR * 3)), {"long"}, False),
    "silent": (lambda d: _write(d / "silent.wav", np.zeros(CLIP)), {"silent"}, False),
    # 1 LSB of 16-bit PCM is -90.3 dBFS: below the -90 dBFS threshold
    "one_lsb": (
        lambda d: _write(d / "one_lsb.wav", np.full(CLIP, 1 / 32768)), {"silent"}, False
    ),
    "quiet": (  # -60 dBFS is quiet, not silent
        lambda d: _write(d / "quiet.wav", _tone(amp=1e-3)), set(), False
    ),
    "zero_frames": (  # a header only: a failed copy or download
        lambda d: _write(d / "zero_frames.wav", np.zeros(0)), {"empty"}, True
    ),
    # Sizes a streaming recorder writes: "unknown" (read to the end), or 0, which the
    # decoder takes at its word (no frames): not truncated either way.
    "streamed_ffff": (lambda d: _streamed(d / "streamed_ffff.wav", 0xFFFFFFFF), set(), False),
    "streamed_zero": (lambda d: _streamed(d / "streamed_zero.wav", 0), {"empty"}, True),
    "stereo_44k_short": (
        lambda d: _write(d / "s44.wav", _tone(DUR / 2, 44100, 2), sr=44100),
        {"stereo", "resampled", "short"},
        False,
    ),
    # Not canonical 16-bit PCM WAV: decoded through soundfile, no problem.
    "pcm24": (lambda d: _write(d / "pcm24.wav", _tone(), subtype="PCM_24"), set(), False),
    "float": (lambda d: _write(d / "float.wav", _tone(), subtype="FLOAT"), set(), False),
    "pcm_u8": (lambda d: _write(d / "pcm_u8.wav", _tone(), subtype="PCM_U8"), set(), False),
    "wavex16": (lambda d: _write(d / "wavex16.wav", _tone(), format="WAVEX"), set(), False),
    "flac": (lambda d: _write(d / "a.flac", _tone()), set(), False),
    "flac_named_wav": (lambda d: _write(d / "flac.wav", _tone(), format="FLAC"), set(), False),
    "cut_in_header": (  # not even the header is complete: soundfile cannot open it
        lambda d: _bytes(d / "hdr.wav", _write(d / "full.wav", _tone()).read_bytes()[:30]),
        {"unreadable"},
        True,
    ),
    "directory": (lambda d: _mkdir(d / "dir.wav"), {"unreadable"}, True),
    # A float file's NaN or infinity (clipping to [-1, 1] would hide the latter).
    "nan": (lambda d: _write(d / "nan.wav", np.where(np.arange(CLIP) == 7, np.nan, _tone()),
                             subtype="FLOAT"), {"unreadable"}, True),
    "inf": (lambda d: _write(d / "inf.wav", np.where(np.arange(CLIP) == 7, np.inf, _tone()),
                             subtype="DOUBLE"), {"unreadable"}, True),
    # A float file far beyond full scale: read, and clipped by the model
    "loud_float": (lambda d: _write(d / "loud.wav", 1e4 * _tone(), subtype="FLOAT"),
                   {"clipped"}, False),
}


def _decodes(path) -> bool:
    """Whether the pipeline's decoder reads the file."""
    try:
        decode_audio(tf.constant(str(path)), SR, CLIP).numpy()
    except Exception:  # tf.errors.OpError, or soundfile's errors on its path
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_check_file(tmp_path, name):
    write, kinds, fatal = CASES[name]
    path = write(tmp_path)
    problems = check_file(path, sample_rate=SR, clip_samples=CLIP)
    assert {p.kind for p in problems} == kinds, problems
    assert len(problems) == len(kinds)
    for p in problems:
        assert isinstance(p, FileProblem)
        assert p.path == str(path)
        assert str(path) in p.message
        assert p.fatal == (p.kind in FATAL_KINDS) and p.kind in FATAL_KINDS + NOTE_KINDS
    assert any(p.fatal for p in problems) == fatal
    # "fatal" means exactly: the pipeline's own decoder fails on the file, or the file
    # holds no audio at all (the decoder would pad a header-only file to a silent clip)
    assert _decodes(path) == (not fatal) or name in ("zero_frames", "streamed_zero")


def test_messages_say_what_is_wrong(tmp_path):
    def msg(name):
        (problem,) = check_file(CASES[name][0](tmp_path), sample_rate=SR, clip_samples=CLIP)
        return problem.message

    assert "header declares 3200 frames but the file holds only" in msg("truncated")
    assert "file not found" in msg("missing")
    assert "44100 Hz, resampled to 16000 Hz" in msg("44k")
    assert "zero-padded" in msg("short") and "cropped" in msg("long")
    assert "all zeros" in msg("silent")
    assert "holds NaN or infinite samples" in msg("nan") and "replace it" in msg("inf")
    assert "beyond full scale" in msg("loud_float") and "clipped to [-1, 1]" in msg("loud_float")


def test_fatal_means_the_decoder_fails_or_the_file_is_cut_off():
    """The verdicts come from the pipeline's reader (soundfile + soxr): every format it
    reads is fine, so there is no "unsupported" kind; a truncated WAV is refused although
    soundfile reads what is left of it."""
    assert FATAL_KINDS == ("missing", "empty", "unreadable", "truncated", "too_short")
    assert "unsupported" not in FATAL_KINDS + NOTE_KINDS


def test_truncated_wav_is_fatal_though_its_remains_decode(tmp_path):
    path = CASES["truncated"][0](tmp_path)
    with sf.SoundFile(path) as f:  # libsndfile opens it and reads the frames present
        assert 0 < f.frames < CLIP and len(f.read()) == f.frames
    samples, problems = inspect_file(path, sample_rate=SR, clip_samples=CLIP)
    assert samples is None and [(p.kind, p.fatal) for p in problems] == [("truncated", True)]


WINDOW = 400  # 25 ms at 16 kHz: the log-mel frontend's analysis window


@pytest.mark.parametrize(
    "seconds,rate,kinds",
    [
        (0.01, SR, {"too_short"}),  # 160 samples < one window
        (0.02, 44100, {"too_short", "resampled"}),  # 882 samples at 44.1 kHz = 320 at 16 kHz
        (WINDOW / SR, SR, set()),  # exactly one window
        (DUR * 3, SR, set()),  # long: kept whole, not cropped (no "long" note)
        (DUR / 2, SR, set()),  # short of clip_seconds: not padded (no "short" note)
    ],
)
def test_variable_length_files_are_kept_whole_down_to_one_window(tmp_path, seconds, rate,
                                                                   kinds):
    path = _write(tmp_path / "clip.wav", _tone(seconds, rate), sr=rate)
    samples, problems = inspect_file(path, sample_rate=SR, clip_samples=None,
                                     min_samples=WINDOW)
    assert {p.kind for p in problems} == kinds
    fatal = "too_short" in kinds
    assert all(p.fatal == (p.kind == "too_short") for p in problems)
    if fatal:
        assert samples is None
        (msg,) = [p.message for p in problems if p.kind == "too_short"]
        assert str(path) in msg and "one analysis window" in msg
        assert "data.skip_bad_files=true" in msg
    else:
        assert abs(len(samples) - round(seconds * SR)) <= 1  # its own length
    # The same file with a fixed clip length: padded or cropped, never too short.
    assert "too_short" not in {p.kind for p in check_file(path, sample_rate=SR,
                                                          clip_samples=CLIP)}


def test_check_records_of_a_variable_length_dataset(tmp_path):
    paths = [_write(tmp_path / "tiny.wav", _tone(0.01)),
             _write(tmp_path / "long.wav", _tone(DUR * 3)),
             _write(tmp_path / "ok.wav", _tone())]
    kw = dict(sample_rate=SR, clip_samples=None, min_samples=WINDOW, progress=False,
              cache_dir=tmp_path / "cache")
    report = check_records(paths, **kw)
    assert [(p.path, p.kind) for p in report.problems] == [(str(paths[0]), "too_short")]
    assert report.fatal_paths() == {str(paths[0])}
    assert check_records(paths, **kw).num_checked == 0  # cached
    # The cache keeps the fixed-length verdicts apart: there "long" is a note.
    fixed = check_records(paths, **{**kw, "clip_samples": CLIP, "min_samples": 0})
    assert fixed.num_checked == 3
    assert [p.kind for p in fixed.problems] == ["short", "long"] and not fixed.fatal()


def test_silent_clip_decodes_to_finite_zeros(tmp_path):
    path = CASES["silent"][0](tmp_path)
    y = decode_audio(tf.constant(str(path)), SR, CLIP).numpy()
    assert y.shape == (CLIP,) and np.all(np.isfinite(y)) and not np.any(y)


def test_report_summary_groups_by_kind(tmp_path):
    paths = [CASES[n][0](tmp_path) for n in ("valid", "missing", "text", "44k")]
    extra = [_write(tmp_path / f"x{i}.wav", _tone(sr=44100), sr=44100) for i in range(3)]
    report = check_records(paths + extra, sample_rate=SR, clip_samples=CLIP, progress=False)
    assert isinstance(report, CheckReport)
    assert report.num_files == 7 and report.num_checked == 7
    assert [p.kind for p in report.fatal()] == ["missing", "unreadable"]
    assert {p.kind for p in report.notes()} == {"resampled"} and len(report.notes()) == 4
    text = report.summary(max_files=2)
    assert "2 file(s) with fatal problems, 4 note(s)" in text
    assert text.index("FATAL") < text.index("missing (1 file(s))") < text.index("Notes")
    assert str(paths[1]) in text and str(paths[2]) in text
    assert "resampled (4 file(s))" in text and "... and 2 more" in text
    clean = check_records([paths[0]], sample_rate=SR, clip_samples=CLIP, progress=False)
    assert clean.problems == [] and "no problems" in clean.summary()


def test_check_records_cache(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    paths = [_write(audio / f"{i}.wav", _tone()) for i in range(5)]
    paths.append(CASES["stereo"][0](audio))
    missing = audio / "gone.wav"
    cache = tmp_path / "cache"
    kw = dict(sample_rate=SR, clip_samples=CLIP, cache_dir=cache, progress=False)

    first = check_records(paths + [missing], **kw)
    assert (cache / CACHE_NAME).is_file()
    assert first.num_checked == 7
    assert [p.kind for p in first.problems] == ["stereo", "missing"]

    second = check_records(paths + [missing], **kw)
    assert second.num_checked == 1  # only the missing file, which is never cached
    assert second.problems == first.problems
    assert "unchanged since the last check" in second.summary()

    # one file changes content (and mtime): only that one is decoded again
    paths[2].write_text("overwritten by something that is not audio")
    os.utime(paths[2], ns=(1, 1))
    third = check_records(paths, **kw)
    assert third.num_checked == 1
    assert [(p.path, p.kind) for p in third.fatal()] == [(str(paths[2]), "unreadable")]

    # another clip length is another check
    assert check_records(paths, **{**kw, "clip_samples": CLIP * 2}).num_checked == len(paths)
    assert check_records(paths, **kw).num_checked == 0

    # a corrupt cache file is ignored and rewritten
    (cache / CACHE_NAME).write_text("{not json")
    assert check_records(paths, **kw).num_checked == len(paths)
    assert check_records(paths, **kw).num_checked == 0


@pytest.fixture
def tree(tmp_path):
    return generate_dataset(tmp_path / "ds", clips_per_class=2, num_folds=2, duration=DUR)


def test_filter_records_drops_exactly_the_fatal_ones(tree):
    index = read_esc50(tree)
    recs = index.records
    _truncate(Path(recs[0].path))
    Path(recs[1].path).unlink()
    Path(recs[2].path).write_bytes(b"")
    _write(Path(recs[3].path), _tone(channels=2))  # a note only: kept
    report = check_records(recs, sample_rate=SR, clip_samples=CLIP, progress=False, workers=4)
    assert [p.kind for p in report.fatal()] == ["truncated", "missing", "empty"]
    assert [p.kind for p in report.notes()] == ["stereo"]

    kept, dropped = filter_records(index, report)
    assert dropped == report.fatal()
    assert [r.path for r in kept.records] == [r.path for r in recs[3:]]
    assert kept.class_names == index.class_names and kept.root == index.root
    again = check_records(kept.records, sample_rate=SR, clip_samples=CLIP, progress=False)
    assert again.fatal() == []


# ----------------------------------------------------------------- metadata (the reader)

HEADER = "filename,fold,target,category,esc10,src_file,take\n"


def _csv_tree(root, text):
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    (root / "meta" / "esc50.csv").write_text(text)
    return root


def test_csv_missing_column(tmp_path):
    root = _csv_tree(tmp_path / "ds", "filename,target,category\n1-1-A-0.wav,0,dog\n")
    with pytest.raises(DatasetError, match=r"missing the required column 'fold'"):
        read_esc50(root)


def test_csv_non_integer_fold(tmp_path):
    body = "1-1-A-0.wav,1,0,dog,True,1,A\n2-2-A-1.wav,two,1,cat,True,2,A\n"
    root = _csv_tree(tmp_path / "ds", HEADER + body)
    with pytest.raises(DatasetError, match=r"row 3 \(filename='2-2-A-1.wav'\).*'fold' value 'two'"):
        read_esc50(root)


def test_unknown_fold_is_refused_at_split(tree):
    with pytest.raises(DatasetError, match=r"\[9\].*available folds: \[1, 2\]"):
        read_esc50(tree).split([9])


# ------------------------------------------------------------------------------- CLI


def _cli(*args, cache):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "AUDIO_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "scripts.check_data", "--no-progress", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tree, tmp_path):
    args = ("data=esc50", f"data.root={tree}", f"data.clip_seconds={DUR}")
    cache = tmp_path / "cache"
    clean = _cli(*args, cache=cache)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no problems" in clean.stdout
    assert (cache / CACHE_NAME).is_file()

    bad = sorted((tree / "audio").glob("*.wav"))[3]
    bad.write_text("this is not a wav file")
    broken = _cli(*args, cache=cache)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert str(bad) in broken.stdout and "unreadable" in broken.stdout
    assert "(23 unchanged since the last check" in broken.stdout


def test_cli_checks_a_variable_length_dataset_as_the_store_reads_it(tmp_path):
    """data=folder stores files at their own length: the CLI reports a file shorter than
    one analysis window as fatal (training would stop on it) and a long file not at all."""
    root = tmp_path / "audio"
    for name, seconds in (("a/long.wav", 12.0), ("a/ok.wav", 1.0), ("b/ok.wav", 1.0),
                          ("b/tiny.wav", 0.01)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _write(root / name, _tone(seconds))
    out = _cli("data=folder", f"data.root={root}", "data.labels_from_subdirs=true",
               cache=tmp_path / "cache")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "each file at its own length" in out.stdout
    assert "too_short (1 file(s))" in out.stdout and str(root / "b" / "tiny.wav") in out.stdout
    assert "  long (" not in out.stdout and str(root / "a" / "long.wav") not in out.stdout
    assert "1 file(s) with fatal problems, 0 note(s)" in out.stdout


def test_cli_missing_dataset(tmp_path):
    result = _cli("data=esc50", f"data.root={tmp_path / 'nowhere'}", cache=tmp_path / "c")
    assert result.returncode == 2
    assert "ESC-50 data not found" in result.stderr


def test_a_misspelled_key_is_named_with_its_close_matches(capsys):
    from scripts.check_data import main

    assert main(["data=folder", "data.rot=/somewhere"]) == 2
    assert "data.rot is not a config key (did you mean data.root?)" in capsys.readouterr().err


def test_cli_takes_overrides_after_an_option(tmp_path):
    """Hydra overrides may come before and after the options, as on any command line."""
    missing = tmp_path / "nowhere"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "AUDIO_CACHE_DIR": str(tmp_path / "c")}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.check_data", "data=esc50", "--no-progress",
         f"data.root={missing}", "--workers", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "unrecognized arguments" not in result.stderr
    assert f"ESC-50 data not found at {missing}" in result.stderr
