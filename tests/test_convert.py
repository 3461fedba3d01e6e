"""torchvision retinanet_resnet50_fpn -> our checkpoint: key names, conventions worked out by hand, round trip.

torchvision is not importable here; the names, shapes and numbers below are read from its source
(models/detection/retinanet.py, anchor_utils.py, transform.py, _utils.py BoxCoder,
ops/feature_pyramid_network.py) and its weights' metadata.
"""

import math

import numpy as np
import pytest
import torch

from retinanet.ops.anchors import AnchorGenerator
from retinanet.ops.boxes import decode
from retinanet.checkpoint import load_model
from retinanet.cli import main
from retinanet.convert import (detect_torchvision_arch, from_torchvision_state_dict, normalize_torchvision_keys,
                               to_torchvision_state_dict, torchvision_categories, torchvision_retinanet_config)
from retinanet.modeling import build_model
from retinanet.ops.transform import resized_size
from retinanet.predict import Predictor


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    return build_model(torchvision_retinanet_config(bn_eps=1e-5)).eval()


def test_parameter_count_is_torchvisions(tv_model):
    # RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
    assert sum(p.numel() for p in tv_model.parameters()) == 34_014_999


def test_torchvision_names_and_shapes(tv_model):
    tv = to_torchvision_state_dict(tv_model.state_dict())
    fpn_head = {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("backbone.body.")}
    expected = {}
    for i, c in enumerate([512, 1024, 2048]):  # C3, C4, C5 (returned_layers=[2, 3, 4])
        expected[f"backbone.fpn.inner_blocks.{i}.0.weight"] = (256, c, 1, 1)
        expected[f"backbone.fpn.inner_blocks.{i}.0.bias"] = (256,)
        expected[f"backbone.fpn.layer_blocks.{i}.0.weight"] = (256, 256, 3, 3)
        expected[f"backbone.fpn.layer_blocks.{i}.0.bias"] = (256,)
    for p in ("p6", "p7"):  # LastLevelP6P7(256, 256)
        expected[f"backbone.fpn.extra_blocks.{p}.weight"] = (256, 256, 3, 3)
        expected[f"backbone.fpn.extra_blocks.{p}.bias"] = (256,)
    for head in ("classification_head", "regression_head"):
        for j in range(4):  # Conv2dNormActivation(256, 256, norm_layer=None): Sequential(conv, ReLU)
            expected[f"head.{head}.conv.{j}.0.weight"] = (256, 256, 3, 3)
            expected[f"head.{head}.conv.{j}.0.bias"] = (256,)
    expected["head.classification_head.cls_logits.weight"] = (9 * 91, 256, 3, 3)
    expected["head.classification_head.cls_logits.bias"] = (9 * 91,)
    expected["head.regression_head.bbox_reg.weight"] = (9 * 4, 256, 3, 3)
    expected["head.regression_head.bbox_reg.bias"] = (9 * 4,)
    assert fpn_head == expected
    body = {k[len("backbone.body."):]: tuple(v.shape) for k, v in tv.items() if k.startswith("backbone.body.")}
    # torchvision's resnet50 has 320 entries; the body drops fc.{weight,bias}, FrozenBatchNorm2d has no
    # num_batches_tracked (53 of them)
    assert len(body) == 320 - 2 - 53
    assert body["conv1.weight"] == (64, 3, 7, 7)
    assert body["bn1.running_var"] == (64,)
    assert body["layer1.0.downsample.1.weight"] == (256,)
    assert body["layer4.2.conv3.weight"] == (2048, 512, 1, 1)


def test_older_torchvision_layout_and_batchnorm_counters_load(tv_model):
    """The COCO file predates Conv2dNormActivation: head conv.{2j}, FPN inner_blocks.{i}; weights=None
    models have BatchNorm2d with num_batches_tracked."""
    ours = tv_model.state_dict()
    new = to_torchvision_state_dict(ours)
    old = {}
    for k, v in new.items():
        k = k.replace(".inner_blocks.0.0.", ".inner_blocks.0.").replace(".layer_blocks.2.0.", ".layer_blocks.2.")
        for j in range(4):
            k = k.replace(f"_head.conv.{j}.0.", f"_head.conv.{2 * j}.")
        old[k] = v
    old["backbone.body.bn1.num_batches_tracked"] = torch.tensor(0)
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.0.weight" in old
    assert normalize_torchvision_keys(old).keys() == new.keys()
    back = from_torchvision_state_dict(old, ours)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_wrong_state_dict_is_a_clear_error(tv_model):
    tv = to_torchvision_state_dict(tv_model.state_dict())
    del tv["head.regression_head.bbox_reg.bias"]
    tv["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 unexpected keys \(head.extra.weight\).*1 missing keys \(head.regression_head.bbox_reg.bias\)"):
        from_torchvision_state_dict(tv, tv_model.state_dict())
    tv = to_torchvision_state_dict(tv_model.state_dict())
    tv["head.regression_head.bbox_reg.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'head.regression_head.bbox_reg.bias' has shape"):
        from_torchvision_state_dict(tv, tv_model.state_dict())


def test_anchors_of_one_location_by_hand():
    """torchvision: sizes (32, int(32 * 2^(1/3)), int(32 * 2^(2/3))) = (32, 40, 50) on P3; for ratio r,
    w = size / sqrt(r), h = size * sqrt(r), [-w, -h, w, h] / 2 rounded, ratio-major."""
    m = torchvision_retinanet_config().model
    gen = AnchorGenerator(m.anchor_sizes, m.anchor_scales, m.anchor_ratios, [8, 16, 32, 64, 128], style=m.anchor_style)
    expected_p3 = torch.tensor([
        [-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18],  # ratio 0.5: w 45.25, 56.57, 70.71
        [-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25],  # ratio 1
        [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35],  # ratio 2
    ], dtype=torch.float32)
    assert torch.equal(gen.cells[0], expected_p3)
    # Padded 800 x 1216 (a 427 x 640 image resized to 800 x 1199): P3..P7 grids; stride = image // grid,
    # so P6 (13 x 19) has strides 61 (800 // 13) and 64, P7 (7 x 10) 114 and 121 - not 64 and 128.
    grids = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    levels = gen(grids, (800, 1216), "cpu")
    assert [len(a) for a in levels] == [h * w * 9 for h, w in grids]
    p7 = levels[4].reshape(7, 10, 9, 4)  # location-major: row, column, anchor
    assert torch.equal(p7[1, 1, 3], torch.tensor([121 - 256, 114 - 256, 121 + 256, 114 + 256], dtype=torch.float32))
    # P7's middle size is int(512 * 2^(1/3)) = 645; 645 / 2 = 322.5 rounds half to even (torch.round)
    assert torch.equal(gen.cells[4][4], torch.tensor([-322.0, -322.0, 322.0, 322.0]))
    assert torch.equal(levels[3].reshape(13, 19, 9, 4)[2, 3, 3], torch.tensor([192 - 128, 122 - 128, 192 + 128, 122 + 128],
                                                                                 dtype=torch.float32))


def test_heads_need_no_channel_permutation(tv_model):
    """Both lay the classification channels out as anchor * K + class, with the anchor order above:
    head output channel c of location (y, x) is row (y * W + x) * A + c // K, class c % K."""
    feature = torch.randn(1, 256, 2, 3)
    with torch.no_grad():
        raw = tv_model.head.cls_subnet(feature)  # (1, A * K, H, W), what torchvision's cls_logits conv gives
        cls, _ = tv_model.head([feature])  # (1, H * W * A, K)
    a, k = 9, 91
    for y, x, c in [(0, 0, 0), (1, 2, 5 * k + 17), (1, 0, 8 * k + 90)]:
        assert cls[0, (y * 3 + x) * a + c // k, c % k] == raw[0, c, y, x]


def test_resize_rule_by_hand():
    """torchvision (eager): scale = min(800 / short, 1333 / long) in float64, size = floor(side * scale)."""
    assert resized_size(375, 500, 800, 1333, rounding="floor") == (800, 1066)  # 500 * 32 / 15 = 1066.67
    assert resized_size(375, 500, 800, 1333, rounding="round") == (800, 1067)
    assert resized_size(427, 640, 800, 1333, rounding="floor") == (800, 1199)  # 640 * 800 / 427 = 1199.06
    assert resized_size(500, 2000, 800, 1333, rounding="floor") == (333, 1333)  # longer side capped: 500 * 0.6665


def test_box_decoding_by_hand():
    """torchvision's BoxCoder(weights=(1, 1, 1, 1)), dw/dh clamped at log(1000 / 16)."""
    m = torchvision_retinanet_config().model
    anchor = torch.tensor([[0.0, 0.0, 32.0, 16.0]])  # centre (16, 8), 32 x 16
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 10.0]])  # dh = 10 is clamped to log(62.5)
    box = decode(anchor, deltas, m.box_weights, m.box_clamp)
    # centre (16 + 0.5 * 32, 8 - 0.25 * 16) = (32, 4); w = 2 * 32 = 64, h = 62.5 * 16 = 1000
    assert torch.allclose(box, torch.tensor([[0.0, -496.0, 64.0, 504.0]]), atol=1e-4)


def test_config_matches_torchvision_conventions():
    m = torchvision_retinanet_config().model
    assert (m.num_classes, m.p6_from, m.anchor_style, m.resize_rounding) == (91, "p5", "torchvision", "floor")
    assert (m.score_thresh, m.topk_candidates, m.nms_thresh, m.detections_per_image) == (0.05, 1000, 0.5, 300)
    assert (m.min_size, m.max_size, m.size_divisibility, m.backbone_norm_eps) == (800, 1333, 32, 0.0)
    assert m.box_clamp == math.log(1000.0 / 16) and m.box_weights == [1.0, 1.0, 1.0, 1.0]


def test_coco_categories():
    cats = torchvision_categories(91)
    assert [c["id"] for c in cats] == list(range(91))  # label i is COCO category id i
    placeholders = [c["id"] for c in cats if c.get("placeholder")]
    assert placeholders == [0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # background and ids COCO never used
    assert (cats[1]["name"], cats[18]["name"], cats[90]["name"]) == ("person", "dog", "toothbrush")
    assert len(cats) - len(placeholders) == 80


def test_round_trip_through_torchvision_format_and_cli(tmp_path, tv_model, capsys):
    """ours -> torchvision's names in a .pth -> `retinanet convert` -> identical weights and detections."""
    with torch.no_grad():
        tv_model.head.cls_subnet.predictor.bias.fill_(-1.5)  # random heads rarely pass 0.05 otherwise
    src = tmp_path / "retinanet_resnet50_fpn.pth"
    torch.save(to_torchvision_state_dict(tv_model.state_dict()), src)
    dst = tmp_path / "converted.pt"
    assert main(["convert", "--from", "torchvision", str(src), str(dst), "--bn-eps", "1e-5"]) == 0
    assert "91 class slots (80 classes, 11 placeholders" in capsys.readouterr().err
    model, cfg, categories = load_model(str(dst))
    assert cfg.model.backbone_norm_eps == 1e-5 and model.backbone.bn1.eps == 1e-5
    state = model.state_dict()
    assert state.keys() == tv_model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in tv_model.state_dict().items())
    for m in (model, tv_model):  # a small image keeps the ResNet-50 quick
        m.min_size, m.max_size = 96, 160
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ids = [c["id"] for c in categories]
    a = Predictor(model, categories, device="cpu", classes=ids)(image)
    b = Predictor(tv_model, categories, device="cpu", classes=ids)(image)
    assert len(a) > 0
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores) and np.array_equal(a.labels, b.labels)


# ----------------------------------------------------------------------------------------------
# retinanet_resnet50_fpn_v2 (torchvision PR #5756): names and numbers read from its source


V2 = "retinanet_resnet50_fpn_v2"


@pytest.fixture(scope="module")
def v2_model():
    torch.manual_seed(0)
    return build_model(torchvision_retinanet_config(arch=V2)).eval()


def test_v2_config_fields():
    cfg = torchvision_retinanet_config(arch=V2)
    m = cfg.model
    # resnet50() with its default BatchNorm2d (eps 1e-5), also under the COCO weights
    assert (m.backbone, m.backbone_norm, m.backbone_norm_eps, m.frozen_stages) == ("resnet50", "bn", 1e-5, 2)
    assert m.p6_from == "c5"  # LastLevelP6P7(2048, 256)
    assert (m.head_convs, m.head_norm, m.head_bias) == (4, "gn", False)  # Conv2dNormActivation + GroupNorm(32)
    assert cfg.loss.box == "giou" and cfg.loss.cls == "focal"  # regression_head._loss_type = "giou"
    # Everything else as v1: anchors, box coder, resize, post-processing
    v1 = torchvision_retinanet_config().model
    same = ("anchor_sizes", "anchor_scales", "anchor_ratios", "anchor_style", "box_weights", "box_clamp",
            "score_thresh", "topk_candidates", "nms_thresh", "detections_per_image", "min_size", "max_size",
            "resize_rounding", "size_divisibility", "pixel_mean", "pixel_std", "num_classes")
    assert all(getattr(m, k) == getattr(v1, k) for k in same)
    assert (m.score_thresh, m.topk_candidates, m.detections_per_image) == (0.05, 1000, 300)
    assert torchvision_retinanet_config(arch=V2, bn_eps=0.0).model.backbone_norm_eps == 0.0
    with pytest.raises(ValueError, match="unknown torchvision architecture 'retinanet_v3'"):
        torchvision_retinanet_config(arch="retinanet_v3")


def test_v2_parameter_count_is_torchvisions(v2_model):
    # RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1.meta["num_params"]
    assert sum(p.numel() for p in v2_model.parameters()) == 38_198_935
    assert v2_model.head.cls_subnet.tower[1].num_groups == 32 and v2_model.head.cls_subnet.tower[0].bias is None


def test_v2_torchvision_names_and_shapes(v2_model):
    tv = to_torchvision_state_dict(v2_model.state_dict())
    fpn_head = {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("backbone.body.")}
    expected = {}
    for i, c in enumerate([512, 1024, 2048]):
        expected[f"backbone.fpn.inner_blocks.{i}.0.weight"] = (256, c, 1, 1)
        expected[f"backbone.fpn.inner_blocks.{i}.0.bias"] = (256,)
        expected[f"backbone.fpn.layer_blocks.{i}.0.weight"] = (256, 256, 3, 3)
        expected[f"backbone.fpn.layer_blocks.{i}.0.bias"] = (256,)
    expected["backbone.fpn.extra_blocks.p6.weight"] = (256, 2048, 3, 3)  # LastLevelP6P7(2048, 256): from C5
    expected["backbone.fpn.extra_blocks.p6.bias"] = (256,)
    expected["backbone.fpn.extra_blocks.p7.weight"] = (256, 256, 3, 3)
    expected["backbone.fpn.extra_blocks.p7.bias"] = (256,)
    for head in ("classification_head", "regression_head"):
        for j in range(4):  # Conv2dNormActivation: Sequential(conv (no bias), GroupNorm(32, 256), ReLU)
            expected[f"head.{head}.conv.{j}.0.weight"] = (256, 256, 3, 3)
            expected[f"head.{head}.conv.{j}.1.weight"] = (256,)
            expected[f"head.{head}.conv.{j}.1.bias"] = (256,)
    expected["head.classification_head.cls_logits.weight"] = (9 * 91, 256, 3, 3)
    expected["head.classification_head.cls_logits.bias"] = (9 * 91,)
    expected["head.regression_head.bbox_reg.weight"] = (9 * 4, 256, 3, 3)
    expected["head.regression_head.bbox_reg.bias"] = (9 * 4,)
    assert fpn_head == expected
    body = [k for k in tv if k.startswith("backbone.body.")]
    assert len(body) == 320 - 2  # torchvision's resnet50 state dict without fc: BatchNorm2d, with its counters
    assert "backbone.body.layer3.5.bn2.num_batches_tracked" in body


def test_v2_key_mapping_tensor_by_tensor(v2_model):
    """A v2 state dict of distinct constants, named as torchvision names them: every tensor lands where it should."""
    ours = v2_model.state_dict()
    tv = {}
    for n, (k, v) in enumerate(to_torchvision_state_dict(ours).items()):
        tv[k] = torch.full_like(v, n) if v.is_floating_point() else torch.tensor(7)
    back = from_torchvision_state_dict(tv, ours)
    assert back.keys() == ours.keys()
    for theirs, mine in [("head.classification_head.conv.0.0.weight", "head.cls_subnet.tower.0.weight"),
                         ("head.classification_head.conv.0.1.weight", "head.cls_subnet.tower.1.weight"),
                         ("head.classification_head.conv.1.0.weight", "head.cls_subnet.tower.3.weight"),
                         ("head.regression_head.conv.3.1.bias", "head.box_subnet.tower.10.bias"),
                         ("head.regression_head.bbox_reg.weight", "head.box_subnet.predictor.weight"),
                         ("backbone.fpn.extra_blocks.p6.weight", "fpn.extra.0.weight"),
                         ("backbone.body.layer4.2.bn3.running_var", "backbone.layer4.2.bn3.running_var")]:
        assert torch.equal(back[mine], tv[theirs]), mine
    # The counters keep the model's own values (they matter only for BatchNorm without momentum)
    assert back["backbone.bn1.num_batches_tracked"].item() == 0


def test_v2_is_detected_from_its_keys_and_converts(tmp_path, v2_model, tv_model, capsys):
    src = tmp_path / "retinanet_resnet50_fpn_v2.pth"
    torch.save(to_torchvision_state_dict(v2_model.state_dict()), src)
    dst = tmp_path / "v2.pt"
    assert main(["convert", "--from", "torchvision", str(src), str(dst)]) == 0
    assert "(torchvision retinanet_resnet50_fpn_v2)" in capsys.readouterr().err
    model, cfg, _ = load_model(str(dst))
    assert (cfg.model.head_norm, cfg.model.p6_from, cfg.loss.box, cfg.model.backbone_norm_eps) == ("gn", "c5", "giou", 1e-5)
    state, reference = model.state_dict(), v2_model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    # --arch must agree with the keys
    assert main(["convert", "--from", "torchvision", str(src), str(tmp_path / "x.pt"),
                 "--arch", "retinanet_resnet50_fpn"]) == 1
    assert "--arch retinanet_resnet50_fpn, but the weights are retinanet_resnet50_fpn_v2's" in capsys.readouterr().err
    v1_src = tmp_path / "v1.pth"
    torch.save(to_torchvision_state_dict(tv_model.state_dict()), v1_src)
    assert main(["convert", "--from", "torchvision", str(v1_src), str(tmp_path / "y.pt"), "--arch", V2]) == 1
    assert "the weights are retinanet_resnet50_fpn's (no GroupNorm, P6 from P5)" in capsys.readouterr().err


def test_v2_heads_with_p6_from_p5_is_an_error(v2_model):
    tv = to_torchvision_state_dict(v2_model.state_dict())
    tv["backbone.fpn.extra_blocks.p6.weight"] = torch.zeros(256, 256, 3, 3)
    with pytest.raises(ValueError, match="GroupNorm heads with P6 from P5"):
        detect_torchvision_arch(tv)


def test_v2_recipe_config_builds_the_converted_model():
    """retinanet/configs/torchvision_v2_recipe.yaml trains the model that `convert` gives for v2 weights."""
    from pathlib import Path

    from retinanet.config import load_config

    recipe = load_config(str(Path(__file__).resolve().parent.parent / "retinanet/configs/torchvision_v2_recipe.yaml"))
    converted = torchvision_retinanet_config(arch=V2)
    assert recipe.model == converted.model and recipe.loss == converted.loss
    t = recipe.train
    assert (t.optimizer, t.lr, t.weight_decay, t.decay_norm_bias, t.sync_bn) == ("adamw", 1e-4, 0.05, False, True)
    assert t.lr_steps == [16 * 7330, 22 * 7330] and t.iterations == 26 * 7330  # epochs 16, 22 and 26
