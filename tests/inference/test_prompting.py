"""Box prompts for users: ``Predictor.segment`` (with its cache), ``rsiseg prompt`` and ``rsiseg ablate``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rsiseg.cli import main
from rsiseg.commands.prompt import parse_boxes
from rsiseg.inference.predictor import Predictor, check_boxes
from rsiseg.models.layers import box_prompting
from tests.conftest import ctrl_c_at, tiny_config_dict


def test_segment_encodes_an_image_once(untrained_checkpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = Predictor.from_checkpoint(untrained_checkpoint, "cpu")
    calls = []
    encode = box_prompting.encode_images
    monkeypatch.setattr("rsiseg.inference.predictor.encode_images", lambda *a: calls.append(1) or encode(*a))
    image = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)
    first = predictor.segment(image, boxes=[[10, 10, 50, 40]])
    second = predictor.segment(image, boxes=[[10, 10, 50, 40], [60, 20, 110, 90]])
    third = predictor.segment(boxes=[[60, 20, 110, 90]])  # the cached image
    assert len(calls) == 1
    assert torch.allclose(first["roi_masks"][0], second["roi_masks"][0], atol=1e-5)  # batched RoIs: float noise
    assert torch.allclose(second["roi_masks"][1], third["roi_masks"][0], atol=1e-5)
    assert second["image_size"].tolist() == [100, 120]
    predictor.segment(image.copy(), boxes=[[0, 0, 5, 5]])  # another object of the same values: the cache
    assert len(calls) == 1
    image[:10] = 0  # changed in place: encoded again
    changed = predictor.segment(image, boxes=[[10, 10, 50, 40]])
    assert len(calls) == 2 and not torch.equal(changed["roi_masks"], first["roi_masks"])
    tensor = torch.from_numpy(image).permute(2, 0, 1)  # uint8 [C, H, W]: scaled as the array is
    assert torch.equal(predictor.segment(tensor, boxes=[[10, 10, 50, 40]])["roi_masks"], changed["roi_masks"])
    assert len(calls) == 2
    as_float = tensor.float().div(255)
    predictor.segment(as_float, boxes=[[0, 0, 5, 5]])
    assert len(calls) == 2  # the same values as a float tensor
    as_float[0, :5] = 1.0
    predictor.segment(as_float, boxes=[[0, 0, 5, 5]])
    assert len(calls) == 3
    as_float[1, :5] = 1.0  # the encoded tensor itself changed in place: the predictor compares with its copy
    predictor.segment(as_float, boxes=[[0, 0, 5, 5]])
    assert len(calls) == 4


def test_segment_refuses_bad_prompts(untrained_checkpoint: str) -> None:
    predictor = Predictor.from_checkpoint(untrained_checkpoint, "cpu")
    with pytest.raises(ValueError, match="needs an image"):
        predictor.segment(boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match=r"\[C, H, W\] with C = model.in_channels = 3: got shape \(64, 64, 3\)"):
        predictor.segment(torch.rand(64, 64, 3), boxes=[[0, 0, 5, 5]])
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="box prompts only"):
        predictor.segment(image, points=[[3, 3]])
    with pytest.raises(ValueError, match=r"box prompt 1 \[30.0, 5.0, 20.0, 9.0\].*1 of 2"):
        predictor.segment(image, boxes=[[0, 0, 5, 5], [30, 5, 20, 9]])
    assert check_boxes([], (10, 10)).shape == (0, 4)
    without_roi_heads = Predictor(replace(predictor.loaded, model=torch.nn.Conv2d(3, 1, 1)))
    with pytest.raises(ValueError, match="takes no prompts"):
        without_roi_heads.segment(image, boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="meets the 10x10 image"):
        check_boxes([[20, 20, 30, 30]], (10, 10))


def test_parse_boxes(tmp_path: Path) -> None:
    listed = tmp_path / "b.json"
    listed.write_text(json.dumps({"boxes": [[1, 2, 3, 4]]}))
    assert parse_boxes(["0,0,5,6", str(listed)]) == [[0, 0, 5, 6], [1, 2, 3, 4]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"bad.json: boxes\[0\] is \[1, 2, 3\]"):
        parse_boxes([str(bad)])
    with pytest.raises(ValueError, match="expected x1,y1,x2,y2"):
        parse_boxes(["1,2,3"])
    image = tmp_path / "scene.png"
    image.write_bytes(b"")
    with pytest.raises(ValueError, match="give IMAGE before --boxes"):  # `--boxes 1,2,3,4 scene.png`
        parse_boxes(["1,2,3,4", str(image)])


def test_prompt_command_writes_one_entry_per_box(untrained_checkpoint: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(1).random((90, 140, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    argv = ["prompt", "--checkpoint", untrained_checkpoint, str(image), "--boxes", "5,5,40,30", "60,10,130,80",
            "--out", str(out), "--mask-threshold", "0.3", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads((out / "prompts.json").read_text())
    assert [p["prompt"] for p in report["prompts"]] == [0, 1]
    assert report["prompts"][1]["box"] == [60, 10, 130, 80]
    assert all(p["segmentation"]["size"] == [90, 140] and 0 < p["score"] <= 1 for p in report["prompts"])
    assert Image.open(out / "prompts.png").size == (140, 90)
    assert "prompt 1:" in capsys.readouterr().out
    assert main(argv) == 2  # a previous run is kept without --overwrite
    assert main(argv + ["--overwrite"]) == 0


def test_ablate_runs_each_variant_and_writes_table_two(synth_data: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_config_dict(synth_data, tmp_path / "unused")
    raw["model"].update(name="maskrcnn_r18_prompt",
                        prompt={"dim": 16, "global_size": 64, "heads": 2, "blocks": 1, "parea_weight": 0.5})
    raw["train"].update(max_iters=2, tensorboard=False)
    config = tmp_path / "prompt.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ablation"
    argv = ["-q", "ablate", str(config), "--variants", "baseline,all", "--out", str(out), "--speed-runs", "1",
            "--device", "cpu"]
    assert main(argv) == 0
    table = json.loads((out / "ablation.json").read_text())["runs"]
    assert [r["variant"] for r in table] == ["baseline", "all"]
    assert table[1]["params"] > table[0]["params"] and all(r["fps"] > 0 for r in table)
    stored = [yaml.safe_load((out / v / "config.yaml").read_text())["model"]["prompt"] for v in ("baseline", "all")]
    assert (stored[0]["lpm"], stored[0]["gpm"], stored[0]["parea_weight"]) == (False, False, 0)
    assert (stored[1]["lpm"], stored[1]["gpm"], stored[1]["parea_weight"]) == (True, True, 0.5)
    markdown = (out / "ablation.md").read_text()
    assert "| variant | box AP |" in markdown and "| all |" in markdown
    assert "model.prompt.gt_prompt_ratio 0.25 in every variant" in markdown

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr("rsiseg.engine.trainer.Trainer.fit", no_training)
    assert main(argv) == 0  # both runs reused
    older = yaml.safe_load((out / "all" / "config.yaml").read_text())
    del older["data"]["instance_points"]  # as a run trained before rsiseg had the key (at its default here)
    (out / "all" / "config.yaml").write_text(yaml.safe_dump(older))
    assert main(argv) == 0  # still reused
    changed = argv[:3] + ["model.prompt.dim=8"] + argv[3:]
    assert main(changed) == 2  # a finished run trained with other settings is not mixed into the table
    assert "trained with model.prompt.dim=16, but this run asks for 8" in capsys.readouterr().err


def test_ablate_marks_and_then_continues_a_variant_the_time_budget_cut(synth_data: dict[str, Path], tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    raw = tiny_config_dict(synth_data, tmp_path / "unused")
    raw["model"].update(name="maskrcnn_r18_prompt", prompt={"dim": 16, "global_size": 64, "heads": 2, "blocks": 1})
    raw["train"].update(max_iters=3, tensorboard=False, eval_interval=0, time_budget=0.0001)  # one iteration a call
    config = tmp_path / "prompt.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ablation"
    argv = ["-q", "ablate", str(config), "--variants", "baseline", "--out", str(out), "--speed-runs", "1",
            "--device", "cpu"]

    def row() -> tuple[list[int], str]:
        return (json.loads((out / "ablation.json").read_text())["runs"][0]["iterations"],
                (out / "ablation.md").read_text().splitlines()[2])

    assert main(argv) == 0
    iterations, line = row()
    assert iterations == [1, 3] and line.startswith("| baseline (stopped at iteration 1 of 3) |")
    assert "stopped at iteration 1 of 3 by train.time_budget" in caplog.text
    assert main(argv) == 0  # the cut run is continued, not reused: one more iteration under a new budget
    assert row()[0] == [2, 3] and "(stopped at iteration 2 of 3)" in row()[1]
    assert main(argv[:3] + ["train.time_budget=null"] + argv[3:]) == 0  # a run-only key: the run is still its own
    assert row()[0] == [3, 3] and row()[1].startswith("| baseline |")
    records = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # resumed, never restarted


def test_an_interrupted_run_is_resumed_not_trained_again(synth_data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from rsiseg.commands.sweep import train_or_reuse
    from rsiseg.config import config_from_dict
    from rsiseg.engine.trainer import Trainer, TrainingInterrupted

    raw = tiny_config_dict(synth_data, tmp_path / "run")
    raw["train"].update(max_iters=3, checkpoint_interval=1, eval_interval=0)
    cfg = config_from_dict(raw)
    ctrl_c_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train_or_reuse(cfg, "interrupted")
    monkeypatch.undo()
    metrics, extent = train_or_reuse(cfg, "interrupted")
    assert extent == [3, 3] and set(metrics) == {"bbox", "segm"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["iteration"] for r in records if r["kind"] == "run"] == [0, 2]  # resumed at 2, not started again

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "fit", no_training)
    for checkpoint in ("last.pth", "best.pth"):
        (tmp_path / "run" / checkpoint).unlink(missing_ok=True)  # a user freeing space
    assert train_or_reuse(cfg, "finished") == (metrics, [None, None])


def test_ablate_refuses_a_model_without_prompt_switches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "maskrcnn_tiny.yaml"
    assert main(["ablate", str(config), "--out", str(tmp_path / "a")]) == 2
    assert "varies model.prompt, model.yolact" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ablate", str(config), "--variants", "baseline,nope", "--out", str(tmp_path / "a")])
