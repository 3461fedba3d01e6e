import pytest
import torch

from retinanet.ops.nms import native_batched_nms, reference_nms, torchvision_batched_nms


def _random_boxes(n, seed, spread=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * spread
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_hand_example():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    groups = torch.zeros(4, dtype=torch.int64)
    # box 3 (0.95) suppresses box 0 (IoU 0.9); box 1 vs 3: inter 8*9=72, union 100+90-72=118 -> 0.61 > 0.5
    assert native_batched_nms(boxes, scores, groups, 0.5).tolist() == [3, 2]
    # In different groups nothing is suppressed
    assert native_batched_nms(boxes, scores, torch.arange(4), 0.5).tolist() == [3, 0, 1, 2]


def test_chain_needs_greedy_order():
    # a suppresses b, b would suppress c, but b is gone so c survives: greedy keeps a and c
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert native_batched_nms(boxes, scores, torch.zeros(3, dtype=torch.int64), 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [7, 512])
def test_native_equals_reference_loop(seed, block):
    boxes, scores, groups = _random_boxes(150, seed)
    for thr in (0.3, 0.5, 0.7):
        ours = native_batched_nms(boxes, scores, groups, thr, block=block)
        assert ours.tolist() == reference_nms(boxes, scores, groups, thr).tolist()


def test_empty():
    assert native_batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


@pytest.mark.skipif(torchvision_batched_nms() is None, reason="torchvision is not importable here")
def test_native_equals_torchvision():
    tv = torchvision_batched_nms()
    for seed in range(5):
        boxes, scores, groups = _random_boxes(2000, seed, spread=300)
        assert native_batched_nms(boxes, scores, groups, 0.5).tolist() == tv(boxes, scores, groups, 0.5).tolist()


@pytest.mark.skipif(torchvision_batched_nms() is None, reason="torchvision is not importable here")
def test_torchvision_one_call_equals_its_per_group_loop():
    from torchvision.ops import batched_nms

    for seed in range(3):
        boxes, scores, groups = _random_boxes(3000, seed, spread=300)  # > 1000 boxes: torchvision loops per group
        groups = groups * 300  # large group ids: offsets far beyond float32's exact range
        assert torchvision_batched_nms()(boxes, scores, groups, 0.5).tolist() == \
            batched_nms(boxes, scores, groups, 0.5).tolist()


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_quota_stops_early_with_the_full_result_as_prefix(threshold):
    g = torch.Generator().manual_seed(3)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 40], dim=1)
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, 3, (n,), generator=g)
    kinds = (torch.rand(n, generator=g) < 0.05).long()  # a few "positives"
    full = native_batched_nms(boxes, scores, groups, threshold)
    for quota in ([40], [40, 5], [2000, 1000]):
        k = kinds if len(quota) == 2 else torch.zeros_like(kinds)
        part = native_batched_nms(boxes, scores, groups, threshold, block=64, kinds=k, quota=quota)
        assert set(part.tolist()) <= set(full.tolist())
        for grp in range(3):
            f, p = full[groups[full] == grp], part[groups[part] == grp]
            assert p.tolist() == f[:len(p)].tolist()  # a prefix of the full result, by score
            for kind, q in enumerate(quota):
                want = f[k[f] == kind][:q]
                assert p[k[p] == kind][:q].tolist() == want.tolist()  # every box the quota asks for
        if quota == [40]:
            assert len(part) < len(full)  # it did stop early
