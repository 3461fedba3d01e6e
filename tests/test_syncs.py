"""No host-device synchronization in RetinaNet's training forward and backward.

`SyncRecorder` lists the ATen ops that would make the CPU wait for a GPU (values read back,
data-dependent shapes); they are dispatched the same way on the CPU, so these checks run here.
"""

import pytest
import torch

from retinanet.modeling import build_model
from retinanet.syncs import SyncRecorder

from conftest import tiny_config


def test_the_recorder_sees_each_kind_of_sync():
    x = torch.rand(6)
    mask = x > 0.5
    tolist = torch.Tensor.tolist
    with SyncRecorder() as syncs:
        x.sum().item()
        if x[0] > 2:
            pass
        x[mask]
        x[mask] = 0.0
        torch.nonzero(x)
        x.tolist()
        x[torch.tensor([1, 2])]  # integer indexing: no sync
        torch.where(mask, x, 0.0)  # no sync
        torch.repeat_interleave(torch.tensor([1, 2]), 2)  # a Python int repeat: the output size is known
    assert [name for name, _ in syncs.records] == [
        "_local_scalar_dense", "_local_scalar_dense", "index (boolean mask)", "index_put_ (boolean mask)", "nonzero",
        "tolist"]
    assert syncs.records[0][1].startswith(__file__)  # the caller is named
    assert torch.Tensor.tolist is tolist  # restored after the block


def _batch():
    images = [torch.rand(3, 128, 160) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70], [30, 20, 90, 100]]), "labels": torch.tensor([0, 2]),
                "iscrowd": torch.tensor([False, True])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no boxes
               {"boxes": torch.tensor([[5.0, 5, 40, 40], [5, 5, 40, 40]]), "labels": torch.tensor([1, 0])}]  # a tie
    return images, targets


@pytest.mark.parametrize("loss", [{}, {"box": "giou"}, {"cls": "ce"}, {"cls": "fl_star"}, {"cls": "softmax_focal"},
                                  {"iou_balanced_cls": True}, {"iou_balanced_loc": True},
                                  {"iou_balanced_loc": True, "w_loc": "3.0"},
                                  {"iou_balanced_loc": True, "loc_normalize": True}])
def test_training_forward_and_backward_never_wait_for_the_device(loss):
    """The path a GPU takes (on the CPU the box loss picks the foreground anchors by index: cheaper there)."""
    cfg = tiny_config()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    model = build_model(cfg).train()
    model.foreground_by_index = False
    images, targets = _batch()
    for _ in range(2):  # the first step (w_loc: auto is measured there) and a later one
        with SyncRecorder() as syncs:
            losses = model(images, targets)
            sum(losses.values()).backward()
        assert syncs.records == []
        assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("loss", [{}, {"box": "giou"}, {"iou_balanced_cls": True}, {"iou_balanced_loc": True},
                                  {"iou_balanced_loc": True, "loc_normalize": True}, {"cls": "softmax_focal"}])
def test_foreground_by_mask_and_by_index_give_the_same_losses_and_gradients(loss):
    """The GPU's selection (every anchor, masked) and the CPU's (the foreground anchors' indices)."""
    cfg = tiny_config()
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    images, targets = _batch()
    results = []
    for by_index in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        model.foreground_by_index = by_index
        for _ in range(2):  # w_loc: auto measured at the first step, used at the second
            model.zero_grad()
            losses = model(images, targets)
            sum(losses.values()).backward()
        results.append(({k: float(v) for k, v in losses.items()}, [p.grad.clone() for p in model.parameters()]))
    (mask_losses, mask_grads), (index_losses, index_grads) = results
    assert index_losses == pytest.approx(mask_losses, rel=1e-6) and index_losses["box"] > 0
    for a, b in zip(mask_grads, index_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_ohem_is_the_exception():
    """OHEM's NMS keeps a data-dependent number of anchors: it has to read them back."""
    cfg = tiny_config()
    cfg.loss.cls = "ohem"
    model = build_model(cfg).train()
    with SyncRecorder(where=False) as syncs:
        sum(model(*_batch()).values()).backward()
    assert {"nonzero", "index (boolean mask)"} <= {name for name, _ in syncs.records}


def _engine_syncs(shapes, tmp_path, iterations: int) -> dict:
    """{(op, file, function): count} of the syncs `train` issues outside the data pipeline (which runs
    on the CPU, in loader workers on a GPU run)."""
    from retinanet.engine import train

    cfg = tiny_config(num_classes=4, backbone_norm="gn", head_convs=1, min_level=3, max_level=6,
                      anchor_sizes=[16.0, 32.0, 64.0, 128.0], min_size=64, max_size=64)
    d, t = cfg.data, cfg.train
    d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
    d.batch_size, d.num_workers, d.aspect_grouping = 4, 0, False
    t.iterations, t.accumulate, t.clip_grad_norm, t.ema, t.device = iterations, 2, 10.0, 0.99, "cpu"
    t.checkpoint_every = t.log_every = 100
    with SyncRecorder() as syncs:
        train(cfg, str(tmp_path / f"run{iterations}"), progress=False)
    counts = {}
    for name, caller in syncs.records:
        if "/retinanet/data/" not in caller:
            key = (name, caller.split(":")[0].rsplit("/", 1)[-1], caller.rsplit(" in ", 1)[-1])
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """Two more iterations (of two micro-batches each, gradient clipping and EMA on) add exactly two
    syncs: the engine reading each step's losses to check and log them. The model (on the path a GPU
    takes), the optimizer, clipping and the EMA add none."""
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.modeling import RetinaNet

    monkeypatch.setattr(RetinaNet, "foreground_by_index", False)

    shapes = make_shapes_dataset(str(tmp_path / "data"), num_train=8, num_val=2, image_size=64, seed=0)
    short, long = _engine_syncs(shapes, tmp_path, 2), _engine_syncs(shapes, tmp_path, 4)
    added = {key: long.get(key, 0) - short.get(key, 0) for key in long.keys() | short.keys()}
    assert {key: n for key, n in added.items() if n} == {("tolist", "engine.py", "train"): 2}
