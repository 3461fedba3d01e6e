"""The FPN Faster R-CNN as a whole (its parts: test_rpn.py, test_roi_heads.py, test_roi_align.py, ...):
config checks, batched == per-image, an image with no boxes, learning a fixed batch, and the shared
commands (train, predict, eval, export) with model.arch=faster_rcnn and no special cases."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from retinanet import Predictor
from retinanet.checkpoint import load_model
from retinanet.cli import main
from retinanet.config import ConfigError, load_config
from retinanet.modeling import build_model
from retinanet.modeling.faster_rcnn import FasterRCNN
from retinanet.ops.transform import default_image_sizes

from conftest import tiny_config, train_steps

TWO_STAGE = {"arch": "faster_rcnn", "min_level": 2, "max_level": 6, "p6_from": "pool",
             "anchor_sizes": [8.0, 16.0, 32.0, 64.0, 128.0], "anchor_scales": [1.0], "roi_head_dim": 32,
             "rpn_pre_nms_top_n": [200, 100], "rpn_post_nms_top_n": [100, 50], "roi_batch_per_image": 64}


def _config(num_classes: int = 3):
    return tiny_config(num_classes=num_classes, **TWO_STAGE)


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]), "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[30.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}]


def test_loss_options_that_do_not_apply_are_refused_at_load():
    with pytest.raises(ConfigError, match="loss.cls.*does not apply to model.arch=faster_rcnn"):
        load_config(overrides=["model.arch=faster_rcnn", "loss.cls=softmax_focal"])
    with pytest.raises(ConfigError, match="loss.iou_balanced_loc"):
        load_config(overrides=["model.arch=faster_rcnn", "loss.iou_balanced_loc=true"])
    with pytest.raises(ConfigError, match="did you mean 'faster_rcnn'"):
        load_config(overrides=["model.arch=faster-rcnn"])
    assert load_config(overrides=["model.arch=faster_rcnn", "loss.box=giou"]).loss.box == "giou"


def test_build_dispatches_on_arch_and_the_losses_are_named():
    torch.manual_seed(0)
    model = build_model(_config())
    assert isinstance(model, FasterRCNN) and model.network_inputs == ("images", "image_sizes")
    losses = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], _targets())
    assert sorted(losses) == ["roi_box", "roi_cls", "rpn_box", "rpn_cls"]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_an_image_with_no_boxes_has_zero_box_losses():
    torch.manual_seed(0)
    model = build_model(_config())
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model([torch.rand(3, 128, 128)], empty)
    assert losses["rpn_box"].item() == 0.0 and losses["roi_box"].item() == 0.0
    assert losses["rpn_cls"].item() > 0 and losses["roi_cls"].item() > 0  # every sampled anchor / RoI is background


def test_labels_out_of_range_name_the_image():
    model = build_model(_config())
    bad = [{"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([3])}]
    with pytest.raises(ValueError, match=r"image 0: labels must be in 0..2"):
        model([torch.rand(3, 64, 64)], bad)


def test_batched_inference_equals_per_image():
    """Two images of one size (the same padding alone and together): proposals and detections agree."""
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-2.0, 1.0, 0.5, 0.0]))
        images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
        together = model(images)
        alone = [model([image])[0] for image in images]
    for a, b in zip(together, alone):
        assert len(a["scores"]) > 0
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.allclose(a["scores"], b["scores"], atol=1e-6)


def test_default_image_sizes_are_the_padded_batchs():
    """network(images) without image_sizes: every image fills the batch; as the copies it replaced
    (faster_rcnn.py, and segment_proposals.py's two) computed them."""
    images = torch.zeros(3, 3, 64, 96)
    sizes = default_image_sizes(images)
    assert sizes.dtype == torch.int64 and sizes.tolist() == [[64, 96]] * 3
    assert torch.equal(sizes, torch.tensor([images.shape[-2:]], device=images.device).expand(images.shape[0], 2))
    assert torch.equal(sizes, images.new_tensor([[64, 96]], dtype=torch.int64).expand(3, 2))
    given = torch.tensor([[64, 80], [50, 96], [64, 96]])
    assert default_image_sizes(images, given) is given
    assert torch.equal(default_image_sizes(images, [(64, 80), (50, 96), (64, 96)]), given)
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 96)
        for a, b in zip(model.network(x), model.network(x, torch.tensor([[64, 96], [64, 96]]))):
            assert torch.equal(a, b)


def test_training_lowers_the_loss_of_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model(_config()).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    history = train_steps(model, images, _targets(), steps=15, lr=0.02)
    assert history[-1] < 0.7 * history[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from retinanet.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=6, num_val=3,
                               image_size=64, seed=1)


def test_the_shared_commands_train_predict_and_evaluate_it(shapes, tmp_path, capsys):
    cfg = {"model": {**TWO_STAGE, "backbone": "resnet18", "backbone_width": 8, "backbone_norm": "gn",
                     "frozen_stages": 0, "fpn_channels": 16, "min_size": 64, "max_size": 64},
           "data": {"batch_size": 2, "num_workers": 0, "train_json": str(shapes.train_json),
                    "train_images": str(shapes.train_images), "val_json": str(shapes.val_json),
                    "val_images": str(shapes.val_images)},
           "train": {"device": "cpu", "iterations": 2, "warmup_iters": 1, "checkpoint_every": 2, "log_every": 1,
                     "eval_every": 2}}
    config = tmp_path / "frcnn.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["rpn_cls"] + r["rpn_box"] + r["roi_cls"] + r["roi_box"]) for r in losses)
    assert 0.0 <= [r for r in records if "val" in r][-1]["val"]["AP"] <= 1.0

    model, loaded, categories = load_model(str(out / "final.pt"))
    assert isinstance(model, FasterRCNN) and loaded.model.arch == "faster_rcnn"
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    results = tmp_path / "results.json"
    assert main(["predict", "--checkpoint", str(out / "final.pt"), "--device", "cpu", "--score-threshold", "0",
                 "--output", str(results), str(tmp_path / "a.png")]) == 0
    det = Predictor(model, categories, device="cpu", score_threshold=0.0)(image)
    written = json.loads(results.read_text())
    assert len(written) == len(det) > 0
    assert np.allclose([r["score"] for r in written], det.scores, atol=1e-6)

    metrics = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--json", str(shapes.val_json), "--images",
                 str(shapes.val_images), "--device", "cpu", "--workers", "0", "--output", str(metrics)]) == 0
    assert 0.0 <= json.loads(metrics.read_text())["AP"] <= 1.0

    onnx = tmp_path / "frcnn.onnx"  # (the exported graph's detections: tests/test_export_two_stage.py)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "final.pt"), "--output", str(onnx), "--exporter",
                 "torchscript"]) == 0
    assert "labels identical" in capsys.readouterr().err and onnx.exists()
