"""Tests of the streamed whole-scene pass: the band-by-band merge gives the whole-scene merge's instances,
early, and the outputs written batch by batch equal those written at once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import torch

from rsiseg.data.merge import merge_scene_items
from rsiseg.data.merge_stream import StreamingMerge
from rsiseg.data.tiling import patch_windows
from rsiseg.inference.geo_export import VectorWriter, item_polygon, write_vectors
from rsiseg.inference.raster import RasterScene
from rsiseg.inference.scene_outputs import join_result_parts
from rsiseg.inference.tiled import TileOptions, predict_scene, tile_items
from tests.inference.test_tiled import RectangleFinder, fake_loaded, write_scene

SIZE, TILE, OVERLAP = 1200, 256, 64


def random_rects(seed: int, count: int = 60) -> list[tuple[int, int, int, int]]:
    """Rectangles from 10 px to 500 px (some span three tile rows), apart or touching or overlapping."""
    rng = np.random.default_rng(seed)
    rects = []
    for _ in range(count):
        w, h = rng.integers(10, 120, size=2) * (5 if rng.random() < 0.1 else 1)
        x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
        rects.append((int(x), int(y), int(x + w), int(y + h)))
    return rects


def tile_detections(path: Path) -> list[list]:
    """Each tile's scene items (row-major), from the rectangle finder."""
    model, options = RectangleFinder(), TileOptions(size=TILE, overlap=OVERLAP)
    windows = patch_windows(SIZE, SIZE, TILE, OVERLAP)
    with RasterScene(path) as scene:
        tiles = []
        for source, window in enumerate(windows):
            pixels, _ = scene.read(window)
            pred = model([torch.from_numpy(np.moveaxis(pixels, -1, 0).astype(np.float32) / 255.0)])[0]
            tiles.append(tile_items(pred, window, (SIZE, SIZE), [7], options, source=source))
    return tiles


def key(item) -> tuple:
    return item.category_id, round(item.score, 6), item.rle["counts"], item.cut


@pytest.mark.parametrize(("seed", "policy"), [(0, "union"), (1, "union"), (2, "suppress")])
def test_band_by_band_merge_equals_the_whole_scene_merge(tmp_path: Path, seed: int, policy: str) -> None:
    write_scene(tmp_path / "scene.tif", random_rects(seed), height=SIZE, width=SIZE)
    tiles = tile_detections(tmp_path / "scene.tif")
    windows = patch_windows(SIZE, SIZE, TILE, OVERLAP)
    whole_stats: dict[str, int] = {}
    whole = merge_scene_items([it for items in tiles for it in items], SIZE, SIZE, policy=policy, stats=whole_stats)

    stream_stats: dict[str, int] = {}
    merge = StreamingMerge(SIZE, SIZE, stream_stats, policy=policy)
    released, most_pending = [], 0
    for index, items in enumerate(tiles):
        merge.add(items)
        most_pending = max(most_pending, len(merge.pending))
        frontier = windows[index + 1][0] if index + 1 < len(windows) else math.inf
        released.append(merge.release(frontier))
    streamed = [it for batch in released for it in batch]

    assert sorted(map(key, streamed)) == sorted(map(key, whole))
    assert stream_stats == whole_stats and whole_stats["fused" if policy == "union" else "suppressed"] > 0
    assert sum(1 for batch in released if batch) >= 4  # given out row by row, not at the end
    assert next(i for i, batch in enumerate(released) if batch) < len(tiles) / 2
    assert most_pending < 0.8 * sum(len(items) for items in tiles)
    assert merge.pending == []


def test_predict_scene_streams_the_same_instances_as_one_release(tmp_path: Path) -> None:
    write_scene(tmp_path / "scene.tif", random_rects(3), height=SIZE, width=SIZE)
    tiles = tile_detections(tmp_path / "scene.tif")
    whole = merge_scene_items([it for items in tiles for it in items], SIZE, SIZE)
    with RasterScene(tmp_path / "scene.tif") as scene:
        result = predict_scene(fake_loaded(), scene, TileOptions(size=TILE, overlap=OVERLAP, batch_size=3),
                               progress=False)
    assert sorted(map(key, result.items)) == sorted(map(key, whole))
    assert result.stats["instances"] == len(whole) and result.stats["detections"] == sum(map(len, tiles))


@pytest.mark.parametrize(("suffix", "driver"), [(".geojson", "GeoJSON"), (".gpkg", "GPKG")])
def test_vectors_written_in_batches_equal_one_write(tmp_path: Path, suffix: str, driver: str) -> None:
    write_scene(tmp_path / "scene.tif", random_rects(4, 20), height=SIZE, width=SIZE)
    with RasterScene(tmp_path / "scene.tif") as scene:
        items = predict_scene(fake_loaded(), scene, TileOptions(size=TILE, overlap=OVERLAP), progress=False).items
        polygons = [item_polygon(it) for it in items]
        write_vectors(tmp_path / f"once{suffix}", polygons, items, {7: "thing"}, scene.transform, scene.crs, driver)
        writer = VectorWriter(tmp_path / f"batches{suffix}", {7: "thing"}, scene.transform, scene.crs, driver)
        for start in range(0, len(items), 6):
            writer.write(polygons[start:start + 6], items[start:start + 6])
        assert writer.close() == len(items)
        empty = VectorWriter(tmp_path / f"empty{suffix}", {7: "thing"}, scene.transform, scene.crs, driver)
        assert empty.close() == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "part" in p.name) == []  # the staging GeoPackage is gone
    once, batches = (pyogrio.raw.read(tmp_path / f"{name}{suffix}") for name in ("once", "batches"))
    assert list(batches[2]) == list(once[2])  # geometries, in order
    for a, b in zip(once[3], batches[3]):
        np.testing.assert_array_equal(a, b)  # id 1..N across batches, class, score, areas
    assert pyogrio.read_info(tmp_path / f"batches{suffix}")["crs"] == "EPSG:32633"
    assert pyogrio.read_info(tmp_path / f"empty{suffix}")["features"] == 0


def test_result_parts_join_into_one_json_list(tmp_path: Path) -> None:
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    parts[0].write_text(json.dumps({"image_id": 2}) + "\n" + json.dumps({"image_id": 2, "x": [1]}) + "\n")
    parts[1].write_text("")
    parts[2].write_text(json.dumps({"image_id": 1}) + "\n")
    assert join_result_parts(parts, tmp_path / "out.json") == 3
    assert json.loads((tmp_path / "out.json").read_text()) == [{"image_id": 2}, {"image_id": 2, "x": [1]},
                                                               {"image_id": 1}]
    assert join_result_parts([parts[1]], tmp_path / "none.json") == 0
    assert json.loads((tmp_path / "none.json").read_text()) == []


def test_scene_reads_through_a_bounded_block_cache(tmp_path: Path) -> None:
    """GDAL's default cache (5% of the RAM) would keep every decoded block of the scene."""
    import rasterio

    from rsiseg.inference.raster import BLOCK_CACHE_MB

    write_scene(tmp_path / "scene.tif", [], height=64, width=64)
    with RasterScene(tmp_path / "scene.tif"):
        assert rasterio.env.getenv()["GDAL_CACHEMAX"] == BLOCK_CACHE_MB
    assert not rasterio.env.hasenv() or "GDAL_CACHEMAX" not in rasterio.env.getenv()
    with pytest.raises(ValueError, match="asks for band"):
        RasterScene(tmp_path / "scene.tif", bands=[9])
    assert not rasterio.env.hasenv() or "GDAL_CACHEMAX" not in rasterio.env.getenv()  # restored on errors too
