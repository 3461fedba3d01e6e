"""Predictor (paths, PIL images, arrays) and `retinanet predict` (folders, corrupt files, drawn copies)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Predictor
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.modeling import build_model
from retinanet.modeling.detector import ImageBatch

from conftest import tiny_config
from detection_match import assert_same_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_config(num_classes=3)).eval()
    with torch.no_grad():  # spread the scores of a random head: ~1000 of 13824 above 0.05 on a 96 x 128 image
        m.head.cls_subnet.predictor.weight.normal_(std=1.0)
        m.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_atomic(make_checkpoint(model, tiny_config(num_classes=3), CATEGORIES), str(path))
    return path


def _image(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _same(a, b) -> bool:
    return (np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.labels, b.labels) and a.names == b.names)


def test_predictor_equals_the_model_itself(model):
    image = _image(0)
    det = Predictor(model, CATEGORIES, device="cpu")(image)
    with torch.no_grad():
        ref = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    assert len(det) == len(ref["scores"]) > 0
    assert np.array_equal(det.boxes, ref["boxes"].numpy()) and np.array_equal(det.scores, ref["scores"].numpy())
    assert det.names == [CATEGORIES[i]["name"] for i in ref["labels"].tolist()]
    assert det.category_ids.tolist() == [CATEGORIES[i]["id"] for i in ref["labels"].tolist()]
    assert det.image_size == (96, 128)


def test_path_pil_and_array_give_the_same_detections(model, tmp_path):
    image = _image(1)
    path = tmp_path / "a.png"  # lossless, so the file holds exactly `image`
    Image.fromarray(image).save(path)
    predictor = Predictor(model, CATEGORIES, device="cpu")
    from_array, from_path = predictor(image), predictor(path)
    with Image.open(path) as pil:
        from_pil = predictor(pil)
    assert len(from_array) > 0 and _same(from_array, from_path) and _same(from_array, from_pil)
    assert from_path.source == str(path)


def test_exif_orientation_is_applied_for_paths_and_pil_images(model, tmp_path):
    """Orientation 6 (rotate 90 clockwise to display): a 96 x 128 stored image is shown 128 x 96."""
    stored = _image(2)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif)
    predictor = Predictor(model, CATEGORIES, device="cpu")
    from_path = predictor(path)
    with Image.open(path) as pil:
        from_pil = predictor(pil)
    displayed = np.ascontiguousarray(np.rot90(stored, k=-1))  # clockwise
    assert from_path.image_size == (128, 96)
    assert _same(from_path, from_pil) and _same(from_path, predictor(displayed))


def test_batched_equals_one_by_one(model):
    images = [_image(s) for s in (3, 4, 5)]  # same size, so the same padding
    batched = Predictor(model, CATEGORIES, device="cpu", batch_size=3)(images)
    single = Predictor(model, CATEGORIES, device="cpu", batch_size=1)(images)
    for a, b in zip(batched, single):  # the batch size may change the kernels, so the rounding
        assert len(a) > 0
        assert_same_detections(a, b, score_atol=1e-6, box_atol=1e-3)


def test_class_filter_by_name_or_id(model):
    image = _image(6)
    everything = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.08)(image)
    assert 0 < len(everything) < 100  # below the cap, so filtering cannot admit new detections
    dogs = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.08, classes=["Dog"])(image)
    by_id = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.08, classes=[5])(image)
    keep = everything.labels == 1
    assert keep.any() and not keep.all()
    assert set(dogs.names) == {"dog"} and _same(dogs, by_id)
    assert np.array_equal(dogs.boxes, everything.boxes[keep]) and np.array_equal(dogs.scores, everything.scores[keep])
    with pytest.raises(ValueError, match="unknown class 'dgo' \\(did you mean 'dog'\\?\\)"):
        Predictor(model, CATEGORIES, device="cpu", classes=["dgo"])


def test_placeholder_classes_are_left_out_unless_asked_for(model):
    cats = [{"id": 0, "name": "__background__", "placeholder": True}] + CATEGORIES[1:]
    image = _image(7)
    default = Predictor(model, cats, device="cpu")(image)
    asked = Predictor(model, cats, device="cpu", classes=[0, 5, 9])(image)
    assert 0 not in default.labels.tolist() and 0 in asked.labels.tolist()


def test_settings_override_the_checkpoint(model):
    image = _image(8)
    det = Predictor(model, CATEGORIES, device="cpu", score_threshold=0.07, max_detections=5)(image)
    assert len(det) == 5 and det.scores.min() > 0.07 and np.all(np.diff(det.scores) <= 0)


def test_bad_array_is_a_clear_error(model):
    predictor = Predictor(model, CATEGORIES, device="cpu")
    with pytest.raises(ValueError, match=r"image 1: expected an \(H, W, 3\) uint8 RGB array"):
        predictor([_image(0), np.zeros((8, 8), dtype=np.uint8)])


def _digest(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_folder_with_a_corrupt_file(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(_image(10)).save(images / "a.png")
    Image.fromarray(_image(11, 80, 100)).save(images / "sub" / "b.jpg", quality=95)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    (images / "notes.txt").write_text("not an image")
    before = _digest(images)
    out, drawn = tmp_path / "results.json", tmp_path / "drawn"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--output", str(out), "--save-images", str(drawn),
               "--draw-threshold", "0.0", "--batch-size", "2", str(images)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.jpg" in err and "images/s" in err
    results = json.loads(out.read_text())
    assert {r["file_name"] for r in results} == {"a.png", "sub/b.jpg"}
    assert set(results[0]) == {"image_id", "file_name", "category_id", "bbox", "score"}
    assert {r["category_id"] for r in results} <= {1, 5, 9}
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert ids["a.png"] != ids["sub/b.jpg"]
    assert _digest(images) == before  # inputs untouched, nothing added next to them
    assert sorted(p.relative_to(drawn).as_posix() for p in drawn.rglob("*") if p.is_file()) == ["a.png", "sub/b.jpg"]
    with Image.open(drawn / "a.png") as copy:
        drawn_pixels = np.asarray(copy.convert("RGB"))
    assert drawn_pixels.shape == (96, 128, 3) and not np.array_equal(drawn_pixels, _image(10))


def test_cli_results_match_the_predictor_and_filter_classes(checkpoint, model, tmp_path, capsys):
    Image.fromarray(_image(12)).save(tmp_path / "c.png")
    out = tmp_path / "dogs.json"
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--classes", "dog", "--output", str(out),
                 str(tmp_path / "c.png")]) == 0
    results = json.loads(out.read_text())
    det = Predictor(model, CATEGORIES, device="cpu", classes=["dog"])(_image(12))
    assert len(results) == len(det) > 0 and {r["category_id"] for r in results} == {5}
    x, y, w, h = results[0]["bbox"]
    assert np.allclose([x, y, x + w, y + h], det.boxes[0], atol=2e-3)
    assert abs(results[0]["score"] - det.scores[0]) < 1e-5


def test_cli_refuses_to_draw_into_the_input_folder(checkpoint, tmp_path, capsys):
    Image.fromarray(_image(13)).save(tmp_path / "d.png")
    before = _digest(tmp_path)
    rc = main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--save-images", str(tmp_path / "drawn"), str(tmp_path)])
    assert rc == 1 and "inside one" in capsys.readouterr().err
    assert _digest(tmp_path) == before


def test_bf16_runs_the_network_in_bfloat16_and_keeps_the_best_detection(model):
    from retinanet.ops.boxes import box_iou

    fp32 = Predictor(model, CATEGORIES, device="cpu")
    bf16 = Predictor(model, CATEGORIES, device="cpu", bf16=True)
    batch = ImageBatch(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64)])
    assert bf16.network(batch)[0].dtype == torch.bfloat16 and fp32.network(batch)[0].dtype == torch.float32
    for seed in range(3):
        a, b = fp32(_image(seed)), bf16(_image(seed))
        assert b.boxes.dtype == np.float32 and a.labels[0] == b.labels[0]
        assert box_iou(torch.from_numpy(a.boxes[:1]), torch.from_numpy(b.boxes[:1])).item() > 0.99
        assert abs(a.scores[0] - b.scores[0]) < 5e-3


def test_cli_takes_image_ids_from_a_coco_file_so_eval_can_score_it(checkpoint, tmp_path, capsys):
    images = tmp_path / "val"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(_image(14)).save(images / "x.png")
    Image.fromarray(_image(15)).save(images / "sub" / "y.png")
    gt = {"images": [{"id": 42, "file_name": "x.png", "height": 96, "width": 128},
                     {"id": 7, "file_name": "y.png", "height": 96, "width": 128}],  # matched by the file's name
          "annotations": [{"id": 1, "image_id": 42, "category_id": 5, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0}],
          "categories": CATEGORIES}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "results.json"
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--coco-json", str(gt_path), "--output", str(out),
                 str(images)]) == 0
    results = json.loads(out.read_text())
    assert {(r["file_name"], r["image_id"]) for r in results} == {("x.png", 42), ("sub/y.png", 7)}
    assert main(["eval", "--gt", str(gt_path), "--results", str(out)]) == 0
    gt["images"] = gt["images"][:1]
    gt_path.write_text(json.dumps(gt))
    assert main(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--coco-json", str(gt_path), str(images)]) == 1
    assert "no single image with the file name of 1 input(s): sub/y.png" in capsys.readouterr().err
