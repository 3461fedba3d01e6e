"""torchvision's fasterrcnn_resnet50_fpn (v1) weights -> our Faster R-CNN: config, key names and shapes,
categories, the CLI, and the detections of the converted model equal those of the model it came from.
(The check against real torchvision, which does not import here: benchmarks/check_torchvision_parity.py.)"""

import math

import pytest
import torch

from retinanet.checkpoint import load_model
from retinanet.cli import main
from retinanet.convert import (TORCHVISION_COCO_NAMES, detect_torchvision_arch, torchvision_faster_rcnn_config,
                               to_torchvision_state_dict)
from retinanet.modeling import build_model


@pytest.fixture(scope="module")
def frcnn():
    torch.manual_seed(0)
    return build_model(torchvision_faster_rcnn_config()).eval()


def test_parameter_count_is_torchvisions(frcnn):
    # FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
    assert sum(p.numel() for p in frcnn.parameters()) == 41_755_286


def test_config_follows_torchvision(frcnn):
    m = torchvision_faster_rcnn_config().model
    assert (m.arch, m.num_classes, m.min_level, m.max_level, m.p6_from) == ("faster_rcnn", 90, 2, 6, "pool")
    assert (m.anchor_sizes, m.anchor_scales, m.anchor_ratios, m.anchor_style) == (
        [32.0, 64.0, 128.0, 256.0, 512.0], [1.0], [0.5, 1.0, 2.0], "torchvision")
    assert (m.rpn_pre_nms_top_n, m.rpn_post_nms_top_n, m.rpn_nms_thresh) == ([2000, 1000], [2000, 1000], 0.7)
    assert (m.roi_output_size, m.roi_sampling_ratio, m.roi_aligned, m.roi_box_weights) == (7, 2, False,
                                                                                          [10.0, 10.0, 5.0, 5.0])
    assert (m.score_thresh, m.nms_thresh, m.detections_per_image, m.resize_rounding) == (0.05, 0.5, 100, "floor")
    assert m.box_clamp == math.log(1000.0 / 16) and m.backbone_norm_eps == 0.0


def test_torchvision_names_and_shapes(frcnn):
    names = to_torchvision_state_dict(frcnn.state_dict())
    expected = {  # torchvision 0.29's fasterrcnn_resnet50_fpn state dict, by hand
        "backbone.body.conv1.weight": (64, 3, 7, 7),
        "backbone.body.layer4.2.bn3.running_var": (2048,),
        "backbone.fpn.inner_blocks.0.0.weight": (256, 256, 1, 1),
        "backbone.fpn.inner_blocks.3.0.weight": (256, 2048, 1, 1),
        "backbone.fpn.layer_blocks.3.0.bias": (256,),
        "rpn.head.conv.0.0.weight": (256, 256, 3, 3),
        "rpn.head.cls_logits.weight": (3, 256, 1, 1),
        "rpn.head.bbox_pred.weight": (12, 256, 1, 1),
        "roi_heads.box_head.fc6.weight": (1024, 256 * 7 * 7),
        "roi_heads.box_head.fc7.weight": (1024, 1024),
        "roi_heads.box_predictor.cls_score.weight": (91, 1024),
        "roi_heads.box_predictor.bbox_pred.weight": (364, 1024),
    }
    for key, shape in expected.items():
        assert tuple(names[key].shape) == shape, key
    assert not any("extra_blocks" in k for k in names)  # P6 by max pooling has no weights
    assert detect_torchvision_arch(names) == "fasterrcnn_resnet50_fpn"


def test_convert_cli_reproduces_the_models_detections(frcnn, tmp_path, capsys):
    state = to_torchvision_state_dict(frcnn.state_dict())
    state = {("rpn.head.conv.weight" if k == "rpn.head.conv.0.0.weight" else k): v  # the older layout loads too
             for k, v in state.items()}
    src, dst = tmp_path / "fasterrcnn_resnet50_fpn_coco.pth", tmp_path / "ours.pt"
    torch.save(state, src)
    assert main(["convert", "--from", "torchvision", str(src), str(dst)]) == 0
    assert "model.arch faster_rcnn" in capsys.readouterr().err
    model, cfg, categories = load_model(str(dst))
    assert cfg.model.arch == "faster_rcnn" and len(categories) == 90
    assert [c["id"] for c in categories] == list(range(1, 91))  # torchvision's label l is our l - 1, id l
    assert [c["name"] for c in categories] == TORCHVISION_COCO_NAMES[1:]
    assert sum(bool(c.get("placeholder")) for c in categories) == 10  # the "N/A" slots
    image = torch.rand(3, 96, 128)
    with torch.no_grad():
        a, b = frcnn([image])[0], model([image])[0]
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])
    with pytest.raises(SystemExit):
        main(["convert", "--from", "torchvision", str(src), str(tmp_path / "x.pt"), "--arch", "retinanet"])
    capsys.readouterr()
    assert main(["convert", "--from", "torchvision", str(src), str(tmp_path / "x.pt"), "--arch",
                 "retinanet_resnet50_fpn"]) != 0
    assert "RPN and RoI heads" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
