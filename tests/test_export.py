"""ONNX export: onnxruntime + our postprocess gives PyTorch's detections, at any image size."""

import numpy as np
import pytest
import torch

from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.export import OnnxDetector
from retinanet.modeling import build_model
from retinanet.predict import Predictor

from conftest import tiny_config
from detection_match import assert_same_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model exported by `retinanet export` (default exporter: dynamo)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(num_classes=3)
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread the scores of a random head, so that detections are many and distinct
        model.head.cls_subnet.predictor.weight.normal_(std=1.0)
        model.head.cls_subnet.predictor.bias.normal_(-4.0, 0.5)
    ckpt = tmp / "model.pt"
    save_atomic(make_checkpoint(model, cfg, CATEGORIES), str(ckpt))
    path = tmp / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(path), "--no-verify"]) == 0
    return model, path, ckpt


def _compare(a, b) -> tuple:
    """Same detections up to rounding (labels, boxes within 0.01 px, scores within 1e-4; near-equal scores
    in either order) -> (max box diff px, max score diff)."""
    assert len(a) > 0
    match = assert_same_detections(b, a, score_atol=1e-4, box_atol=1e-2)
    assert np.array_equal(np.sort(a.category_ids), np.sort(b.category_ids))
    return match.max_box_diff, match.max_score_diff


@pytest.mark.parametrize("size", [(100, 150), (171, 93)])
def test_onnx_equals_pytorch_at_two_image_sizes(exported, size, capsys):
    model, path, _ = exported
    image = np.random.default_rng(size[0]).integers(0, 256, (*size, 3), dtype=np.uint8)
    a = Predictor(model, CATEGORIES, device="cpu")(image)
    b = OnnxDetector(str(path))(image)
    box_diff, score_diff = _compare(a, b)
    with capsys.disabled():
        print(f"\nONNX vs PyTorch {size}: {len(a)} detections, max box diff {box_diff:.1e} px, "
              f"max score diff {score_diff:.1e}")


def test_onnx_batch_of_different_sizes(exported):
    model, path, _ = exported
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (130, 60, 3), dtype=np.uint8)]
    a = Predictor(model, CATEGORIES, device="cpu", batch_size=2)(images)
    b = OnnxDetector(str(path), batch_size=2)(images)
    for x, y in zip(a, b):
        _compare(x, y)


def test_metadata_carries_config_and_categories(exported):
    model, path, _ = exported
    detector = OnnxDetector(str(path), classes=["dog"])
    assert detector.categories == CATEGORIES and detector.model.min_size == model.min_size
    assert detector.labels == [1]


def test_torchscript_exporter_and_the_cli_check(exported, tmp_path, capsys):
    model, _, ckpt = exported
    path = tmp_path / "ts.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--exporter", "torchscript"]) == 0
    err = capsys.readouterr().err
    assert "max |anchors_p3 diff| 0.00e+00" in err
    assert "100 detections, labels identical" in err
    image = np.random.default_rng(2).integers(0, 256, (120, 110, 3), dtype=np.uint8)
    _compare(Predictor(model, CATEGORIES, device="cpu")(image), OnnxDetector(str(path))(image))


def test_export_exits_non_zero_when_the_check_fails(exported, tmp_path, monkeypatch, capsys):
    """`retinanet export` checks onnxruntime against PyTorch; detections that differ are a failed export
    (exit 1, one error line), not a report line that ends in exit 0."""
    from retinanet import export as export_module

    _, _, ckpt = exported
    real = export_module.OnnxDetector.predict_arrays

    def relabeled(self, arrays):
        out = real(self, arrays)
        for det in out:
            det.labels = (det.labels + 1) % 3
        return out

    monkeypatch.setattr(export_module.OnnxDetector, "predict_arrays", relabeled)
    path = tmp_path / "bad.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(path), "--exporter", "torchscript"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: onnxruntime's detections differ from "
                                                     "PyTorch's on a random image (")
    assert "expected detection(s) without a partner" in errors[0] and "not a faithful export" in errors[0]
