import copy

import pytest
import torch
from torch import nn

from retinanet.modeling.backbone import FrozenBatchNorm2d
from retinanet.modeling import build_model
from retinanet.optimize import autocast, fold_batchnorm, optimize_for_inference

from conftest import tiny_config


def _model(norm="frozen_bn", num_classes=3):
    """A tiny model whose norms are not identities (folding identity norms would prove nothing)."""
    model = build_model(tiny_config(num_classes=num_classes, backbone_norm=norm)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        # spread the class logits so that some scores pass the threshold and NMS has work to do
        model.head.cls_subnet.predictor.weight.mul_(50.0)
        model.head.cls_subnet.predictor.bias.fill_(-3.0)
    return model


def _outputs(model, batch):
    with torch.no_grad():
        cls_logits, box_deltas, anchors, _ = model.forward_features(batch)
    return cls_logits, box_deltas, anchors


def _assert_close_rel(a, b, rel):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rel * b.abs().max()


def test_fold_removes_every_frozen_bn_and_keeps_outputs():
    model = _model()
    folded = copy.deepcopy(model)
    # resnet18: stem 1 + 8 blocks x 2 + 3 downsample branches
    assert fold_batchnorm(folded) == 20
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    assert folded.backbone.layer2[0].conv1.bias is not None
    batch = model.preprocess([torch.rand(3, 128, 160)], resize=False).tensor
    for a, b in zip(_outputs(folded, batch), _outputs(model, batch)):
        _assert_close_rel(a, b, 1e-4)


def test_fold_eval_batchnorm_and_refuse_batch_statistics():
    model = _model(norm="bn")
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 20
    batch = model.preprocess([torch.rand(3, 128, 128)], resize=False).tensor
    for a, b in zip(_outputs(folded, batch), _outputs(model, batch)):
        _assert_close_rel(a, b, 1e-4)
    with pytest.raises(ValueError, match="batch statistics"):
        fold_batchnorm(copy.deepcopy(model).train())


def test_fold_is_exact_for_a_single_conv_by_hand():
    # conv weight 2, bias none; norm: scale = 3 / sqrt(4 + 0) = 1.5, shift = 1 - 2 * 1.5 = -2
    block = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), FrozenBatchNorm2d(1, eps=0.0))
    with torch.no_grad():
        block[0].weight.fill_(2.0)
        block[1].weight.fill_(3.0)
        block[1].bias.fill_(1.0)
        block[1].running_mean.fill_(2.0)
        block[1].running_var.fill_(4.0)
    assert fold_batchnorm(block) == 1
    assert isinstance(block[1], nn.Identity)
    assert block[0].weight.item() == 3.0 and block[0].bias.item() == -2.0
    assert block(torch.tensor([[[[5.0]]]])).item() == 13.0  # 1.5 * (2 * 5) - 2


def test_optimized_model_gives_the_same_detections():
    model = _model()
    fast = optimize_for_inference(copy.deepcopy(model))
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = [torch.rand(3, 150, 200), torch.rand(3, 120, 170)]
    with torch.no_grad():
        expected, got = model(images), fast(images)
    assert sum(len(d["scores"]) for d in expected) > 10
    for e, g in zip(expected, got):
        assert torch.equal(e["labels"], g["labels"])
        _assert_close_rel(g["boxes"], e["boxes"], 1e-4)
        _assert_close_rel(g["scores"], e["scores"], 1e-4)


def test_channels_last_equals_nchw():
    model = _model()
    cl = optimize_for_inference(copy.deepcopy(model), fold_bn=False, channels_last=True)
    batch = model.preprocess([torch.rand(3, 128, 192)], resize=False).tensor
    cls_cl, box_cl, _ = _outputs(cl, batch)
    cls_ref, box_ref, _ = _outputs(model, batch)
    _assert_close_rel(cls_cl, cls_ref, 1e-5)
    _assert_close_rel(box_cl, box_ref, 1e-5)


def test_bfloat16_runs_the_network_in_bf16_and_decodes_boxes_in_float32():
    model = optimize_for_inference(_model())
    pre = model.preprocess([torch.rand(3, 128, 160)], resize=False)
    with torch.no_grad(), autocast(model, torch.bfloat16):
        cls_logits, box_deltas, anchors, level_sizes = model.forward_features(pre.tensor)
        assert cls_logits.dtype == torch.bfloat16 and box_deltas.dtype == torch.bfloat16
        got = model.postprocess((cls_logits, box_deltas, *anchors.split(level_sizes)), pre)
    # The same bf16 numbers post-processed from float32 copies: identical if decoding is float32.
    expected = model.postprocess((cls_logits.float(), box_deltas.float(), *anchors.split(level_sizes)), pre)
    assert len(expected[0]["scores"]) > 0
    assert got[0]["boxes"].dtype == torch.float32 and got[0]["scores"].dtype == torch.float32
    assert torch.equal(got[0]["boxes"], expected[0]["boxes"])
    assert torch.equal(got[0]["labels"], expected[0]["labels"])


def test_autocast_float32_is_a_no_op():
    model = _model()
    with autocast(model, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(model, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


def test_frozen_bn_is_one_affine_map_and_keeps_channels_last():
    bn = FrozenBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        bn.running_mean.copy_(torch.tensor([1.0, 0.0, 2.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 9.0]))
    bn.eps = 0.0
    x = torch.randn(2, 4, 3, 5).to(memory_format=torch.channels_last)
    # scale = weight / sqrt(var) = [0.5, 2, 1, 1]; shift = bias - mean * scale = [-0.5, 1, -3, 3]
    expected = x * torch.tensor([0.5, 2.0, 1.0, 1.0]).reshape(1, 4, 1, 1) + torch.tensor([-0.5, 1.0, -3.0, 3.0]).reshape(1, 4, 1, 1)
    y = bn(x)
    assert torch.allclose(y, expected, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_compile_network_leaves_the_model_eager_without_a_compiler(monkeypatch):
    import retinanet.optimize as optimize

    monkeypatch.setattr(optimize, "compiler_works", lambda device_type: False)
    model = _model()
    assert optimize.compile_network(model) is False
    assert model.backbone._compiled_call_impl is None  # nn.Module.compile() was not called
