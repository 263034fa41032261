"""`rsiseg predict` on awkward inputs: options refused when parsed, hidden detections reported,
non-image files skipped or refused, overlay names that never collide, no silent overwrite, the
pixel limit, and nothing partial left behind. Every case runs the command line in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsiseg.cli import main
from rsiseg.commands import predict
from rsiseg.commands.predict import overlay_stems


@pytest.fixture(scope="module")
def checkpoint(untrained_checkpoint: str) -> str:
    return untrained_checkpoint


def _images(synth_data: dict[str, Path], folder: Path, count: int = 2) -> list[Path]:
    """Copy the first ``count`` synthetic PNGs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder)) for p in sorted(Path(synth_data["images"]).glob("*.png"))[:count]]


def _predict(checkpoint: str, out: Path, *argv: str) -> int:
    return main(["-q", "predict", "--checkpoint", checkpoint, "--out", str(out), *argv])


def _one_line_error(capsys: pytest.CaptureFixture[str], *names: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(name in err for name in names), err
    return err


@pytest.mark.parametrize(("command", "option", "value"), [
    ("predict", "--batch-size", "0"),
    ("predict", "--batch-size", "-2"),
    ("predict", "--max-detections", "-1"),
    ("predict", "--max-detections", "1001"),
    ("predict", "--limit", "-1"),
    ("predict", "--limit", "0"),
    ("predict", "--score-threshold", "1.5"),
    ("predict", "--score-threshold", "-0.1"),
    ("predict", "--score-threshold", "nan"),
    ("eval", "--max-dets", "1 10 10"),
    ("eval", "--max-dets", "100 10 1"),
    ("eval", "--max-dets", "0 10 100"),
    ("eval", "--max-dets", "1 x 100"),
])  # fmt: skip
def test_options_are_refused_when_parsed(command: str, option: str, value: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    required = ["--checkpoint", str(tmp_path / "never_read.pth"), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, option, *value.split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err
    assert not out.exists()


def test_detections_below_the_threshold_are_counted_and_noted(checkpoint: str, synth_data: dict[str, Path],
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    sources = _images(synth_data, tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(checkpoint, out, str(tmp_path / "in"), "--score-threshold", "0") == 0
    kept = json.loads((out / "images.json").read_text())["images"]
    assert all(e["detections"] > 0 and e["below_threshold"] == 0 for e in kept)
    assert "below the score threshold" not in capsys.readouterr().out

    # Threshold 1: every detection is hidden, and the output says so rather than staying blank.
    assert _predict(checkpoint, out, str(tmp_path / "in"), "--score-threshold", "1", "--overwrite") == 0
    stdout = capsys.readouterr().out
    total = sum(e["detections"] for e in kept)
    assert "0 detections in 2 images" in stdout
    assert f"{total} detections in 2 images were below the score threshold 1" in stdout
    hidden = json.loads((out / "images.json").read_text())
    assert json.loads((out / "predictions.json").read_text()) == []
    assert [e["below_threshold"] for e in hidden["images"]] == [e["detections"] for e in kept]
    assert all(0 < e["best_below"] < 1 for e in hidden["images"]) and hidden["score_threshold"] == 1.0
    for entry, source in zip(hidden["images"], sources):
        overlay = np.asarray(Image.open(out / entry["overlay"]), dtype=float)
        image = np.asarray(Image.open(source).convert("RGB"), dtype=float)
        rows, cols = np.nonzero((overlay != image).any(axis=2))  # only the note, in the bottom-left corner
        assert len(rows) > 300 and rows.min() >= 96 and cols.min() < 8


def test_non_image_files_are_skipped_and_counted_or_refused_with_strict(
        checkpoint: str, synth_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "in"
    good, truncated = _images(synth_data, folder)
    truncated.write_bytes(truncated.read_bytes()[:300])  # header intact, pixels cut: fails only when decoded
    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("not a png either")
    (folder / "sub").mkdir()

    out = tmp_path / "strict" / "out"
    assert _predict(checkpoint, out, str(folder), "--strict") == 2
    _one_line_error(capsys, "fake.png", "--strict")
    assert not (tmp_path / "strict").exists()  # refused before anything was created

    # Only the truncated image is left: it fails mid-run, after the good one was predicted.
    for name in ("notes.txt", "fake.png", "sub"):
        shutil.rmtree(folder / name) if name == "sub" else (folder / name).unlink()
    assert _predict(checkpoint, out, str(folder), "--strict", "--score-threshold", "0") == 2
    _one_line_error(capsys, truncated.name, "cannot decode")
    assert not (tmp_path / "strict").exists()  # the good image's staged outputs were removed too

    (folder / "notes.txt").write_text("not an image")
    (folder / "fake.png").write_text("not a png either")
    (folder / "sub").mkdir()
    out = tmp_path / "lenient"
    assert _predict(checkpoint, out, str(folder)) == 0
    images = json.loads((out / "images.json").read_text())
    assert [Path(e["file_name"]).name for e in images["images"]] == [good.name]
    skipped = {Path(s["file_name"]).name: s["reason"] for s in images["skipped"]}
    assert set(skipped) == {"fake.png", "notes.txt", "sub", truncated.name}
    assert "not an image file" in skipped["notes.txt"] and "not searched" in skipped["sub"]
    assert "skipped 4 input(s)" in caplog.text and "notes.txt" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "overlays", "predictions.json"]


def test_overlays_of_same_stem_images_do_not_collide(checkpoint: str, synth_data: dict[str, Path],
                                                     tmp_path: Path) -> None:
    first = _images(synth_data, tmp_path / "a", 1)[0]
    second = tmp_path / "b" / first.name
    second.parent.mkdir()
    Image.open(_images(synth_data, tmp_path / "other", 2)[1]).save(second)  # another image, same name
    out = tmp_path / "out"
    argv = [str(tmp_path / "a"), str(tmp_path / "b"), "--score-threshold", "0"]
    assert _predict(checkpoint, out, *argv) == 0
    entries = json.loads((out / "images.json").read_text())["images"]
    names = [e["overlay"] for e in entries]
    assert names == [f"overlays/{first.stem}_1.png", f"overlays/{first.stem}_2.png"]
    overlays = [np.asarray(Image.open(out / name)) for name in names]
    assert not np.array_equal(overlays[0], overlays[1])
    assert _predict(checkpoint, out, *argv, "--overwrite") == 0  # deterministic names
    assert [e["overlay"] for e in json.loads((out / "images.json").read_text())["images"]] == names


def test_overlay_stems_are_unique_and_deterministic() -> None:
    paths = [Path("a/x.png"), Path("b/x.png"), Path("c/x_2.tif"), Path("d/y.png"), Path("e/x.tif")]
    stems = overlay_stems([(p, i) for i, p in enumerate(paths, start=1)])
    assert stems == ["x_1", "x_2_1", "x_2", "y", "x_5"]  # "x_2" stays the name of the file called x_2
    assert len(set(stems)) == len(stems)


def test_previous_predictions_are_kept_unless_overwrite(checkpoint: str, synth_data: dict[str, Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _images(synth_data, tmp_path / "in", 1)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "predictions.json").write_text("[]")
    (out / "overlays" / "stale.png").write_bytes(b"old")
    (out / "notes.md").write_text("mine")
    assert _predict(checkpoint, out, str(tmp_path / "in")) == 2
    _one_line_error(capsys, str(out), "predictions.json", "--overwrite")
    assert (out / "predictions.json").read_text() == "[]" and (out / "overlays" / "stale.png").exists()

    assert _predict(checkpoint, out, str(tmp_path / "in"), "--overwrite") == 0
    assert not (out / "overlays" / "stale.png").exists() and (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "notes.md", "overlays", "predictions.json"]


def test_images_over_the_pixel_limit_are_refused_before_decoding(checkpoint: str, synth_data: dict[str, Path],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = _images(synth_data, tmp_path / "in", 1)[0]
    monkeypatch.setenv("RSISEG_MAX_PIXELS", "10000")  # the synthetic images are 128 x 128
    out = tmp_path / "out"
    assert _predict(checkpoint, out, str(tmp_path / "in")) == 2
    _one_line_error(capsys, image.name, "128 x 128", "RSISEG_MAX_PIXELS")
    assert not out.exists()


def test_from_coco_images_must_all_be_readable(checkpoint: str, synth_data: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    coco = json.loads(Path(synth_data["val"]).read_text())
    coco["images"][1]["file_name"] = "missing.png"
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert _predict(checkpoint, out, "--from-coco", str(ann), "--images", str(synth_data["images"])) == 2
    _one_line_error(capsys, "missing.png", "not found")
    assert not out.exists()


def test_interrupt_leaves_nothing(checkpoint: str, synth_data: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _images(synth_data, tmp_path / "in", 1)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_images", interrupted)
    out = tmp_path / "deep" / "out"
    assert _predict(checkpoint, out, str(tmp_path / "in")) == 130
    _one_line_error(capsys, "interrupted")
    assert not (tmp_path / "deep").exists()
