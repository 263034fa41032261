"""`rsiseg eval` and `predict` refuse class mismatches, score results files, and keep COCO image ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rsiseg.checkpoint import save_checkpoint
from rsiseg.cli import main
from rsiseg.config import config_from_dict, to_dict
from rsiseg.models.registry import build_model
from tests.conftest import tiny_config_dict


@pytest.fixture(scope="module")
def untrained(synth_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An untrained tiny model's checkpoint state on the synthetic data (5 classes), written per test."""
    cfg = config_from_dict(tiny_config_dict(synth_data, tmp_path_factory.mktemp("run")))
    torch.manual_seed(0)
    categories = json.loads(Path(synth_data["val"]).read_text())["categories"]
    return {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg),
            "classes": {"names": [c["name"] for c in categories], "category_ids": [c["id"] for c in categories]}}


def write_checkpoint(state: dict, path: Path, names: list[str] | None = None, ids: list[int] | None = None) -> str:
    classes = {"names": names or state["classes"]["names"], "category_ids": ids or state["classes"]["category_ids"]}
    save_checkpoint({**state, "classes": classes}, path)
    return str(path)


def test_eval_refuses_other_classes_and_maps_by_name(untrained: dict, synth_data: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    names = untrained["classes"]["names"]
    wrong = write_checkpoint(untrained, tmp_path / "wrong.pth", names=[*names[:-1], "boat"])
    assert main(["-q", "eval", "--checkpoint", wrong, "--out", str(tmp_path / "ev0")]) == 2
    err = capsys.readouterr().err
    assert "class mismatch" in err and "boat" in err and names[-1] in err and "--class-map" in err
    assert not (tmp_path / "ev0").exists()  # nothing written for a refused run

    mapped = ["--class-map", f"boat={names[-1]}"]
    assert main(["-q", "eval", "--checkpoint", wrong, "--out", str(tmp_path / "ev1"), *mapped]) == 0
    # Same names, other ids (a model trained on ids 11-15): results carry the data's ids.
    shifted = write_checkpoint(untrained, tmp_path / "shifted.pth", ids=[11, 12, 13, 14, 15])
    assert main(["-q", "eval", "--checkpoint", shifted, "--out", str(tmp_path / "ev2")]) == 0
    data_ids = {c["id"] for c in json.loads(Path(synth_data["val"]).read_text())["categories"]}
    results = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= data_ids


def test_eval_scores_a_results_file(synth_data: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    gt = json.loads(Path(synth_data["val"]).read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(perfect))
    assert main(["-q", "eval", "--predictions", str(path), "--data", str(synth_data["val"]),
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)

    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in perfect]
    path.write_text(json.dumps(boxes_only))
    assert main(["-q", "eval", "--predictions", str(path), "--data", str(synth_data["val"]),
                 "--out", str(tmp_path / "ev_box")]) == 0
    assert set(json.loads((tmp_path / "ev_box" / "metrics.json").read_text())) == {"bbox"}
    capsys.readouterr()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": [], "categories": []}', "not a results list"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": NaN}]', "non-finite"),
    ('[{"image_id": 999999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]', "image_id 999999"),
])
def test_bad_results_files_are_refused(content: str, message: str, synth_data: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["-q", "eval", "--predictions", str(path), "--data", str(synth_data["val"]),
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.json" in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()


def test_eval_needs_exactly_one_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "eval"]) == 2
    assert "pass one of --checkpoint" in capsys.readouterr().err
    assert main(["-q", "eval", "--predictions", str(tmp_path / "r.json")]) == 2
    assert "--data" in capsys.readouterr().err


def test_predict_from_coco_keeps_image_and_category_ids(untrained: dict, synth_data: dict[str, Path],
                                                        tmp_path: Path) -> None:
    ckpt = write_checkpoint(untrained, tmp_path / "m.pth", ids=[11, 12, 13, 14, 15])
    out = tmp_path / "pred"
    assert main(["-q", "predict", "--checkpoint", ckpt, "--from-coco", str(synth_data["val"]), "--images",
                 str(synth_data["images"]), "--out", str(out), "--score-threshold", "0", "--no-overlays"]) == 0
    gt = json.loads(Path(synth_data["val"]).read_text())
    images = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in images["images"]] == [i["id"] for i in gt["images"]]
    assert images["categories"] == gt["categories"]
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["image_id"] for r in results} <= {i["id"] for i in gt["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    with pytest.raises(SystemExit) as exit_info:  # refused when parsed (tests/test_predict_inputs.py)
        main(["-q", "predict", "--checkpoint", ckpt, str(synth_data["images"]), "--limit", "-1", "--out", str(out)])
    assert exit_info.value.code == 2
