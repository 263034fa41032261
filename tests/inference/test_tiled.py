"""Tests of whole-scene prediction: tiling, the cross-tile merge, georeferenced output and bad rasters.

A stand-in "model" finds the bright rectangles of an image (connected components) and returns
them as Mask R-CNN would (boxes, labels, scores, box-relative ``roi_masks``), so the tiling and
merge are tested against the exact answer the same model gives on the untiled scene.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from pycocotools import mask as mask_utils
from rasterio.transform import from_origin
from scipy import ndimage
from torch import nn

from rsiseg.commands.predict_tiled import tiled_overrides
from rsiseg.data.io import ImageReadError
from rsiseg.data.tiling import patch_windows
from rsiseg.inference.geo_export import item_polygon, write_vectors
from rsiseg.inference.predictor import LoadedModel
from rsiseg.inference.raster import RasterScene
from rsiseg.inference.tiled import TileOptions, predict_scene, stream_scene

H, W = 1000, 1400
# Tiles at size 800 / overlap 200: x in [0, 800), [600, 1400); y in [0, 800), [200, 1000).
RECTS = [
    (50, 50, 150, 150),      # one tile only
    (500, 40, 950, 120),     # spans 2 tiles, longer than the overlap: cut in both
    (520, 680, 880, 880),    # spans 4 tiles, cut in every one
    (650, 300, 750, 400),    # inside the overlap of all four tiles: duplicates
    (1250, 880, 1380, 990),  # near the bottom-right corner
    (560, 450, 660, 520),    # whole in the left tiles, cut by x = 600 in the right ones
]
SMALL = [r for r in RECTS if r[2] - r[0] < 200 and r[3] - r[1] < 200]  # each whole in some tile


class RectangleFinder(nn.Module):
    """Finds bright axis-aligned rectangles: one detection per connected component of band 0 > 0.5.

    Its ``transform`` only carries the input sizes the multi-scale pass changes (it resizes nothing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.transform = SimpleNamespace(min_size=(800,), max_size=1333)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            labels, _ = ndimage.label(image[0].numpy() > 0.5)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)]
            n = len(boxes)
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                            "labels": torch.ones(n, dtype=torch.int64),
                            "scores": torch.linspace(0.9, 0.8, n) if n else torch.zeros(0),
                            "roi_masks": torch.ones(n, 28, 28)})
        return outputs


def fake_loaded(in_channels: int = 3) -> LoadedModel:
    config = SimpleNamespace(model=SimpleNamespace(in_channels=in_channels))
    return LoadedModel(RectangleFinder(), config, ["thing"], [7], torch.device("cpu"))  # type: ignore[arg-type]


def write_scene(path: Path, rects: list[tuple[int, int, int, int]] = RECTS, *, crs: str | None = "EPSG:32633",
                count: int = 3, nodata: int | None = None, height: int = H, width: int = W) -> np.ndarray:
    """A uint8 GeoTIFF (0.5 m pixels at (500000, 4000000)) with white rectangles; returns band 1."""
    band = np.zeros((height, width), dtype=np.uint8)
    for x1, y1, x2, y2 in rects:
        band[y1:y2, x1:x2] = 255
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count, "dtype": "uint8",
               "transform": from_origin(500000, 4000000, 0.5, 0.5), "nodata": nodata}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.stack([band] * count))
    return band


def scene_masks(items: list) -> list[np.ndarray]:
    return [mask_utils.decode(it.rle).astype(bool) for it in items]


def test_windows_cover_every_pixel_flush_with_the_border() -> None:
    windows = patch_windows(1000, 1400, 800, 200)
    assert windows == [(0, 800, 0, 800), (0, 800, 600, 1400), (200, 1000, 0, 800), (200, 1000, 600, 1400)]
    assert patch_windows(300, 500, 800, 200) == [(0, 300, 0, 500)]  # smaller than a tile: one window
    covered = np.zeros((2000, 2100), dtype=int)
    windows = patch_windows(2000, 2100, 512, 128)
    for y1, y2, x1, x2 in windows:
        assert y2 - y1 == 512 and x2 - x1 == 512
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    xs = sorted({w[2] for w in windows})
    assert xs[-1] == 2100 - 512 and all(b - a <= 512 - 128 for a, b in zip(xs, xs[1:]))  # overlap at least 128
    with pytest.raises(ValueError, match="overlap"):
        patch_windows(100, 100, 64, 64)


def predict(path: Path, **options: object) -> list:
    with RasterScene(path) as scene:
        return predict_scene(fake_loaded(), scene, TileOptions(**options), progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["union", "suppress"])
def test_tiled_scene_emits_each_object_once(tmp_path: Path, policy: str) -> None:
    # union fuses the fragments of the objects cut in every tile; suppress needs each object whole in some tile
    rects = RECTS if policy == "union" else SMALL
    write_scene(tmp_path / "scene.tif", rects)
    untiled = scene_masks(predict(tmp_path / "scene.tif", size=1400).items)  # one window: the whole scene
    result = predict(tmp_path / "scene.tif", size=800, overlap=200, batch_size=3, policy=policy)
    masks = scene_masks(result.items)
    assert len(untiled) == len(masks) == len(rects)
    assert result.stats["tiles"] == 4 and result.stats["detections"] > len(rects)
    iou = [max((m & t).sum() / (m | t).sum() for m in masks) for t in untiled]
    assert min(iou) >= 0.95, iou
    assert result.stats["fused" if policy == "union" else "suppressed"] > 0
    assert all(it.category_id == 7 for it in result.items)
    assert not any(it.cut for it in result.items if it.box[0] < 600 < it.box[0] + it.box[2] and it.box[2] < 200)


def test_multiscale_pass_adds_no_duplicates(tmp_path: Path) -> None:
    write_scene(tmp_path / "scene.tif")
    loaded = fake_loaded()
    seen = []
    loaded.model.register_forward_pre_hook(lambda model, _: seen.append((model.transform.min_size,
                                                                         model.transform.max_size)))
    with RasterScene(tmp_path / "scene.tif") as scene:
        result = predict_scene(loaded, scene, TileOptions(scales=(1.0, 0.5)), progress=False)
    assert len(result.items) == len(RECTS)
    assert result.stats["detections"] >= 2 * len(RECTS)
    assert set(seen) == {((800,), 1333), ((400,), 666)}  # scaled for the second pass only
    assert loaded.model.transform.min_size == (800,)


def scene_ground_truth(scenes: dict[str, list[tuple[int, int, int, int]]]) -> dict:
    """A COCO dict of ``H x W`` scenes (ids 20, 19, ...: not in id order) whose objects are the rectangles,
    category 7."""
    images, annotations = [], []
    for position, (name, rects) in enumerate(scenes.items()):
        image_id = 20 - position
        images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        for x1, y1, x2, y2 in rects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 7, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    return {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "thing"}]}


def test_scene_level_evaluation_scores_each_cut_object_once(tmp_path: Path) -> None:
    """``eval --tiled``: the merged predictions of whole scenes against their scene-level ground truth."""
    from rsiseg.commands.predict_tiled import predict_coco_scenes
    from rsiseg.evaluation.coco import evaluate_coco

    write_scene(tmp_path / "a.tif")
    write_scene(tmp_path / "b.tif", SMALL[:2])
    coco = scene_ground_truth({"a.tif": RECTS, "b.tif": SMALL[:2]})
    ap = {}
    for policy in ("union", "suppress"):
        results = predict_coco_scenes(fake_loaded(), coco, tmp_path, TileOptions(policy=policy), None, False)
        assert [r["image_id"] for r in results] == sorted((r["image_id"] for r in results), reverse=True)  # JSON order
        metrics = evaluate_coco(coco, results)
        ap[policy] = (metrics["bbox"]["AP50"], metrics["segm"]["AP50"])
        if policy == "union":
            assert len(results) == len(RECTS) + 2
            assert metrics["segm"]["AP"] > 0.9 and metrics["bbox"]["AP"] > 0.9
    assert ap["union"] == (1.0, 1.0)
    assert max(ap["suppress"]) < 1.0  # the objects cut in every tile come back in fragments

    coco["images"][1]["width"] = W + 1
    with pytest.raises(ValueError, match=r"b\.tif: the scene is 1400 x 1000 px but image 19"):
        predict_coco_scenes(fake_loaded(), coco, tmp_path, TileOptions(), None, False)


def test_geojson_and_gpkg_round_trip_crs_transform_and_area(tmp_path: Path) -> None:
    write_scene(tmp_path / "scene.tif")
    with RasterScene(tmp_path / "scene.tif") as scene:
        result = predict_scene(fake_loaded(), scene, TileOptions(), progress=False)
        polygons = [item_polygon(it, 0.0) for it in result.items]
        for suffix, driver in ((".geojson", "GeoJSON"), (".gpkg", "GPKG")):
            path = tmp_path / f"out{suffix}"
            assert write_vectors(path, polygons, result.items, {7: "thing"}, scene.transform, scene.crs,
                                 driver) == len(RECTS)
            info = pyogrio.read_info(path)
            assert rasterio.crs.CRS.from_user_input(info["crs"]) == scene.crs
            _, _, geometry, fields = pyogrio.raw.read(path)
            import shapely

            geoms = shapely.from_wkb(geometry)
            names = list(info["fields"])
            # Pixel edges at 0.5 m from (500000, 4000000), y pointing down; features in item order.
            for geom, item in zip(geoms, result.items):
                x, y, w, h = item.box
                assert geom.is_valid
                assert geom.bounds == pytest.approx((500000 + 0.5 * x, 4000000 - 0.5 * (y + h),
                                                     500000 + 0.5 * (x + w), 4000000 - 0.5 * y))
            np.testing.assert_allclose(fields[names.index("area_m2")], [it.area * 0.25 for it in result.items])
            assert set(fields[names.index("class")]) == {"thing"}


def test_scene_without_crs_is_written_in_pixels(tmp_path: Path) -> None:
    write_scene(tmp_path / "plain.tif", crs=None)
    with RasterScene(tmp_path / "plain.tif") as scene:
        assert not scene.georeferenced
        result = predict_scene(fake_loaded(), scene, TileOptions(), progress=False)
        polygons = [item_polygon(it, 0.0) for it in result.items]
        write_vectors(tmp_path / "plain.geojson", polygons, result.items, {7: "thing"}, scene.transform, None, "GeoJSON")
    features = json.loads((tmp_path / "plain.geojson").read_text())["features"]
    for feature, item in zip(features, result.items):
        xs = [x for poly in feature["geometry"]["coordinates"] for x, _ in poly[0]]
        assert (min(xs), max(xs)) == (item.x, item.x + item.crop.shape[1])
    assert all(f["properties"]["area_m2"] is None for f in features)


def test_nodata_tiles_are_skipped_and_all_nodata_is_refused(tmp_path: Path) -> None:
    write_scene(tmp_path / "empty.tif", rects=[], nodata=0)
    with RasterScene(tmp_path / "empty.tif") as scene, pytest.raises(ValueError, match="every pixel is nodata"):
        predict_scene(fake_loaded(), scene, TileOptions(), progress=False)
    band = np.zeros((H, W), dtype=np.uint8)
    band[:, 800:] = 10  # the left tiles (x < 800) are wholly nodata
    band[100:200, 900:1000] = 255
    with rasterio.open(tmp_path / "half.tif", "w", driver="GTiff", height=H, width=W, count=1, dtype="uint8",
                       nodata=0) as ds:
        ds.write(band[None])
    with RasterScene(tmp_path / "half.tif") as scene:
        result = predict_scene(fake_loaded(), scene, TileOptions(), progress=False)
    assert result.stats["tiles_skipped_nodata"] == 2
    assert len(result.items) == 1


def test_bad_rasters_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "garbage.tif").write_bytes(b"II*\x00" + b"\x07" * 200)
    with pytest.raises(ImageReadError, match="garbage.tif"):
        RasterScene(tmp_path / "garbage.tif")
    write_scene(tmp_path / "scene.tif", count=1)
    with pytest.raises(ValueError, match=r"--bands 3,2,1 asks for band\(s\) \[3, 2\].*bands 1..1"):
        RasterScene(tmp_path / "scene.tif", bands=[3, 2, 1])
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        RasterScene(tmp_path / "missing.tif")
    data = (tmp_path / "scene.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])  # header intact, strips missing
    with RasterScene(tmp_path / "cut.tif") as scene, pytest.raises(ImageReadError, match="cut.tif.*truncated"):
        predict_scene(fake_loaded(), scene, TileOptions(), progress=False)


def test_one_band_sar_scene_into_a_three_band_model(tmp_path: Path) -> None:
    write_scene(tmp_path / "sar.tif", count=1)
    with RasterScene(tmp_path / "sar.tif", model_bands=3) as scene:
        assert scene.bands == [1]
        result = predict_scene(fake_loaded(3), scene, TileOptions(), progress=False)
    assert len(result.items) == len(RECTS)  # the band is repeated to 3 (documented in --bands)
    write_scene(tmp_path / "two.tif", count=2)
    with RasterScene(tmp_path / "two.tif", model_bands=3) as scene, pytest.raises(ImageReadError, match="2 bands"):
        predict_scene(fake_loaded(3), scene, TileOptions(), progress=False)


def test_predict_tiled_command_writes_every_output(untrained_checkpoint: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from rsiseg.cli import main

    write_scene(tmp_path / "scene.tif", rects=[(40, 40, 120, 90), (300, 200, 420, 330)], height=420, width=560)
    out = tmp_path / "pred"
    args = ["-q", "predict", "--checkpoint", untrained_checkpoint, str(tmp_path / "scene.tif"), "--out", str(out),
            "--tile-size", "256", "--tile-overlap", "64", "--score-threshold", "0", "--overview-size", "200"]
    assert main([*args, "--tile-above", "500"]) == 0  # 560 px > 500: switched to tiled by itself
    images = json.loads((out / "images.json").read_text())["images"]
    assert images[0]["tiles"] == 6 and images[0]["crs"] == "EPSG:32633"
    assert images[0]["transform"] == [0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0]
    results = json.loads((out / "predictions.json").read_text())
    assert results and {r["segmentation"]["size"][0] for r in results} == {420}
    assert all(r["bbox"][0] + r["bbox"][2] <= 560 + 1 for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["total"].values()) == len(results) == images[0]["instances"]
    assert pyogrio.read_info(out / images[0]["vectors"])["features"] == images[0]["features"] > 0
    assert Image.open(out / images[0]["overview"]).size == (200, 150)

    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    fresh = tmp_path / "fresh"
    assert main(["-q", "predict", "--checkpoint", untrained_checkpoint, str(tmp_path / "scene.tif"),
                 str(tmp_path / "bad.tif"), "--tiled", "--out", str(fresh)]) == 2
    assert "bad.tif: not a readable raster" in capsys.readouterr().err
    assert not fresh.exists()  # nothing partial is left behind
    assert main([*args, "--tiled", "--vector-format", "gpkg"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--tiled", "--vector-format", "gpkg", "--overwrite", "--no-overlays"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "predictions.json", "summary.json", "vectors"]
    assert [p.suffix for p in (out / "vectors").iterdir()] == [".gpkg"]


def traced_peak(path: Path, size: int, step: int = 256) -> tuple[int, int]:
    """Peak traced bytes of a tiled pass over a ``size`` px scene of one 80 x 140 object per cell, and its instances."""
    import tracemalloc

    from rasterio.windows import Window

    block = np.zeros((step, step), dtype=np.uint8)
    block[40:120, 60:200] = 255
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=1, dtype="uint8", tiled=True,
                       blockxsize=256, blockysize=256, crs="EPSG:32633", transform=from_origin(0, 0, 1, 1)) as ds:
        for y in range(0, size, step):
            for x in range(0, size, step):
                ds.write(block[None], window=Window(x, y, step, step))
    tracemalloc.start()
    with RasterScene(path) as scene:
        count = sum(len(batch) for batch in stream_scene(  # each batch dropped as a writer would drop it
            fake_loaded(), scene, TileOptions(size=800, overlap=200, batch_size=4), progress=False))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, count


@pytest.mark.slow
def test_memory_stays_bounded_on_an_8k_scene(tmp_path: Path) -> None:
    """From 4k to 8k px the peak barely moves: it follows the tile batch and two tile rows of instances,
    not the scene area nor its instance count."""
    peak_4k, count_4k = traced_peak(tmp_path / "4k.tif", 4096)
    peak_8k, count_8k = traced_peak(tmp_path / "8k.tif", 8192)
    assert (count_4k, count_8k) == (256, 1024)  # every object once
    assert peak_8k < 1.2 * peak_4k, f"peak {peak_4k / 2**20:.0f} -> {peak_8k / 2**20:.0f} MiB"
    assert peak_8k < 8192 * 8192 * 3 / 2, f"peak {peak_8k / 2**20:.0f} MiB"  # under half the 3-band scene


@pytest.mark.parametrize("name", ["maskrcnn_r18_fpn", "cascade_maskrcnn_r18_fpn", "yolact_r18", "relact_r18"])
def test_raised_score_floor_keeps_the_same_detections(name: str) -> None:
    """predict --tiled raises the model's box_score_thresh to just under --score-threshold (the mask head then
    skips what would be dropped): the detections at or above it, boxes, scores and masks, are those of the low floor."""
    from dataclasses import replace

    from rsiseg.config import ExperimentConfig, YolactConfig, to_dict
    from rsiseg.data.synthetic import generate_scene
    from rsiseg.inference.predictor import predict_images
    from rsiseg.models.registry import build_model
    from tests.models.test_mask_rcnn import tiny

    yolact = YolactConfig(sorting="quality") if name == "relact_r18" else YolactConfig()
    cfg = tiny(name=name.replace("relact", "yolact"), box_score_thresh=0.0, min_size=256, max_size=256,
               num_classes=5, yolact=replace(yolact, phase=replace(yolact.phase, enabled=name == "relact_r18")))
    torch.manual_seed(0)
    low_model = build_model(cfg).eval()
    image = torch.from_numpy(generate_scene(np.random.default_rng(3), 256)[0]).permute(2, 0, 1).float() / 255
    low = predict_images(low_model, [image], torch.device("cpu"))[0]
    threshold = float(low["scores"].median())
    args = SimpleNamespace(max_detections=None, score_threshold=threshold, checkpoint="model.pth")
    overrides = tiled_overrides(args, {"config": to_dict(ExperimentConfig(model=replace(cfg, box_score_thresh=0.05)))})
    assert list(overrides) == ["box_score_thresh"] and threshold - 1e-6 < overrides["box_score_thresh"] < threshold
    high_model = build_model(replace(cfg, **overrides)).eval()
    high_model.load_state_dict(low_model.state_dict())
    high = predict_images(high_model, [image], torch.device("cpu"))[0]
    kept, high_kept = low["scores"] >= threshold, high["scores"] >= threshold  # what the tiled path keeps
    assert 0 < int(kept.sum()) < len(low["scores"])  # (RELACT may return more under it: its floor is on confidence)
    for key in ("boxes", "labels", "scores", "roi_masks"):
        torch.testing.assert_close(high[key][high_kept], low[key][kept])


def test_tiled_overrides_leave_a_higher_stored_floor(untrained_checkpoint: str) -> None:
    from rsiseg.checkpoint import load_checkpoint

    state = load_checkpoint(untrained_checkpoint)  # its box_score_thresh is the default 0.05
    args = SimpleNamespace(max_detections=7, score_threshold=0.0, checkpoint=untrained_checkpoint)
    assert tiled_overrides(args, state) == {"detections_per_img": 7}
    assert tiled_overrides(SimpleNamespace(max_detections=None, score_threshold=0.3, checkpoint="c"), state) == {
        "box_score_thresh": pytest.approx(0.3, abs=1e-7)}
