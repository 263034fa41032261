"""Property-based tests (hypothesis) of the COCO reader, ``validate`` and the converters.

Generated malformed inputs (wrong types anywhere, missing keys, NaN/inf/huge/negative numbers,
odd or duplicate ids, bad RLEs, short polygons, empty lists, unknown ids, malformed YOLO labels and
data.yaml files) may only ever end in the library's own :class:`DataError` (``validate_coco`` and
``fix_coco`` report problems instead of raising once the top level is a COCO object). The runs are
derandomized so that CI is deterministic.


"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from rsiseg.cli import main
from rsiseg.data.coco_index import DataError, load_coco_index
from rsiseg.data.converters.nwpu import convert_nwpu
from rsiseg.data.converters.ssdd import convert_ssdd
from rsiseg.data.converters.yolo import convert_yolo
from rsiseg.data.validate import fix_coco, validate_coco

SIZE = 8  # every image on disk is SIZE x SIZE
IMAGE_NAMES = ("img_001.png", "img_002.png", "img_009.png")  # 001/009 are SSDD test images, 002 train


def _settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------- value strategies

NASTY_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, -10**12, 1e9, -0.0, 1e-300, 1e308,
                                 float("nan"), float("inf"), float("-inf")])
NUMBER = st.one_of(st.integers(-3, SIZE + 3), st.floats(-2.0, SIZE + 2.0), NASTY_NUMBERS,
                   st.integers(-(10**15), 10**15), st.floats(allow_nan=True, allow_infinity=True), st.booleans())
SCALAR = st.one_of(st.none(), st.booleans(), NASTY_NUMBERS, st.text(max_size=4),
                   st.sampled_from(["1", "nan", "", "img_001.png"]))
ODD = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(st.sampled_from(["id", "size", "counts", "name", "x"]), inner, max_size=3),
                   max_leaves=4)
ID = st.one_of(st.integers(0, 3), st.integers(0, 3), SCALAR, st.lists(st.integers(0, 3), max_size=2))

# Image sizes include absurd ones (2**31, 10**12): they must be refused before anything rasterises.
DIMENSION = st.one_of(st.just(SIZE), st.just(SIZE), st.integers(-2, 4 * SIZE), st.integers(1, 10**4),
                      st.integers(2**31, 10**12),
                      st.floats(allow_nan=True), st.text(max_size=2), st.none(), st.booleans())
COORD = st.one_of(st.integers(-1, SIZE + 1), st.floats(-1.0, SIZE + 1.0))
POLYGON = st.one_of(st.lists(COORD, max_size=10), st.lists(COORD, min_size=6, max_size=10),
                    st.lists(st.one_of(COORD, NUMBER, SCALAR), max_size=10))
SEGMENTATION_POLYGONS = st.lists(st.one_of(POLYGON, POLYGON, SCALAR), min_size=1, max_size=3)

RLE_SIZE = st.one_of(st.just([SIZE, SIZE]), SCALAR, st.lists(st.one_of(st.integers(-1, 2 * SIZE), SCALAR), max_size=3),
                     st.text(max_size=2))
# RLE counts: strings (often garbage), integer lists, and odd values (negative, huge, wrong types).
GOOD_COUNTS = st.one_of(st.text(max_size=12), st.lists(st.integers(0, 2**32 - 1), max_size=6), ODD,
                        st.lists(st.integers(-5, 2**40), max_size=4),
                        st.lists(st.integers(0, 2 * SIZE), max_size=8))
MISMATCHED_SIZE = RLE_SIZE.filter(lambda size: size != [SIZE, SIZE])
RLE = st.one_of(
    st.fixed_dictionaries({"size": st.just([SIZE, SIZE]), "counts": GOOD_COUNTS}),
    st.fixed_dictionaries({"size": MISMATCHED_SIZE, "counts": st.one_of(GOOD_COUNTS, ODD)}),
    st.fixed_dictionaries({"size": MISMATCHED_SIZE}),
    st.fixed_dictionaries({"counts": st.one_of(GOOD_COUNTS, ODD)}),  # no size: a mismatch too
)
BBOX = st.one_of(st.lists(st.one_of(st.integers(-1, SIZE), st.floats(-1.0, SIZE + 1.0)), min_size=4, max_size=4),
                 st.lists(NUMBER, min_size=4, max_size=4), st.lists(NUMBER, max_size=5), SCALAR)
AREA = st.one_of(st.floats(0, 64), NUMBER, SCALAR)


def _valid_image(image_id: int, name: str) -> dict[str, Any]:
    return {"id": image_id, "file_name": name, "height": SIZE, "width": SIZE}


def _valid_annotation(ann_id: int, image_id: int) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0,
            "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]], "iscrowd": 0}


def _mutate(draw: st.DrawFn, entry: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """``entry`` with one to three of ``fields`` replaced by drawn values or deleted."""
    entry = dict(entry)
    for key in draw(st.lists(st.sampled_from(list(fields)), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            entry.pop(key, None)
        else:
            entry[key] = draw(fields[key])
    return entry


ANNOTATION_FIELDS = {"id": ID, "image_id": ID, "category_id": ID, "bbox": BBOX, "area": AREA,
                     "segmentation": st.one_of(SEGMENTATION_POLYGONS, SEGMENTATION_POLYGONS, RLE, SCALAR, st.just([])),
                     "iscrowd": st.one_of(st.sampled_from([0, 1]), SCALAR)}
SHAPE_FIELDS = {k: ANNOTATION_FIELDS[k] for k in ("segmentation", "bbox", "area", "iscrowd")}
IMAGE_FIELDS = {"id": ID, "height": DIMENSION, "width": DIMENSION,
                "file_name": st.one_of(st.sampled_from(IMAGE_NAMES), st.just("missing.png"), st.just("noimage.png"),
                                       SCALAR)}


@st.composite
def annotations(draw: st.DrawFn) -> Any:
    """A valid annotation with one to three fields made odd or deleted; now and then not an object at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(ODD)
    fields = ANNOTATION_FIELDS if draw(st.integers(0, 2)) == 0 else SHAPE_FIELDS
    ann = _mutate(draw, _valid_annotation(draw(st.integers(4, 10**6)), draw(st.integers(1, 3))), fields)
    return ann


@st.composite
def images(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(ODD)
    return _mutate(draw, _valid_image(draw(st.integers(1, 4)), draw(st.sampled_from(IMAGE_NAMES))), IMAGE_FIELDS)


CATEGORY = st.one_of(st.fixed_dictionaries({"id": st.integers(0, 3), "name": st.sampled_from(["ship", "car"])}),
                     st.fixed_dictionaries({}, optional={"id": ID, "name": SCALAR}), ODD)


@st.composite
def coco_dicts(draw: st.DrawFn) -> Any:
    """Mostly a COCO object of valid entries plus a few malformed ones; sometimes not a COCO object at all."""
    if draw(st.integers(0, 24)) == 0:
        return draw(ODD)
    imgs = [_valid_image(i, n) for i, n in enumerate(IMAGE_NAMES[:draw(st.sampled_from([3, 3, 3, 3, 2, 1, 0]))], start=1)]
    imgs += draw(st.lists(images(), max_size=2)) if draw(st.integers(0, 3)) == 0 else []
    anns = [_valid_annotation(k, 1 + k % 3) for k in range(1, draw(st.integers(0, 3)) + 1)]
    anns += draw(st.lists(annotations(), min_size=1, max_size=4))
    cats = [{"id": 1, "name": "ship"}, {"id": 2, "name": "car"}][:draw(st.integers(1, 2))]
    if draw(st.integers(0, 4)) == 0:
        cats = draw(st.lists(st.one_of(st.just({"id": 1, "name": "ship"}), CATEGORY), max_size=3))
    coco: dict[str, Any] = {"images": draw(st.permutations(imgs)), "annotations": draw(st.permutations(anns)),
                            "categories": cats}
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        if draw(st.booleans()):
            del coco[key]
        else:
            coco[key] = draw(ODD)
    return coco


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    for name in IMAGE_NAMES:
        Image.new("RGB", (SIZE, SIZE)).save(root / name)
    (root / "noimage.png").write_bytes(b"not a png")
    (root / "annotations").mkdir()
    return root


_counter = itertools.count()


def _write(root: Path, obj: Any, name: str = "instances.json") -> Path:
    path = root / "annotations" / name
    path.write_text(json.dumps(obj))
    return path


def _maybe(call: Any) -> Any:
    """The result of ``call()``, or None when it raised the library's :class:`DataError`."""
    try:
        return call()
    except DataError:
        return None


# ---------------------------------------------------------------- COCO reader and validate


def _skeleton(anns: list[Any]) -> dict[str, Any]:
    return {"images": [_valid_image(i, n) for i, n in enumerate(IMAGE_NAMES, start=1)], "annotations": anns,
            "categories": [{"id": 1, "name": "ship"}, {"id": 2, "name": "car"}]}


@_settings(400)
@given(ann=annotations(), segmentation=st.one_of(SEGMENTATION_POLYGONS, RLE), use_segmentation=st.booleans())
# Found by hypothesis: a polygon wholly left of the image gave a recomputed box outside it, kept by --fix.
@example(ann={"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16.0,
              "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]], "iscrowd": 0},
         segmentation=[[0, 0, 0, 1, -1, 0]], use_segmentation=True)
def test_one_bad_annotation_is_refused_or_counted(ann: Any, segmentation: Any, use_segmentation: bool,
                                                  coco_root: Path) -> None:
    """Deep checks (numbers, polygons, RLEs, boxes) on a single odd annotation in a valid dataset."""
    if use_segmentation and isinstance(ann, dict):
        ann = {**ann, "segmentation": segmentation}
    _check_coco(_skeleton([_valid_annotation(1, 1), ann]), coco_root)


@_settings(200)
@given(coco=coco_dicts())
def test_coco_reader_and_validate_raise_only_data_error(coco: Any, coco_root: Path) -> None:
    _check_coco(coco, coco_root)


def _check_coco(coco: Any, coco_root: Path) -> None:
    """load_coco_index (strict and repairing) raises only DataError; validate_coco and fix_coco report
    instead of raising once the top level is a COCO object, and a repaired copy has no fixable error left."""
    ann_file = _write(coco_root, coco)
    for repair in (False, True):
        index = _maybe(lambda: load_coco_index(ann_file, coco_root, repair=repair))
        if index is not None:  # what was kept is consistent and usable
            assert {img["id"] for img in index.images} <= set(index.anns_by_image)
            assert all(math.isfinite(a["area"]) for anns in index.anns_by_image.values() for a in anns)
            json.dumps(index.to_coco())
    top_ok = isinstance(coco, dict) and all(isinstance(coco.get(k), list)
                                            for k in ("images", "annotations", "categories"))
    for check_images in (True, False):
        report = _maybe(lambda: validate_coco(ann_file, coco_root, check_images=check_images, progress=False))
        assert (report is not None) == top_ok
        if report is not None:
            report.summary()
            json.dumps(report.to_dict())
    assert (_maybe(lambda: fix_coco(ann_file)) is not None) == top_ok
    fixed = _maybe(lambda: fix_coco(ann_file, report.unusable_images if report else ()))
    assert (fixed is not None) == top_ok
    if fixed is not None:
        # The repaired copy is again a COCO object, and a second repair pass changes nothing more
        # than dropping what the first one already counted.
        again = _write(coco_root, fixed[0], "fixed.json")
        report2 = validate_coco(again, coco_root, progress=False)
        fixable = {k for k in report2.errors if k not in {"malformed category entry", "malformed image entry",
                                                          "duplicate category id", "duplicate image id",
                                                          "duplicate file_name", "image size mismatch",
                                                          "no images", "missing image file", "unreadable image",
                                                          "malformed annotation"}}
        assert not fixable, report2.summary()


@_settings(40)
@given(coco=coco_dicts(), mangle=st.sampled_from([b"", b"{", b"[1, 2]", b"\xff\xfe\x00", b"null", b'{"images": 1}']))
def test_unreadable_coco_files_raise_data_error(coco: Any, mangle: bytes, coco_root: Path) -> None:
    ann_file = coco_root / "annotations" / "broken.json"
    ann_file.write_bytes(mangle or json.dumps(coco).encode()[: len(json.dumps(coco)) // 2])
    with pytest.raises(DataError):
        load_coco_index(ann_file, coco_root)
    with pytest.raises(DataError):
        validate_coco(ann_file, coco_root, progress=False)
    with pytest.raises(DataError):
        fix_coco(ann_file)


# ---------------------------------------------------------------- COCO-based converters


@_settings(200)
@given(sources=st.lists(coco_dicts(), min_size=1, max_size=2), skip_invalid=st.booleans(),
       inshore=st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(IMAGE_NAMES), SCALAR, ODD), max_size=2)))
def test_coco_converters_raise_only_data_error(sources: list[Any], skip_invalid: bool, inshore: list[str] | None,
                                               coco_root: Path) -> None:
    n = next(_counter)
    files = [_write(coco_root, coco, f"src{n}_{k}.json") for k, coco in enumerate(sources)]
    out = coco_root / "out" / str(n)
    summary = _maybe(lambda: convert_nwpu(coco_root, out / "nwpu", ann=files, skip_invalid=skip_invalid))
    if summary is not None:
        assert summary["train"]["images"] + summary["val"]["images"] >= 1
        for split in ("train", "val"):
            json.loads((out / "nwpu" / "annotations" / f"nwpu_instances_{split}.json").read_text())
    inshore_file = None
    if inshore is not None:  # names, or now and then malformed image entries
        entries = [{"id": i, "file_name": f} if isinstance(f, str) else f for i, f in enumerate(inshore)]
        inshore_file = _write(coco_root, {"images": entries, "annotations": [], "categories": []}, f"inshore{n}.json")
    summary = _maybe(lambda: convert_ssdd(coco_root, out / "ssdd", inshore_file, ann=files, skip_invalid=skip_invalid))
    if summary is not None:
        assert summary["test"]["images"] + summary["train"]["images"] >= 1


# ---------------------------------------------------------------- YOLO


TOKEN = st.one_of(st.sampled_from(["0", "1", "7", "-1", "0.5", "0.1", "0.9", "1.0", "0.0", "1.7", "-0.3", "nan",
                                   "inf", "-inf", "1e9", "x", "", "1e-9", "0x10", "1_0", "٣"]),
                  st.floats(-3, 3).map(str), st.integers(-2, 3).map(str), st.text(max_size=3).filter(str.strip))
LABEL_LINE = st.lists(TOKEN, min_size=1, max_size=12).map(" ".join)


@pytest.fixture(scope="module")
def yolo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("yolo")
    for split, name, size in (("train", "a.png", (40, 30)), ("val", "b.png", (SIZE, SIZE))):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        Image.new("RGB", size).save(root / "images" / split / name)
    (root / "labels" / "val" / "b.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n1 0.5 0.5 0.2 0.2\n")
    (root / "images" / "empty").mkdir()
    (root / "images" / "broken").mkdir()
    (root / "images" / "broken" / "c.png").write_bytes(b"not a png")
    (root / "list.txt").write_text("images/train/a.png\nimages/val/b.png\n")
    (root / "latin1.txt").write_bytes("images/train/\xe9.png\n".encode("latin-1"))  # not UTF-8
    (root / "list_missing.txt").write_text("images/train/nope.png\n")
    return root


@_settings(120)
@given(lines=st.lists(LABEL_LINE, min_size=1, max_size=30), binary=st.booleans())
def test_yolo_labels_convert_to_valid_coco(lines: list[str], binary: bool, yolo_root: Path) -> None:
    label = yolo_root / "labels" / "train" / "a.txt"
    if binary:
        label.write_bytes(b"\xff\xfe" + "\n".join(lines).encode())
    else:
        label.write_text("\n".join(lines) + "\n")
    (yolo_root / "data.yaml").write_text("train: images/train\nnames: [car, ship]\n")
    out = yolo_root / "out"
    if binary:
        with pytest.raises(DataError):
            convert_yolo(yolo_root, out)
        return
    summary = convert_yolo(yolo_root, out)
    kept = summary["splits"]["train"]["instances"]
    counted = sum(v for k, v in summary["problems"].items() if "skipped" in k)
    assert kept + counted == sum(1 for line in label.read_text().splitlines() if line.strip())
    report = validate_coco(out / "annotations" / "instances_train.json", yolo_root, progress=False)
    assert report.ok, report.summary()


SPLIT_ENTRY = st.one_of(st.sampled_from(["images/train", "images/val", "images/empty", "images/broken", "nowhere",
                                         "list.txt", "latin1.txt", "list_missing.txt", "images/train/a.png", ""]),
                        st.lists(st.sampled_from(["images/train", "images/val", "nowhere", "list.txt"]), max_size=3),
                        SCALAR, ODD)
NAME_KEY = st.one_of(st.integers(-2, 5), st.text(max_size=3), st.floats(), st.booleans())
NAMES = st.one_of(st.dictionaries(NAME_KEY, st.one_of(st.text(max_size=3), SCALAR), min_size=1, max_size=3),
                  st.lists(st.one_of(st.sampled_from(["car", "ship", "1", "10", "2", " 3", "-1"]), SCALAR), max_size=4),
                  st.dictionaries(NAME_KEY, st.one_of(st.text(max_size=3), SCALAR), max_size=3), SCALAR)
PATH_VALUE = st.one_of(st.sampled_from(["", ".", "nowhere", "images"]), st.text(max_size=4), st.none(),
                       st.sampled_from([0, False, [], 5, ["a"]]))


@st.composite
def data_yamls(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.sampled_from(["", "[", "train: images/train\n", "a: [", "- 1\n- 2\n", "42", "null",
                                               "names: !!python/object:x {}\n", "\t: x"]), st.text(max_size=20)))
    spec = draw(st.fixed_dictionaries({"names": NAMES}, optional={"path": PATH_VALUE, "train": SPLIT_ENTRY,
                                                    "val": SPLIT_ENTRY, "test": SPLIT_ENTRY, "nc": ODD}))
    return yaml.safe_dump(spec, allow_unicode=True)


@_settings(200)
@given(text=data_yamls(), split=st.sampled_from([None, None, "train", "val", "test"]))
def test_malformed_data_yaml_raises_only_data_error(text: str, split: str | None, yolo_root: Path) -> None:
    (yolo_root / "labels" / "train" / "a.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n")
    data_yaml = yolo_root / "custom.yaml"
    data_yaml.write_text(text)
    summary = _maybe(lambda: convert_yolo(yolo_root, yolo_root / "out_yaml", split=split, ann=data_yaml))
    if summary is not None:
        assert sum(s["images"] for s in summary["splits"].values()) >= 1


# ---------------------------------------------------------------- the command line, in process


@_settings(30)
@given(coco=coco_dicts(), fmt=st.sampled_from(["nwpu", "ssdd"]))
def test_cli_exits_cleanly_on_malformed_coco(coco: Any, fmt: str, coco_root: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ann_file = _write(coco_root, coco, "cli.json")
    n = next(_counter)
    codes = [main(["data", "validate", "--data", str(ann_file), "--images", str(coco_root), "-q",
                   "--fix", str(coco_root / "out" / f"cli_fixed{n}.json")]),
             main(["data", "convert", fmt, "--src", str(coco_root), "--out", str(coco_root / "out" / f"cli{n}"),
                   "--ann", str(ann_file), "-q"])]
    assert set(codes) <= {0, 1, 2}, codes
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
