"""Integration on real SAR data: a few iterations on a handful of SSDD images, then COCO eval.

Skips when ``../shared/data/ssdd`` is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from rsiseg.config import load_config
from rsiseg.engine.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ssdd_maskrcnn_r50.yaml"


def subset(src: Path, out: Path, count: int) -> Path:
    """The first ``count`` images of a COCO file that have annotations, with their annotations."""
    coco = json.loads(src.read_text())
    with_anns = {a["image_id"] for a in coco["annotations"]}
    images = [img for img in coco["images"] if img["id"] in with_anns][:count]
    ids = {img["id"] for img in images}
    coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    out.write_text(json.dumps(coco))
    return out


def test_ssdd_few_iterations(shared_data: Path, tmp_path: Path) -> None:
    ssdd = shared_data / "ssdd"
    train = subset(ssdd / "annotations" / "ssdd_instances_train.json", tmp_path / "train.json", 4)
    test = subset(ssdd / "annotations" / "ssdd_instances_test.json", tmp_path / "test.json", 2)
    test_names = [img["file_name"] for img in json.loads(test.read_text())["images"]]
    assert all(Path(n).stem[-1] in "19" for n in test_names)  # the official split
    cfg = load_config(CONFIG, [
        f"data.train_ann={train}", f"data.val_ann={test}", f"data.train_images={ssdd / 'images'}",
        f"data.val_images={ssdd / 'images'}", "data.num_workers=0", "model.name=maskrcnn_r18_fpn",
        "model.pretrained=none", "model.norm=bn", "model.trainable_layers=5", "model.fpn_channels=64",
        "model.min_size=192", "model.max_size=256", "model.roi_batch_size_per_image=64",
        "train.epochs=1", "train.batch_size=2", "train.lr=0.005", "train.warmup_iters=1", "train.log_interval=1",
        "train.tensorboard=false", f"train.output_dir={tmp_path / 'run'}", "eval.batch_size=2",
    ])
    metrics = Trainer(cfg, progress=False).fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(r["loss"] > 0 for r in records if r["kind"] == "train")
    for iou_type in ("bbox", "segm"):
        assert 0.0 <= metrics[iou_type]["AP50"] <= 1.0
        assert set(metrics[iou_type]["per_class"]) == {"ship"}
