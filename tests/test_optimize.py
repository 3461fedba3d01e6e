import copy

import pytest
import torch
from torch import nn

from retinanet.modeling.backbone import FrozenBatchNorm2d
from retinanet.modeling import build_model
from retinanet.optimize import (ConvFrozenBatchNorm2d, autocast, fold_batchnorm, fold_frozen_bn_for_training,
                                onednn_unsafe_channels_last, optimize_for_inference, to_channels_last,
                                unfold_frozen_bn)

from conftest import tiny_config
from detection_match import assert_same_detections


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
    for e, g in zip(expected, got):  # folded BN + channels_last: another computation, other rounding
        assert_same_detections(g, e, score_atol=1e-4, box_atol=0.02)


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


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm2d folded into its conv for training (train.fold_frozen_bn)

TWO_STAGE = {"arch": "faster_rcnn", "min_level": 2, "max_level": 6, "p6_from": "pool",
             "anchor_sizes": [8.0, 16.0, 32.0, 64.0, 128.0], "anchor_scales": [1.0], "roi_head_dim": 32,
             "rpn_pre_nms_top_n": [200, 100], "rpn_post_nms_top_n": [100, 50], "roi_batch_per_image": 64}
IMAGES = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2))]
TARGETS = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 50.0]]), "labels": torch.tensor([0, 2])},
           {"boxes": torch.tensor([[30.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}]


def _trainable(arch: str = "retinanet", dtype=torch.float32):
    """A tiny detector with FrozenBatchNorm2d whose statistics are not identities, in train mode."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone_norm="frozen_bn", **(TWO_STAGE if arch == "faster_rcnn" else {})))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).train()


def _losses_and_grads(model, dtype=torch.float32, autocast_dtype=None) -> tuple:
    """One training forward + backward on IMAGES (same sampler draws every call) -> (losses, grads)."""
    torch.manual_seed(0)  # the RPN and RoI samplers draw random numbers
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        losses = model([im.to(dtype) for im in IMAGES], TARGETS)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach().float() for k, v in losses.items()}, grads


def _max_rel_diff(got: dict, expected: dict) -> float:
    """max over entries of max|got - expected| / max|expected| (the same keys in both)."""
    assert got.keys() == expected.keys()
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max().clamp(min=1e-30)) for k in expected)


def test_fold_for_training_by_hand():
    # conv weight 2; norm scale = 3 / sqrt(4) = 1.5, shift = 1 - 2 * 1.5 = -2: y = 1.5 * 2 * x - 2
    block = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), FrozenBatchNorm2d(1, eps=0.0))
    with torch.no_grad():
        block[0].weight.fill_(2.0)
        block[1].weight.fill_(3.0), block[1].bias.fill_(1.0)
        block[1].running_mean.fill_(2.0), block[1].running_var.fill_(4.0)
    assert fold_frozen_bn_for_training(block) == 1
    assert isinstance(block[0], ConvFrozenBatchNorm2d) and block[1].folded
    y = block(torch.tensor([[[[5.0]]]]))
    assert y.item() == 13.0
    y.sum().backward()
    assert block[0].weight.grad.item() == 7.5  # dy/dW = scale * x
    assert block[0].weight.item() == 2.0  # the parameter itself is not rewritten
    assert fold_frozen_bn_for_training(block) == 0  # already folded


def test_fold_for_training_keeps_the_state_dict_both_ways():
    model = _trainable()
    reference = model.state_dict()
    assert fold_frozen_bn_for_training(model) == 20  # resnet18: stem 1 + 8 blocks x 2 + 3 downsample branches
    state = model.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    plain = _trainable()
    plain.load_state_dict(state)  # strict, in both directions
    model.load_state_dict(plain.state_dict())
    assert sum(isinstance(m, ConvFrozenBatchNorm2d) for m in model.modules()) == 20


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_folded_training_gives_the_unfolded_losses_and_gradients(arch):
    plain = _trainable(arch)
    folded = copy.deepcopy(plain)
    fold_frozen_bn_for_training(folded)
    losses, grads = _losses_and_grads(folded)
    ref_losses, ref_grads = _losses_and_grads(plain)
    assert len(grads) == len([p for p in plain.parameters() if p.requires_grad])  # every parameter reached
    assert _max_rel_diff(losses, ref_losses) <= 2e-6  # measured 0 (RetinaNet), 4.0e-7 (Faster R-CNN)
    assert _max_rel_diff(grads, ref_grads) <= 2e-5  # measured 2.2e-6, 5.2e-6


def test_folded_backbone_and_fpn_in_float64():
    """In float64 the fold is exact up to float64 rounding: features and gradients agree to ~1e-14."""
    plain = _trainable(dtype=torch.float64)
    folded = copy.deepcopy(plain)
    assert fold_frozen_bn_for_training(folded) == 20
    x = torch.randn(2, 3, 96, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def features_and_grads(model):
        feats = model.fpn(model.backbone(x))
        weights = [torch.randn(f.shape, dtype=f.dtype, generator=torch.Generator().manual_seed(i)) for i, f in enumerate(feats)]
        sum((f * w).sum() for f, w in zip(feats, weights)).backward()  # a fixed linear function of every level
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {str(i): f.detach() for i, f in enumerate(feats)}, grads

    feats, grads = features_and_grads(folded)
    ref_feats, ref_grads = features_and_grads(plain)
    assert len(grads) == len([p for n, p in plain.named_parameters() if p.requires_grad and not n.startswith("head")])
    assert _max_rel_diff(feats, ref_feats) <= 3e-14  # measured 2.3e-15
    assert _max_rel_diff(grads, ref_grads) <= 5e-14  # measured 5.2e-15


@pytest.mark.parametrize("channels_last_first", [True, False])
def test_folded_training_composes_with_channels_last_and_its_onednn_workaround(channels_last_first, monkeypatch):
    plain = _trainable()
    model = copy.deepcopy(plain)
    steps = [to_channels_last, fold_frozen_bn_for_training]
    for step in steps if channels_last_first else steps[::-1]:
        step(model)
    unsafe = model.backbone.layer2[0].downsample[0]  # 1x1, stride 2, 8 input channels: NCHW on the CPU
    assert isinstance(unsafe, ConvFrozenBatchNorm2d) and onednn_unsafe_channels_last(unsafe)
    seen = {}
    conv2d = torch.nn.functional.conv2d

    def recording_conv2d(x, weight, *args):
        seen.setdefault(weight.shape, []).append((x.is_contiguous(), weight.stride()))
        return conv2d(x, weight, *args)

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", recording_conv2d)
    losses, grads = _losses_and_grads(model)
    monkeypatch.undo()
    assert seen[unsafe.weight.shape] == [(True, (8, 1, 1, 1))]  # its input and folded weight NCHW
    assert model.backbone.layer2[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    ref_losses, ref_grads = _losses_and_grads(plain)
    assert _max_rel_diff(losses, ref_losses) <= 2e-6
    assert _max_rel_diff(grads, ref_grads) <= 2e-5


def test_folded_training_under_bfloat16_autocast():
    plain = _trainable()
    folded = copy.deepcopy(plain)
    fold_frozen_bn_for_training(folded)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c2 = folded.backbone(IMAGES[0][None])[0]
    assert c2.dtype == torch.bfloat16  # the folded convs run in bf16 like the others
    losses, grads = _losses_and_grads(folded, autocast_dtype=torch.bfloat16)
    ref_losses, ref_grads = _losses_and_grads(plain, autocast_dtype=torch.bfloat16)
    assert grads.keys() == ref_grads.keys() and all(g.dtype == torch.float32 for g in grads.values())
    # bf16 keeps 8 bits: the two round at different places (folded: W * scale in float32, then one bf16 conv)
    assert _max_rel_diff(losses, ref_losses) <= 2e-3  # measured 2.3e-5; bf16 against fp32 itself: 3.7e-4


def test_unfold_and_inference_folding_after_training_folding():
    plain = _trainable().eval()
    model = copy.deepcopy(plain)
    fold_frozen_bn_for_training(model)
    copied = copy.deepcopy(model)  # what ModelEMA does: the copy's convs apply the copy's norms
    assert copied.backbone.layer1[0].conv1.frozen_norm is copied.backbone.layer1[0].bn1
    inference = copy.deepcopy(model)
    assert fold_batchnorm(inference) == 20  # undoes the training fold first: each norm applied once
    expected = copy.deepcopy(plain)
    fold_batchnorm(expected)
    assert all(torch.equal(a, b) for a, b in zip(inference.state_dict().values(), expected.state_dict().values()))
    assert unfold_frozen_bn(model) == 20
    assert not any(isinstance(m, ConvFrozenBatchNorm2d) or getattr(m, "folded", False) for m in model.modules())
    batch = plain.preprocess([torch.rand(3, 128, 160)], resize=False).tensor
    for a, b in zip(_outputs(model, batch), _outputs(plain, batch)):
        assert torch.equal(a, b)


def test_folded_training_under_ddp(tmp_path):
    import torch.distributed as dist

    plain = _trainable()
    folded = copy.deepcopy(plain)
    fold_frozen_bn_for_training(folded)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        losses, grads = _losses_and_grads(nn.parallel.DistributedDataParallel(folded))
    finally:
        dist.destroy_process_group()
    ref_losses, ref_grads = _losses_and_grads(plain)
    assert _max_rel_diff(losses, ref_losses) <= 2e-6
    assert _max_rel_diff(grads, {"module." + k: v for k, v in ref_grads.items()}) <= 2e-5


def test_engine_trains_folded_with_the_same_checkpoints(tmp_path):
    """train.fold_frozen_bn: the same checkpoint keys; after 3 iterations the weights are within float
    rounding of an unfolded run's (measured max difference 3.0e-8)."""
    from retinanet.checkpoint import load_checkpoint
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import train

    shapes = make_shapes_dataset(str(tmp_path / "data"), num_train=8, num_val=4, image_size=64, seed=0)
    weights = {}
    for fold in (False, True):
        cfg = tiny_config(num_classes=4, backbone_norm="frozen_bn", head_convs=1, min_level=3, max_level=6,
                          anchor_sizes=[16.0, 32.0, 64.0, 128.0], min_size=64, max_size=64)
        cfg.data.train_json, cfg.data.train_images = str(shapes.train_json), str(shapes.train_images)
        cfg.data.batch_size, cfg.data.num_workers = 4, 0
        t = cfg.train
        t.iterations, t.warmup_iters, t.lr_steps, t.base_lr, t.device, t.log_every = 3, 1, [2], 0.05, "cpu", 1
        t.fold_frozen_bn = fold
        train(cfg, str(tmp_path / f"fold{fold}"), progress=False)
        ckpt = load_checkpoint(str(tmp_path / f"fold{fold}" / "final.pt"))
        assert ckpt["config"]["train"]["fold_frozen_bn"] is fold
        weights[fold] = ckpt["model"]
    assert list(weights[True]) == list(weights[False])
    torch.manual_seed(cfg.train.seed)  # the engine's initialization
    initial = build_model(cfg).state_dict()
    key = "backbone.layer4.0.conv1.weight"
    assert not torch.allclose(weights[True][key], initial[key], rtol=1e-3)  # it trained
    assert max(float((weights[True][k].float() - weights[False][k].float()).abs().max()) for k in initial) <= 3e-7  # 3.0e-8
