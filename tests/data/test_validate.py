"""Dataset validation: every problem reported at once, each naming the file and the image or annotation id."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retinanet.cli import main
from retinanet.data.validate import DataValidationError, validate_coco

from .conftest import annotation, coco, image_record, save_image


@pytest.fixture
def images(tmp_path):
    """A folder with a.png (h 20, w 30) and b.png (h 40, w 10)."""
    folder = tmp_path / "images"
    save_image(folder / "a.png", np.zeros((20, 30, 3)))
    save_image(folder / "b.png", np.zeros((40, 10, 3)))
    return folder


def _has(messages, *parts):
    """True when one message contains every part."""
    return any(all(p in m for p in parts) for m in messages)


def test_clean_dataset_converts_boxes_to_xyxy(images, write_json):
    path = write_json(coco([image_record(1, "a.png", 20, 30), image_record(2, "b.png", 40, 10)],
                           [annotation(5, 1, [2, 3, 4, 5]), annotation(6, 1, [0.5, 1, 10, 2], iscrowd=1)]))
    report = validate_coco(path, images)
    assert report.ok and not report.warnings
    assert report.annotations == {1: [{"id": 5, "category_id": 1, "bbox": [2.0, 3.0, 6.0, 8.0], "iscrowd": False},
                                      {"id": 6, "category_id": 1, "bbox": [0.5, 1.0, 10.5, 3.0], "iscrowd": True}],
                                  2: []}
    assert [i["id"] for i in report.images] == [1, 2]
    report.raise_if_errors()


def test_every_error_kind_is_reported_at_once(images, write_json, tmp_path):
    (images / "junk.png").write_bytes(b"not an image")
    data = coco(
        [image_record(1, "a.png", 20, 30),
         image_record(1, "b.png", 40, 10),  # duplicate image id
         image_record(2, "missing.png", 10, 10),  # file not found
         image_record(3, "junk.png", 10, 10),  # unreadable
         image_record(4, "b.png", 10, 40),  # size disagrees with the file
         {"id": 5, "file_name": "a.png"}],  # missing height, width
        [annotation(10, 1, [1, 1, 2, 2]),
         annotation(10, 1, [1, 1, 2, 2]),  # duplicate annotation id
         annotation(11, 99, [1, 1, 2, 2]),  # unknown image
         annotation(12, 1, [1, 1, 2, 2], category_id=42),  # unknown category
         annotation(13, 1, [1, float("nan"), 2, 2]),  # non-finite
         annotation(14, 1, [1, 1, float("inf"), 2]),
         annotation(15, 1, [1, 1, 2]),  # not 4 numbers
         {"id": 16, "image_id": 1, "bbox": [1, 1, 2, 2]},  # missing category_id
         {"image_id": 1}],  # missing id
        [{"id": 1, "name": "thing"}, {"id": 1, "name": "again"}, {"name": "nameless"}])
    path = write_json(data)
    report = validate_coco(path, images)
    errors = report.errors
    f = str(path)
    assert _has(errors, f, "duplicate image id 1")
    assert _has(errors, str(images / "missing.png"), "image id 2", "not found")
    assert _has(errors, str(images / "junk.png"), "image id 3", "cannot read image")
    assert _has(errors, str(images / "b.png"), "image id 4", "height 10, width 40", "height 40, width 10")
    assert _has(errors, f, "image id 5", "'height'", "'width'")
    assert _has(errors, f, "duplicate annotation id 10")
    assert _has(errors, f, "annotation id 11", "unknown image id 99")
    assert _has(errors, f, "annotation id 12", "unknown category id 42")
    assert _has(errors, f, "annotation id 13", "non-finite")
    assert _has(errors, f, "annotation id 14", "non-finite")
    assert _has(errors, f, "annotation id 15", "4 numbers")
    assert _has(errors, f, "annotation id 16", "'category_id'")
    assert _has(errors, f, "annotations[8]", "'id'")
    assert _has(errors, f, "duplicate category id 1")
    assert _has(errors, f, "categories[2]", "'id'")
    assert len(errors) == 15
    with pytest.raises(DataValidationError) as err:
        report.raise_if_errors()
    assert err.value.errors == errors
    assert all(e in str(err.value) for e in errors)


def test_malformed_json_gives_line_and_column(images, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [],\n  "annotations": }')
    report = validate_coco(path, images)
    assert report.errors == [f"{path}: malformed JSON at line 2, column 18: Expecting value"]


def test_missing_top_level_keys_and_wrong_types(images, write_json):
    path = write_json({"images": {}, "categories": [{"id": 1, "name": "x"}]})
    errors = validate_coco(path, images).errors
    assert errors == [f"{path}: 'images' must be a list, got dict", f"{path}: missing top-level key 'annotations'"]
    path = write_json([1, 2])
    assert "top level must be an object" in validate_coco(path, images).errors[0]


def test_degenerate_boxes_are_dropped_with_a_warning_or_errors_when_strict(images, write_json):
    path = write_json(coco([image_record(1, "a.png", 20, 30)],
                           [annotation(1, 1, [1, 1, 0, 5]), annotation(2, 1, [1, 1, 5, -1]), annotation(3, 1, [1, 1, 5, 5])]))
    report = validate_coco(path, images)
    assert report.ok
    assert [a["id"] for a in report.annotations[1]] == [3]
    assert len(report.warnings) == 2
    assert _has(report.warnings, str(path), "annotation id 1", "image id 1", "width 0 <= 0; dropped")
    assert _has(report.warnings, str(path), "annotation id 2", "height -1 <= 0; dropped")
    strict = validate_coco(path, images, strict=True)
    assert len(strict.errors) == 2 and _has(strict.errors, str(path), "annotation id 1", "width 0 <= 0")


def test_boxes_outside_the_image_are_clipped_or_dropped(images, write_json):
    path = write_json(coco([image_record(1, "a.png", 20, 30)],  # height 20, width 30
                           [annotation(1, 1, [-2, 5, 10, 20]),  # x from -2, y to 25: clipped
                            annotation(2, 1, [30, 0, 5, 5]),  # starts at the right edge: wholly outside
                            annotation(3, 1, [-10, -10, 5, 5]),  # wholly outside, top left
                            annotation(4, 1, [25, 15, 5, 5])]))  # touches the corner from inside: kept as is
    report = validate_coco(path, images)
    assert report.ok
    assert [(a["id"], a["bbox"]) for a in report.annotations[1]] == [(1, [0.0, 5.0, 8.0, 20.0]),
                                                                   (4, [25.0, 15.0, 30.0, 20.0])]
    assert _has(report.warnings, str(path), "annotation id 1", "clipped")
    assert _has(report.warnings, str(path), "annotation id 2", "wholly outside", "dropped")
    assert _has(report.warnings, str(path), "annotation id 3", "wholly outside", "dropped")
    assert len(report.warnings) == 3


def test_image_checks_by_level(images, write_json):
    save_image(images / "cut.jpg", np.random.default_rng(0).integers(0, 256, size=(32, 32, 3)))
    cut = images / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:-300])
    path = write_json(coco([image_record(1, "cut.jpg", 32, 32), image_record(2, "a.png", 99, 99)], []))
    exists = validate_coco(path, images, check_images="exists")
    assert exists.ok  # sizes are not read at this level
    header = validate_coco(path, images, check_images="header")
    assert len(header.errors) == 1 and _has(header.errors, str(images / "a.png"), "image id 2", "height 99")
    decode = validate_coco(path, images, check_images="decode")
    assert len(decode.errors) == 2 and _has(decode.errors, str(cut), "image id 1", "cannot read image")
    with pytest.raises(ValueError, match="check_images"):
        validate_coco(path, images, check_images="full")


def test_exif_rotated_image_is_compared_with_its_displayed_size(images, write_json):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20)).save(images / "rot.png", exif=exif.tobytes())  # stored w 30, h 20; shown w 20, h 30
    good = write_json(coco([image_record(1, "rot.png", 30, 20)], [annotation(1, 1, [1, 1, 18, 28])]), "good.json")
    assert validate_coco(good, images).ok
    bad = write_json(coco([image_record(1, "rot.png", 20, 30)], []), "bad.json")
    errors = validate_coco(bad, images, check_images="decode").errors
    assert len(errors) == 1 and _has(errors, str(images / "rot.png"), "image id 1", "EXIF")


def test_missing_files_and_folders(tmp_path, images):
    report = validate_coco(tmp_path / "nope.json", tmp_path / "nowhere")
    assert report.errors == [f"{tmp_path / 'nowhere'}: image folder not found",
                             f"{tmp_path / 'nope.json'}: annotation file not found"]


def test_check_data_command_exit_codes(images, write_json, capsys):
    good = write_json(coco([image_record(1, "a.png", 20, 30)], [annotation(1, 1, [1, 1, 0, 5])]), "good.json")
    assert main(["check-data", "--json", str(good), "--images", str(images)]) == 0
    assert "warning:" in capsys.readouterr().out
    assert main(["check-data", "--json", str(good), "--images", str(images), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "annotation id 1" in out and "1 errors" in out


def test_python_m_retinanet_check_data(images, write_json):
    good = write_json(coco([image_record(1, "a.png", 20, 30)], [annotation(1, 1, [1, 1, 5, 5])]), "good.json")
    bad = write_json(coco([image_record(1, "a.png", 20, 30)], [annotation(1, 7, [1, 1, 5, 5])]), "bad.json")
    run = [sys.executable, "-m", "retinanet", "check-data", "--images", str(images), "--json"]
    ok = subprocess.run(run + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failed = subprocess.run(run + [str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{bad}: annotation id 1 (image id 7): unknown image id 7" in failed.stdout

