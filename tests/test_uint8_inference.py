"""Evaluation (`evaluate_model`, `retinanet eval --checkpoint`) and `Predictor` hand the model uint8 images,
which its preprocess converts on the device; on the CPU the detections and metrics are bitwise those of
the float32 images the loader used to make on the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retinanet import Predictor
from retinanet.data.coco import CocoDataset
from retinanet.data.loader import images_to_device
from retinanet.data.transforms import Compose, PendingImage, RandomHorizontalFlip, ResizeShortestSide
from retinanet.engine import DistEnv, evaluate_model
from retinanet.modeling import build_model

from conftest import tiny_config

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(["rectangle", "ellipse", "triangle", "cross"])]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from retinanet.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=1, num_val=5,
                               image_size=64, seed=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_config(num_classes=4)).eval()
    with torch.no_grad():  # spread the scores of a random head, so that detections pass the threshold
        m.head.cls_subnet.predictor.weight.normal_(std=1.0)
        m.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)
    return m


def _record_preprocess(monkeypatch, model) -> list:
    """The dtypes of the images handed to `model.preprocess` (an instance attribute wrapping the method)."""
    seen, original = [], model.preprocess

    def preprocess(images, *args, **kwargs):
        seen.extend(image.dtype for image in images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(model, "preprocess", preprocess)
    return seen


def _recorded_detections(monkeypatch) -> list:
    """The detections `evaluate_model` turns into COCO results, batch by batch."""
    import retinanet.evaluate

    seen, original = [], retinanet.evaluate.detections_to_coco_results

    def record(detections, image_ids, label_to_category_id):
        seen.extend(detections)
        return original(detections, image_ids, label_to_category_id)

    monkeypatch.setattr(retinanet.evaluate, "detections_to_coco_results", record)
    return seen


def _assert_equal_detections(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_evaluate_model_hands_the_model_uint8_and_matches_the_float_path(shapes, model, monkeypatch):
    from retinanet.evaluate import detections_to_coco_results, evaluate_coco

    dataset = CocoDataset(shapes.val_json, shapes.val_images)
    seen = _record_preprocess(monkeypatch, model)
    detections = _recorded_detections(monkeypatch)
    metrics = evaluate_model(model, dataset, CPU, batch_size=2)
    assert seen == [torch.uint8] * len(dataset)
    monkeypatch.undo()
    # the float path: (3, H, W) float32 images made on the host, in the same batches
    expected, results = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 2):
            items = [dataset[i] for i in range(start, min(start + 2, len(dataset)))]
            assert all(image.dtype == torch.float32 for image, _ in items)
            dets = model([image for image, _ in items])
            expected += dets
            results += detections_to_coco_results(dets, [t["image_id"] for _, t in items], dataset.label_to_category_id)
    assert sum(len(d["scores"]) for d in expected) > 0
    _assert_equal_detections(detections, expected)
    metrics.pop("ms_per_image")
    assert metrics == evaluate_coco(dataset.json_path, results)


def test_images_to_device_copies_uint8_and_realizes_pending_operations():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
    plain, flipped = PendingImage(raw), PendingImage(raw).then("flip")
    floats = torch.rand(3, 8, 8, generator=g)
    out = images_to_device([plain, flipped, floats], torch.device("cpu"))
    assert out[0].dtype == torch.uint8 and torch.equal(out[0], raw)
    assert torch.equal(out[1], flipped.realize())  # operations to apply: the float image, realized there
    assert out[2] is floats


def test_evaluate_model_with_a_transformed_dataset_is_the_float_path(shapes, model, monkeypatch):
    """A dataset with transforms (pixel operations pending) is realized on the device, as before."""
    dataset = CocoDataset(shapes.val_json, shapes.val_images,
                          transforms=Compose([ResizeShortestSide([48], 80), RandomHorizontalFlip(1.0)]))
    detections = _recorded_detections(monkeypatch)
    evaluate_model(model, dataset, CPU, batch_size=3)
    monkeypatch.undo()
    with torch.no_grad():
        expected = model([dataset[i][0] for i in range(3)]) + model([dataset[i][0] for i in range(3, 5)])
    _assert_equal_detections(detections, expected)


def test_eval_command_hands_the_model_uint8(shapes, model, tmp_path, monkeypatch):
    import json

    from retinanet.checkpoint import make_checkpoint, save_atomic
    from retinanet.cli import main
    from retinanet.modeling.detector import Detector

    save_atomic(make_checkpoint(model, tiny_config(num_classes=4), CATEGORIES), str(tmp_path / "m.pt"))
    seen, original = [], Detector.preprocess

    def preprocess(self, images, *args, **kwargs):
        seen.extend(image.dtype for image in images)
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Detector, "preprocess", preprocess)
    saved = tmp_path / "dt.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--json", str(shapes.val_json), "--images",
                 str(shapes.val_images), "--save-results", str(saved), "--batch-size", "2", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert seen == [torch.uint8] * 5
    monkeypatch.undo()
    # the same results as the float images of the dataset (boxes rounded to 3 decimals by the results)
    from retinanet.evaluate import detections_to_coco_results

    dataset = CocoDataset(shapes.val_json, shapes.val_images)
    expected = []
    with torch.no_grad():
        for start in (0, 2, 4):
            items = [dataset[i] for i in range(start, min(start + 2, 5))]
            expected += detections_to_coco_results(model([image for image, _ in items]),
                                                   [t["image_id"] for _, t in items], [c["id"] for c in CATEGORIES])
    assert json.loads(saved.read_text()) == json.loads(json.dumps(expected))


@pytest.mark.parametrize("tta", [False, [1.0, 1.5]])
def test_predictor_hands_the_model_uint8_and_matches_the_float_path(model, monkeypatch, tta):
    from retinanet.tta import tta_detections

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)]
    seen = _record_preprocess(monkeypatch, model)
    dets = Predictor(model, CATEGORIES, device="cpu", batch_size=2, tta=tta)(arrays)
    assert seen and set(seen) == {torch.uint8}
    monkeypatch.undo()
    floats = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    with torch.no_grad():
        expected = tta_detections(model, floats, scales=tuple(tta)) if tta else model(floats)
    assert sum(len(d) for d in dets) > 0
    for det, ref in zip(dets, expected):
        assert np.array_equal(det.boxes, ref["boxes"].numpy()) and np.array_equal(det.scores, ref["scores"].numpy())
        assert np.array_equal(det.labels, ref["labels"].numpy())
