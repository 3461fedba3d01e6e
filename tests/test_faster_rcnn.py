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
from retinanet.modeling.detector import ImageBatch
from retinanet.modeling.faster_rcnn import FasterRCNN
from retinanet.ops.boxes import box_iou
from retinanet.ops.transform import default_image_sizes

from conftest import tiny_config, train_steps
from detection_match import assert_same_detections

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
    """Images of different sizes together: each image's proposals and detections are its own, clipped to its
    own size (not the padded batch's), as when it runs alone on the same padded canvas. (Alone on a canvas
    of its own size it differs: padding changes the features near the right and bottom borders, as in
    torchvision.)"""
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-2.0, 1.0, 0.5, 0.0]))
        model.roi_heads.box_predictor.bbox_pred.bias.view(-1, 4)[:, 2:] = 2.0  # boxes 1.5x larger: many clipped
        images = [torch.rand(3, 128, 160), torch.rand(3, 72, 100)]  # resized to 128 x 160 and 128 x 178
        batch = model.preprocess(images)
        assert batch.tensor.shape[-2:] == (128, 192) and batch.image_sizes == [(128, 160), (128, 178)]
        together = model(images)
        for i, image in enumerate(images):
            canvas = ImageBatch(batch.tensor[i:i + 1], batch.image_sizes[i:i + 1], batch.original_sizes[i:i + 1])
            alone = model.postprocess(model.run_network(canvas), canvas)[0]
            a = together[i]
            assert len(a["scores"]) > 10  # a batch of one may round otherwise: near-equal scores may swap
            assert_same_detections(a, alone, score_atol=1e-6, box_atol=1e-4)
            h, w = image.shape[-2:]
            assert a["boxes"][:, 2].max() <= w and a["boxes"][:, 3].max() <= h
            assert ((a["boxes"][:, 2] == w) | (a["boxes"][:, 3] == h)).sum() >= 5  # clipped at its own border


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


BOX = [20.0, 16.0, 52.0, 48.0]  # xyxy: the one object of the one-image dataset below, class 2 ("c")


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    """A one-image COCO dataset (64 x 64, one box of class "c" on a noisy background), its training config,
    and a model trained on it in-process for 60 steps, saved as a checkpoint (fit.pt)."""
    from retinanet.checkpoint import make_checkpoint, save_atomic

    root = tmp_path_factory.mktemp("one_image")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 50, (64, 64, 3), dtype=np.uint8)
    x0, y0, x1, y1 = (int(v) for v in BOX)
    pixels[y0:y1, x0:x1] = (230, 50, 25)
    (root / "images").mkdir()
    Image.fromarray(pixels).save(root / "images" / "a.png")
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}], "categories": categories,
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}]}
    (root / "a.json").write_text(json.dumps(coco))
    cfg = {"model": {**TWO_STAGE, "num_classes": 3, "backbone": "resnet18", "backbone_width": 8, "backbone_norm": "gn",
                     "frozen_stages": 0, "fpn_channels": 16, "min_size": 64, "max_size": 64},
           "data": {"batch_size": 1, "num_workers": 0, "train_json": str(root / "a.json"),
                    "train_images": str(root / "images"), "val_json": str(root / "a.json"),
                    "val_images": str(root / "images")}}
    (root / "frcnn.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(str(root / "frcnn.yaml"))
    torch.manual_seed(0)
    model = build_model(config).train()
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    train_steps(model, [image], [{"boxes": torch.tensor([BOX]), "labels": torch.tensor([2])}], steps=60, lr=0.02)
    save_atomic(make_checkpoint(model, config, categories), str(root / "fit.pt"))
    return root, image, model.eval()


def test_a_model_trained_on_one_image_finds_its_box(one_image):
    _, image, model = one_image
    with torch.no_grad():
        det = model([image])[0]
    iou = box_iou(det["boxes"][:1], torch.tensor([BOX])).item()
    print(f"best detection: label {det['labels'][0].item()}, score {det['scores'][0].item():.3f}, IoU {iou:.3f}")
    assert det["labels"][0].item() == 2 and det["scores"][0].item() > 0.8 and iou > 0.6


def test_the_shared_commands_train_predict_and_evaluate_it(one_image, tmp_path, capsys):
    """train (from the fitted weights, at a learning rate too small to change them: its validation finds the
    box), predict and eval (the same metrics as training's last validation), export."""
    root, _, _ = one_image
    out = tmp_path / "run"
    assert main(["train", str(root / "frcnn.yaml"), "--output", str(out), "--no-progress", "--weights",
                 str(root / "fit.pt"), "train.device=cpu", "train.iterations=2", "train.warmup_iters=1",
                 "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=2", "train.lr=1e-6"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["rpn_cls"] + r["rpn_box"] + r["roi_cls"] + r["roi_box"]) for r in losses)
    val = [r for r in records if "val" in r][-1]["val"]
    assert val["AP50"] == pytest.approx(1.0) and val["AR100"] >= 0.6  # the one box, found first, at IoU > 0.6

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
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--json", str(root / "a.json"), "--images",
                 str(root / "images"), "--device", "cpu", "--workers", "0", "--output", str(metrics)]) == 0
    evaluated = json.loads(metrics.read_text())
    assert evaluated == {k: v for k, v in val.items() if k != "ms_per_image"}  # final.pt's weights, the same images

    onnx = tmp_path / "frcnn.onnx"  # (the exported graph's detections: tests/test_export_two_stage.py)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "final.pt"), "--output", str(onnx), "--exporter",
                 "torchscript"]) == 0
    assert "labels identical" in capsys.readouterr().err and onnx.exists()
