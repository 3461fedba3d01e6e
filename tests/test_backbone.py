import pytest
import torch
from torch import nn

from retinanet.modeling.backbone import FPN, FrozenBatchNorm2d, ResNet
from retinanet.convert import load_backbone_weights


def test_resnet50_names_and_shapes_match_torchvision():
    sd = ResNet("resnet50").state_dict()
    # torchvision's resnet50 has 320 entries: ours lacks fc.weight, fc.bias and 53 num_batches_tracked
    assert len(sd) == 320 - 2 - 53
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.1.running_var"].shape == (256,)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert sd["layer4.2.bn3.weight"].shape == (2048,)
    assert "layer3.5.conv3.weight" in sd and "layer3.6.conv1.weight" not in sd


def test_resnext_groups():
    sd = ResNet("resnext101_32x8d", norm="frozen_bn").state_dict()
    assert sd["layer1.0.conv2.weight"].shape == (256, 8, 3, 3)  # width 256 in 32 groups of 8
    assert "layer3.22.conv1.weight" in sd


def test_frozen_bn_equals_batchnorm_in_eval():
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)


def _random_frozen_bn(channels: int) -> FrozenBatchNorm2d:
    bn = FrozenBatchNorm2d(channels, eps=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g), bn.bias.uniform_(-0.2, 0.2, generator=g)
        bn.running_mean.uniform_(-0.2, 0.2, generator=g), bn.running_var.uniform_(0.5, 2.0, generator=g)
    return bn


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_frozen_bn_rounds_as_torchvision_twice(layout):
    bn = _random_frozen_bn(64)
    x = (50 * torch.randn(2, 64, 9, 11, generator=torch.Generator().manual_seed(1))).contiguous(memory_format=layout)
    scale, shift = (t.reshape(1, -1, 1, 1) for t in bn.scale_shift())
    y = bn(x)
    assert torch.equal(y, x * scale + shift) and y.is_contiguous(memory_format=layout)
    exact = x.double() * scale.double() + shift.double()
    assert ((y - exact).abs() <= 2.0 ** -23 * (x.double() * scale.double()).abs() + 2.0 ** -24 * exact.abs()).all()


def test_frozen_bn_is_torchvisions_to_the_bit():
    ops = pytest.importorskip("torchvision.ops")
    ours = _random_frozen_bn(64)
    theirs = ops.FrozenBatchNorm2d(64, eps=0.0)
    theirs.load_state_dict(ours.state_dict())
    x = 50 * torch.randn(2, 64, 9, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(x), theirs(x))


def test_frozen_stages_have_no_gradients_and_bn_stays_in_eval():
    net = ResNet("resnet18", width=8, norm="bn", frozen_stages=2).train()
    assert not any(p.requires_grad for p in net.conv1.parameters())
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    assert not net.bn1.training and not net.layer1[0].bn1.training and net.layer2[0].bn1.training


def test_frozen_stages_keep_their_statistics_after_sync_batchnorm_conversion():
    # train.sync_bn converts every BatchNorm2d to SyncBatchNorm (engine.py); the frozen stages must
    # still not update their running statistics in a training step, and the trained stages must.
    net = nn.SyncBatchNorm.convert_sync_batchnorm(ResNet("resnet18", width=8, norm="bn", frozen_stages=2))
    assert isinstance(net.layer1[0].bn1, nn.SyncBatchNorm) and isinstance(net.layer2[0].bn1, nn.SyncBatchNorm)
    net.train()
    assert not net.bn1.training and not net.layer1[1].bn2.training and net.layer2[0].bn1.training
    frozen = [net.bn1, net.layer1[0].bn1, net.layer1[1].bn2]
    trained = [net.layer2[0].bn1, net.layer2[0].downsample[1], net.layer4[1].bn2]
    before = [m.running_mean.clone() for m in frozen + trained]
    # one training step; without a process group SyncBatchNorm's training forward is BatchNorm's
    sum(c.sum() for c in net(torch.randn(2, 3, 64, 64))).backward()
    after = [m.running_mean for m in frozen + trained]
    assert [torch.equal(b, a) for b, a in zip(before, after)] == [True] * 3 + [False] * 3


def test_load_torchvision_style_checkpoint(tmp_path):
    src = ResNet("resnet18", width=8, norm="bn")
    state = src.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(10, 64), torch.randn(10)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state, path)
    dst = ResNet("resnet18", width=8, norm="frozen_bn")
    missing, unexpected = load_backbone_weights(dst, str(path), verbose=False)
    assert missing == [] and unexpected == []
    assert torch.equal(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert torch.equal(dst.layer2[0].downsample[1].running_mean, src.layer2[0].downsample[1].running_mean)


def test_load_wrong_depth_is_a_clear_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ResNet("resnet18", width=8).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(ResNet("resnet34", width=16), str(path), verbose=False)


def test_fpn_shapes_and_p6_source():
    c = [torch.randn(1, 8, 64, 64), torch.randn(1, 16, 32, 32), torch.randn(1, 32, 16, 16), torch.randn(1, 64, 8, 8)]
    fpn = FPN([8, 16, 32, 64], channels=16, min_level=3, max_level=7)
    outs = fpn(c)
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert fpn.extra[0].in_channels == 64  # P6 from C5 (paper)
    assert FPN([8, 16, 32, 64], channels=16, p6_from="p5").extra[0].in_channels == 16


def test_fpn_p6_by_subsampling_p5():
    c = [torch.randn(1, 8, 64, 64), torch.randn(1, 16, 32, 32), torch.randn(1, 32, 16, 16), torch.randn(1, 64, 8, 8)]
    fpn = FPN([8, 16, 32, 64], channels=16, min_level=2, max_level=6, p6_from="pool")
    outs = fpn(c)
    assert [tuple(o.shape[-2:]) for o in outs] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])  # every other pixel of P5
    assert len(fpn.extra) == 0  # no parameters beyond P2-P5's
    assert sum(p.numel() for p in fpn.parameters()) == sum(
        p.numel() for p in FPN([8, 16, 32, 64], channels=16, min_level=2, max_level=5).parameters())
    odd = FPN([8, 16, 32, 64], 16, 2, 6, "pool")([x[..., :-1, :-1] for x in c])  # 7 x 7 P5 -> 4 x 4 P6
    assert odd[4].shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="P7"):
        FPN([8, 16, 32, 64], channels=16, min_level=2, max_level=7, p6_from="pool")
