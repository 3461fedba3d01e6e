"""One inference path: `model(images)`, `Predictor`, `retinanet predict` and `OnnxDetector` give the same
detections for every classifier the losses need (the softmax focal loss's K + 1 outputs included),
and class filtering is an argument of that path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Predictor
from retinanet.checkpoint import make_checkpoint, save_atomic
from retinanet.cli import main
from retinanet.config import LossConfig
from retinanet.export import OnnxDetector, export_onnx
from retinanet.modeling import build_model

from conftest import tiny_config
from detection_match import assert_same_detections

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]


def _config(cls: str):
    cfg = tiny_config(num_classes=3)
    cfg.loss.cls = cls
    m = cfg.model
    m.topk_candidates, m.detections_per_image = 100000, 100000  # no cap, so filtering == selecting afterwards
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # spread the scores of a random head so that every class has detections
        model.head.cls_subnet.predictor.weight.normal_(std=1.0)
        model.head.cls_subnet.predictor.bias.normal_(-4.0 if cfg.loss.cls != "softmax_focal" else 0.0, 0.5)
    return model


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (70, 60, 3), dtype=np.uint8)]


def _reference(model, arrays):
    with torch.no_grad():
        return model([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])


@pytest.mark.parametrize("cls", LossConfig.CLS_LOSSES)
def test_every_loss_option_predicts_through_one_path(cls, tmp_path):
    cfg = _config(cls)
    model = _model(cfg)
    arrays = _images()
    ref = _reference(model, arrays)
    assert all(len(r["scores"]) > 0 for r in ref)
    assert (model.head.num_logits == 4) == (cls == "softmax_focal")

    dets = Predictor(model, CATEGORIES, device="cpu", batch_size=2)(arrays)
    for det, r in zip(dets, ref):
        assert np.array_equal(det.labels, r["labels"].numpy())
        assert np.allclose(det.boxes, r["boxes"].numpy(), atol=1e-4) and np.allclose(det.scores, r["scores"].numpy())
        assert det.category_ids.tolist() == [CATEGORIES[i]["id"] for i in r["labels"].tolist()]

    # --classes: the same detections as selecting that class afterwards (no top-k or cap binds here)
    dogs = Predictor(model, CATEGORIES, device="cpu", classes=["dog"])(arrays[0])
    alone = _reference(model, arrays[:1])[0]  # (a batch of one is padded less than the pair above)
    chosen = alone["labels"] == 1
    assert len(dogs) == int(chosen.sum()) > 0 and set(dogs.category_ids.tolist()) == {5}
    assert np.allclose(dogs.scores, alone["scores"][chosen].numpy())

    # the CLI reads the checkpoint and gives the predictor's detections
    ckpt = tmp_path / "model.pt"
    save_atomic(make_checkpoint(model, cfg, CATEGORIES), str(ckpt))
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    out = tmp_path / "dogs.json"
    assert main(["predict", "--checkpoint", str(ckpt), "--device", "cpu", "--classes", "dog", "--output", str(out),
                 str(tmp_path / "a.png")]) == 0
    results = json.loads(out.read_text())
    assert len(results) == len(dogs) and {r["category_id"] for r in results} == {5}
    assert np.allclose([r["score"] for r in results], dogs.scores, atol=1e-6)

    # ONNX: the graph is the network, the post-processing the model's own
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, cfg, CATEGORIES, str(onnx_path), exporter="torchscript")
    for det, r in zip(OnnxDetector(str(onnx_path), batch_size=2)(arrays), ref):  # another computation: rounding
        assert_same_detections(det, r, score_atol=1e-5, box_atol=1e-3)


def test_keep_classes_has_the_model_class_count():
    model = _model(_config("softmax_focal"))
    arrays = _images()
    batch = model.preprocess([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    with torch.no_grad():
        outputs = model.network(batch.tensor)
    with pytest.raises(ValueError, match=r"keep_classes must have shape \(3,\)"):
        model.postprocess(outputs, batch, keep_classes=torch.ones(4, dtype=torch.bool))


def test_uint8_and_float_images_preprocess_alike():
    model = _model(_config("focal"))
    array = _images()[0]
    as_uint8 = model.preprocess([torch.from_numpy(array).permute(2, 0, 1)])
    as_float = model.preprocess([torch.from_numpy(array).permute(2, 0, 1).float() / 255])
    assert torch.equal(as_uint8.tensor, as_float.tensor)
    assert as_uint8.image_sizes == as_float.image_sizes and as_uint8.original_sizes == [(96, 128)]
