"""The command line, run in-process: help texts, train -> eval -> predict, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rsiseg.cli import build_parser, main
from tests.conftest import tiny_config_dict


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"],
                                  ["data", "--help"], ["data", "synth", "--help"]])
def test_help_texts(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rsiseg" in out and len(out.splitlines()) > 5


def test_train_eval_predict(synth_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config_dict(synth_data, tmp_path / "run")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "train.epochs=1", "train.lr=0.002", "-q"]) == 0
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["train"]["lr"] == 0.002  # the override reached the resolved config

    ckpt = tmp_path / "run" / "best.pth"
    assert main(["-q", "eval", "--checkpoint", str(ckpt), "--preset", "isaid", "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1000", "per_class"}
    assert "| bbox" in capsys.readouterr().out
    assert (tmp_path / "ev" / "results.json").is_file()

    out = tmp_path / "pred"
    code = main(["-q", "predict", "--checkpoint", str(ckpt), str(synth_data["images"]), "--limit", "3",
                 "--out", str(out), "--score-threshold", "0.0", "--max-detections", "5"])
    assert code == 0
    images = json.loads((out / "images.json").read_text())["images"]
    assert len(images) == 3
    results = json.loads((out / "predictions.json").read_text())
    per_image = {img["id"]: sum(r["image_id"] == img["id"] for r in results) for img in images}
    assert all(n <= 5 for n in per_image.values())
    for img in images:
        overlay = out / "overlays" / f"{Path(img['file_name']).stem}.png"
        assert Image.open(overlay).size == (img["width"], img["height"])


def test_data_synth(tmp_path: Path) -> None:
    assert main(["-q", "data", "synth", "--out", str(tmp_path / "s"), "--images", "3", "--size", "64"]) == 0
    train = json.loads((tmp_path / "s" / "annotations" / "instances_train.json").read_text())
    val = json.loads((tmp_path / "s" / "annotations" / "instances_val.json").read_text())
    assert len(train["images"]) + len(val["images"]) == 3


def test_errors_are_one_line_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_data_convert_hrsid(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "data", "convert", "hrsid", "--src", str(shared_data / "hrsid_samples"),
                 "--out", str(tmp_path)]) == 0
    coco = json.loads((tmp_path / "annotations" / "instances.json").read_text())
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 146
    assert '"instances": 146' in capsys.readouterr().out


def test_data_validate_and_stats_on_ssdd(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann = str(shared_data / "ssdd" / "annotations" / "ssdd_instances_test_inshore.json")
    images = str(shared_data / "ssdd" / "images")
    assert main(["-q", "data", "validate", "--data", ann, "--images", images,
                 "--report", str(tmp_path / "report.json")]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["errors"] == 0
    assert main(["-q", "data", "stats", "--data", ann, "--images", images, "--out", str(tmp_path / "st")]) == 0
    stats = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert stats["instances_per_class"] == {"ship": 172}
    assert (tmp_path / "st" / "box_sizes.png").is_file()
