"""Datasets in other formats -> COCO (retinanet/data/formats/): small hand-written files whose COCO boxes,
areas and ids are worked out by hand; COCO -> YOLO -> COCO and COCO -> VOC -> COCO round trips; images
without objects; every bad input an error naming its file (and line); `retinanet convert-data` end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from retinanet.cli import main
from retinanet.data.formats import read_cvat, read_labelme, read_names, read_voc, read_yolo, write_coco, write_voc, \
    write_yolo
from retinanet.data.validate import DataValidationError, validate_coco


def image(path: Path, width: int, height: int, orientation: int = 1) -> Path:
    """A black image file of width x height as stored, with an EXIF orientation when not 1 (JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height)).save(path, exif=exif)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def valid(coco: dict, tmp_path: Path, image_root: Path):
    """The COCO dict written, then read through `validate_coco` with headers checked: no error, no warning."""
    out = tmp_path / "check.json"
    write_coco(coco, out, overwrite=True)
    masks = bool(coco["annotations"]) and all("segmentation" in a for a in coco["annotations"])
    report = validate_coco(out, image_root, check_images="header", masks=masks)
    assert report.errors == [] and report.warnings == []
    return report


def boxes(coco: dict) -> list:
    """(file_name, category_id, bbox, area, iscrowd) of every annotation, in annotation order."""
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    return [(names[a["image_id"]], a["category_id"], a["bbox"], a.get("area"), a["iscrowd"])
            for a in coco["annotations"]]


@pytest.fixture
def yolo_dataset(tmp_path) -> Path:
    """ultralytics' layout: images/train + labels/train, names as a dict in data.yaml. a.png (100 x 50) has two
    boxes, b.png an empty label file, c.png no label file."""
    root = tmp_path / "ds"
    image(root / "images/train/a.png", 100, 50)
    image(root / "images/train/b.png", 80, 40)
    image(root / "images/train/c.png", 60, 30)
    write(root / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.5 0.5\n")
    write(root / "labels/train/b.txt", "")
    write(root / "data.yaml", "path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n")
    return root


def test_yolo_boxes_are_pixels_of_each_images_size_and_negatives_are_kept(yolo_dataset, tmp_path):
    coco = read_yolo(yolo_dataset)
    # a.png, 100 x 50: (0.5, 0.5, 0.2, 0.4) -> centre (50, 25), size 20 x 20 -> [40, 15, 20, 20];
    # (0.25, 0.75, 0.5, 0.5) -> centre (25, 37.5), size 50 x 25 -> [0, 25, 50, 25]
    assert boxes(coco) == [("images/train/a.png", 1, [40.0, 15.0, 20.0, 20.0], 400.0, 0),
                           ("images/train/a.png", 2, [0.0, 25.0, 50.0, 25.0], 1250.0, 0)]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (1, "images/train/a.png", 100, 50), (2, "images/train/b.png", 80, 40), (3, "images/train/c.png", 60, 30)]
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]  # YOLO class k -> id k + 1
    assert coco["info"]["names"] == str(yolo_dataset / "data.yaml")
    report = valid(coco, tmp_path, yolo_dataset)
    assert [len(report.annotations[i]) for i in (1, 2, 3)] == [2, 0, 0]


def test_yolo_darknet_layout_classes_txt_and_a_segment_line(tmp_path):
    """Labels beside the images, names from classes.txt; a polygon line keeps its polygon and encloses it."""
    image(tmp_path / "d/x.jpg", 100, 50)
    write(tmp_path / "d/classes.txt", "person\n\ncar\n")
    write(tmp_path / "d/x.txt", "1 0.1 0.2 0.5 0.2 0.5 0.6\n")
    coco = read_yolo(tmp_path / "d")
    (ann,) = coco["annotations"]
    # (0.1, 0.2) (0.5, 0.2) (0.5, 0.6) on 100 x 50 -> (10, 10) (50, 10) (50, 30)
    assert ann["segmentation"] == [[10.0, 10.0, 50.0, 10.0, 50.0, 30.0]]
    assert ann["bbox"] == [10.0, 10.0, 40.0, 20.0] and ann["category_id"] == 2
    assert 380 <= ann["area"] <= 420  # the rasterized triangle; 400 in continuous coordinates
    assert coco["info"]["layout"] == "labels beside the images"
    valid(coco, tmp_path, tmp_path / "d")


def test_yolo_uses_the_displayed_size_exif_orientation_applied(tmp_path):
    """A JPEG stored 100 x 50 with EXIF orientation 6 (rotate 90) is shown 50 wide, 100 high: the
    normalized coordinates multiply the displayed size, as ultralytics' loader and this package's do."""
    image(tmp_path / "e/r.jpg", 100, 50, orientation=6)
    write(tmp_path / "e/r.txt", "0 0.5 0.25 1 0.5\n")
    coco = read_yolo(tmp_path / "e", names=["thing"])
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (50, 100)
    assert coco["annotations"][0]["bbox"] == [0.0, 0.0, 50.0, 50.0]
    valid(coco, tmp_path, tmp_path / "e")


@pytest.mark.parametrize("line, message", [
    ("0 0.5 1.2 0.2 0.2", "a.txt:2: coordinates must be normalized to [0, 1] (divided by the image width and "
                          "height), got 1.2"),
    ("0 -0.1 0.5 0.2 0.2", "a.txt:2: coordinates must be normalized to [0, 1]"),
    ("2 0.5 0.5 0.2 0.2", "a.txt:2: unknown class id 2 (the names have ids 0..1)"),
    ("0.5 0.5 0.5 0.2 0.2", "a.txt:2: unknown class id 0.5"),
    ("0 0.5 0.5 0.2", "a.txt:2: expected 'class cx cy w h' (5 values) or a polygon"),
    ("0 0.5 0.5 0.2 zero", "a.txt:2: not a list of numbers"),
])
def test_a_bad_yolo_line_is_an_error_naming_the_file_and_line(yolo_dataset, line, message):
    write(yolo_dataset / "labels/train/a.txt", f"0 0.5 0.5 0.2 0.4\n{line}\n")
    with pytest.raises(DataValidationError) as e:
        read_yolo(yolo_dataset)
    assert len(e.value.errors) == 1 and e.value.errors[0].startswith(str(yolo_dataset / "labels/train/a.txt:2: "))
    assert message in e.value.errors[0]


def test_a_label_without_its_image_and_missing_names_are_errors(yolo_dataset):
    write(yolo_dataset / "labels/train/gone.txt", "0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataValidationError) as e:
        read_yolo(yolo_dataset)
    assert e.value.errors == [f"{yolo_dataset / 'labels/train/gone.txt'}: label file without an image (no gone"
                              f"{{.jpg,.jpeg,.png,.bmp,.tif,.tiff,.webp}} where the images are)"]
    (yolo_dataset / "labels/train/gone.txt").unlink()
    (yolo_dataset / "data.yaml").unlink()
    with pytest.raises(ValueError, match="no class names: found no data.yaml, dataset.yaml, classes.txt, obj.names"):
        read_yolo(yolo_dataset / "images")


def test_read_names_list_dict_and_text(tmp_path):
    assert read_names(write(tmp_path / "a.yaml", "names: [x, y]\nnc: 2\n")) == ["x", "y"]
    assert read_names(write(tmp_path / "b.yaml", "names: {1: y, 0: x}\n")) == ["x", "y"]
    assert read_names(write(tmp_path / "c.txt", "x\ny\n")) == ["x", "y"]
    with pytest.raises(ValueError, match="must number the classes 0..1, got ids"):
        read_names(write(tmp_path / "d.yaml", "names: {0: x, 2: y}\n"))
    with pytest.raises(ValueError, match="nc is 3 but 'names' has 2 entries"):
        read_names(write(tmp_path / "e.yaml", "names: [x, y]\nnc: 3\n"))


VOC = """<annotation>
  <filename>{filename}</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""


def voc_object(name: str, xmin, ymin, xmax, ymax, difficult: int = 0) -> str:
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


@pytest.fixture
def voc_dataset(tmp_path) -> Path:
    """VOCdevkit's layout: Annotations/*.xml beside JPEGImages/. a.png 100 x 50 with a box over the whole
    image and a difficult one; b.png without objects."""
    root = tmp_path / "VOC"
    image(root / "JPEGImages/a.png", 100, 50)
    image(root / "JPEGImages/b.png", 80, 40)
    write(root / "Annotations/a.xml", VOC.format(filename="a.png", width=100, height=50, objects=voc_object(
        "dog", 1, 1, 100, 50) + voc_object("cat", 11, 21, 30, 40, difficult=1)))
    write(root / "Annotations/b.xml", VOC.format(filename="b.png", width=80, height=40, objects=""))
    return root


def test_voc_one_based_inclusive_corners_and_difficult(voc_dataset, tmp_path):
    coco = read_voc(voc_dataset / "Annotations")
    # (1, 1)-(100, 50), pixels 1..100 x 1..50 included: the whole image, [0, 0, 100, 50];
    # (11, 21)-(30, 40): 20 x 20 pixels from pixel 11 -> [10, 20, 20, 20], a crowd region (difficult)
    assert boxes(coco) == [("a.png", 2, [0.0, 0.0, 100.0, 50.0], 5000.0, 0), ("a.png", 1, [10.0, 20.0, 20.0, 20.0],
                                                                               400.0, 1)]
    assert coco["annotations"][1]["difficult"] == 1 and "difficult" not in coco["annotations"][0]
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]  # sorted names
    assert [i["file_name"] for i in coco["images"]] == ["a.png", "b.png"]
    valid(coco, tmp_path, voc_dataset / "JPEGImages")

    kept = read_voc(voc_dataset / "Annotations", difficult="keep", names=["dog", "cat"])
    assert boxes(kept)[1] == ("a.png", 2, [10.0, 20.0, 20.0, 20.0], 400.0, 0)
    assert kept["annotations"][1]["difficult"] == 1
    zero = read_voc(voc_dataset / "Annotations", one_based=False)
    assert [a["bbox"] for a in zero["annotations"]] == [[1.0, 1.0, 99.0, 49.0], [11.0, 21.0, 19.0, 19.0]]


def test_voc_split_file_picks_the_images(voc_dataset):
    """VOCdevkit's ImageSets/Main lists: ids one a line, or with a second column in the per-class lists."""
    split = write(voc_dataset / "ImageSets/Main/dog_val.txt", "b -1\n\n")
    coco = read_voc(voc_dataset / "Annotations", split=split, names=["cat", "dog"])
    assert [i["file_name"] for i in coco["images"]] == ["b.png"] and coco["annotations"] == []
    write(split, "a\nzz\n")
    with pytest.raises(ValueError, match="dog_val.txt: image id zz has no XML file"):
        read_voc(voc_dataset / "Annotations", split=split)


def test_voc_problems_name_their_file(voc_dataset):
    annotations = voc_dataset / "Annotations"
    write(annotations / "c.xml", "<annotation><filename>c.png</filename><object>")
    write(annotations / "d.xml", VOC.format(filename="d.png", width=10, height=10, objects=""))
    write(annotations / "e.xml", VOC.format(filename="b.png", width=40, height=80, objects=""))
    write(annotations / "f.xml", VOC.format(filename="a.png", width=100, height=50,
                                            objects=voc_object("cat", 1, "one", 5, 5)))
    with pytest.raises(DataValidationError) as e:
        read_voc(annotations)
    assert e.value.errors[0].startswith(f"{annotations / 'c.xml'}: malformed XML at line 1")
    assert e.value.errors[1:] == [
        f"{annotations / 'd.xml'}: image d.png not found in {voc_dataset / 'JPEGImages'}",
        f"{annotations / 'e.xml'}: says the image is height 80, width 40, but {voc_dataset / 'JPEGImages/b.png'} is "
        f"displayed as height 40, width 80 (EXIF orientation applied); its boxes would not match the image",
        f"{annotations / 'f.xml'}: object 0: ymin must be a number, got 'one'"]
    for name in "cdef":
        (annotations / f"{name}.xml").unlink()
    with pytest.raises(DataValidationError, match="unknown class 'dog'"):
        read_voc(annotations, names=["cat"], images=voc_dataset / "JPEGImages")


def labelme(path: Path, image_path: str, width: int, height: int, shapes: list) -> Path:
    return write(path, json.dumps({"version": "5.4.1", "imagePath": image_path, "imageWidth": width,
                                   "imageHeight": height, "imageData": None, "shapes": shapes}))


def shape(label: str, points: list, kind: str, group=None) -> dict:
    return {"label": label, "points": points, "shape_type": kind, "group_id": group, "flags": {}}


def test_labelme_rectangles_polygons_groups_and_negatives(tmp_path, caplog):
    folder = tmp_path / "lm"
    image(folder / "img/a.png", 100, 50)
    image(folder / "img/b.png", 100, 50)
    labelme(folder / "a.json", "img/a.png", 100, 50, [
        shape("car", [[30, 40], [10, 20]], "rectangle"),  # corners in any order
        shape("person", [[10, 10], [50, 10], [50, 30]], "polygon"),
        shape("person", [[60, 5], [70, 5], [70, 15]], "polygon", group=1),  # one person in two parts
        shape("person", [[80, 20], [90, 20], [90, 45]], "polygon", group=1),
        shape("car", [[5, 5]], "point"),
    ])
    labelme(folder / "b.json", "img\\b.png", 100, 50, [])  # saved on Windows; no objects
    with caplog.at_level(logging.WARNING):
        coco = read_labelme(folder)
    assert "left out 1 LabelMe shape(s) of type 'point'" in caplog.text
    assert [(a["category_id"], a["bbox"], a.get("segmentation")) for a in coco["annotations"]] == [
        (1, [10.0, 20.0, 20.0, 20.0], None),
        (2, [10.0, 10.0, 40.0, 20.0], [[10.0, 10.0, 50.0, 10.0, 50.0, 30.0]]),
        (2, [60.0, 5.0, 30.0, 40.0], [[60.0, 5.0, 70.0, 5.0, 70.0, 15.0], [80.0, 20.0, 90.0, 20.0, 90.0, 45.0]])]
    assert coco["annotations"][0]["area"] == 400.0
    assert [i["file_name"] for i in coco["images"]] == ["img/a.png", "img/b.png"]
    assert coco["categories"] == [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    valid(coco, tmp_path, folder)


def test_labelme_missing_image_is_an_error_naming_it(tmp_path):
    labelme(tmp_path / "lm/a.json", "a.png", 100, 50, [])
    with pytest.raises(DataValidationError) as e:
        read_labelme(tmp_path / "lm")
    assert e.value.errors == [f"{tmp_path / 'lm/a.json'}: image a.png not found (imagePath is relative to the JSON)"]


CVAT = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><labels>
    <label><name>dog</name></label><label><name>cat</name></label>
  </labels></task></meta>
  <image id="0" name="a.png" width="100" height="50">
    <box label="cat" occluded="0" source="manual" xtl="10.5" ytl="20.00" xbr="30.5" ybr="40.00" z_order="0"/>
    <polygon label="dog" occluded="0" source="manual" points="10.00,10.00;50.00,10.00;50.00,30.00" z_order="0"/>
    <polyline label="dog" points="1,1;2,2"/>
  </image>
  <image id="1" name="b.png" width="80" height="40"></image>
</annotations>"""


def test_cvat_boxes_polygons_and_label_order(tmp_path, caplog):
    image(tmp_path / "cvat/images/a.png", 100, 50)
    image(tmp_path / "cvat/images/b.png", 80, 40)
    xml = write(tmp_path / "cvat/annotations.xml", CVAT)
    with caplog.at_level(logging.WARNING):
        coco = read_cvat(xml)
    assert "left out 1 CVAT <polyline> element(s)" in caplog.text
    assert coco["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]  # <meta>'s order
    assert [(a["category_id"], a["bbox"], a.get("segmentation")) for a in coco["annotations"]] == [
        (2, [10.5, 20.0, 20.0, 20.0], None), (1, [10.0, 10.0, 40.0, 20.0], [[10.0, 10.0, 50.0, 10.0, 50.0, 30.0]])]
    assert [i["file_name"] for i in coco["images"]] == ["a.png", "b.png"]
    valid(coco, tmp_path, tmp_path / "cvat/images")

    write(xml, CVAT.replace('z_order="0"/>', 'rotation="30" z_order="0"/>', 1))
    with pytest.raises(DataValidationError, match=r"image 'a.png', box 0: rotated by 30 degrees"):
        read_cvat(xml)
    write(xml, CVAT[:300])
    with pytest.raises(DataValidationError, match=f"{xml}: malformed XML at line"):
        read_cvat(xml)


@pytest.fixture
def coco_dataset(tmp_path) -> tuple:
    """A COCO dataset written by hand: three sizes, fractional corners, category ids in another order than
    the names' alphabet, a crowd region, and an image without objects. Returns (json, image folder)."""
    folder = tmp_path / "coco"
    for name, (w, h) in {"p/a.png": (100, 50), "p/b.png": (640, 480), "c.png": (33, 77)}.items():
        image(folder / name, w, h)
    coco = {"images": [{"id": 7, "file_name": "p/a.png", "width": 100, "height": 50},
                       {"id": 8, "file_name": "p/b.png", "width": 640, "height": 480},
                       {"id": 9, "file_name": "c.png", "width": 33, "height": 77}],
            "categories": [{"id": 1, "name": "zebra"}, {"id": 2, "name": "ant"}, {"id": 3, "name": "moth"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10.25, 3.3, 20.5, 40.1], "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 100, 50], "iscrowd": 0},
                {"id": 3, "image_id": 8, "category_id": 2, "bbox": [123.456789, 0.1, 1.5, 479.9], "iscrowd": 0},
                {"id": 4, "image_id": 8, "category_id": 2, "bbox": [600, 400, 40, 80], "iscrowd": 1}]}
    path = write(tmp_path / "instances.json", json.dumps(coco))
    return path, folder


def same_dataset(converted: dict, json_path: Path, crowd: bool) -> None:
    """The converted dict describes the original's images (file, size), categories and boxes (in each image's
    order), to 1e-6 px. Image ids are new: 1..N in the order of the sorted file names."""
    original = json.loads(json_path.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in converted["images"]] == sorted(
        (i["file_name"], i["width"], i["height"]) for i in original["images"])
    assert converted["categories"] == original["categories"]
    kept = [a for a in original["annotations"] if crowd or not a["iscrowd"]]
    want = sorted(boxes({**original, "annotations": kept}), key=lambda b: b[0])  # stable: each image's order kept
    got = boxes(converted)
    assert [(f, c, k) for f, c, _, _, k in got] == [(f, c, k) for f, c, _, _, k in want]
    assert max(abs(g - w) for (_, _, gb, _, _), (_, _, wb, _, _) in zip(got, want) for g, w in zip(gb, wb)) < 1e-6


def test_coco_to_yolo_to_coco(coco_dataset, tmp_path):
    json_path, folder = coco_dataset
    written = write_yolo(json_path, folder, tmp_path / "yolo")
    assert (written["images"], written["boxes"], written["crowd_left_out"]) == (3, 3, 1)  # YOLO has no crowd
    assert (tmp_path / "yolo/c.txt").read_text() == ""  # the negative: an empty label file
    assert read_names(tmp_path / "yolo/data.yaml") == ["zebra", "ant", "moth"]
    back = read_yolo(folder, labels=tmp_path / "yolo")
    same_dataset(back, json_path, crowd=False)
    with pytest.raises(ValueError, match="exists .and 3 more.; give an empty or new output folder"):
        write_yolo(json_path, folder, tmp_path / "yolo")


def test_coco_to_voc_to_coco(coco_dataset, tmp_path):
    json_path, folder = coco_dataset
    written = write_voc(json_path, folder, tmp_path / "voc")
    assert (written["images"], written["boxes"]) == (3, 4)
    xml = (tmp_path / "voc/p/a.xml").read_text()  # [0, 0, 100, 50] -> 1-based inclusive (1, 1)-(100, 50)
    assert "<xmin>1</xmin>" in xml and "<ymin>1</ymin>" in xml and "<xmax>100</xmax>" in xml
    back = read_voc(tmp_path / "voc", images=folder, names=read_names(tmp_path / "voc/classes.txt"))
    same_dataset(back, json_path, crowd=True)  # the crowd region went out difficult and came back crowd


def test_convert_data_cli_end_to_end(yolo_dataset, tmp_path, capsys):
    out = tmp_path / "out/instances.json"
    assert main(["convert-data", "--from", "yolo", str(yolo_dataset), "--output", str(out)]) == 0
    assert boxes(json.loads(out.read_text()))[0] == ("images/train/a.png", 1, [40.0, 15.0, 20.0, 20.0], 400.0, 0)
    assert "3 images (2 without objects), 2 annotations" in capsys.readouterr().err
    assert main(["check-data", "--json", str(out), "--images", str(yolo_dataset), "--workers", "1"]) == 0

    before = out.read_bytes()
    write(yolo_dataset / "labels/train/b.txt", "0 0.5 0.5 0.2 0.4\n")
    assert main(["convert-data", "--from", "yolo", str(yolo_dataset), "--output", str(out)]) == 1
    assert "exists; give another file, or --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before  # a user's file is never replaced without --overwrite
    assert main(["convert-data", "--from", "yolo", str(yolo_dataset), "--output", str(out), "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["annotations"]) == 3
    capsys.readouterr()

    write(yolo_dataset / "labels/train/c.txt", "0 0.5 0.5 1.5 0.4\n")
    assert main(["convert-data", "--from", "yolo", str(yolo_dataset), "--output", str(tmp_path / "new.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {yolo_dataset / 'labels/train/c.txt'}:1: coordinates must be normalized to [0, 1] "
                   f"(divided by the image width and height), got 1.5"]
    assert not (tmp_path / "new.json").exists()

    assert main(["convert-data", "--to", "voc", str(out), "--images", str(yolo_dataset), "--output",
                 str(tmp_path / "voc")]) == 0
    assert main(["convert-data", "--from", "voc", str(tmp_path / "voc"), "--images", str(yolo_dataset), "--names",
                 str(tmp_path / "voc/classes.txt"), "--output", str(tmp_path / "voc.json")]) == 0
    assert boxes(json.loads((tmp_path / "voc.json").read_text())) == boxes(json.loads(out.read_text()))
