"""The one "does torchvision import and run" probe that NMS, RoIAlign and RoI pooling share."""

import sys

import pytest
import torch

from retinanet.ops import nms as nms_module
from retinanet.ops.nms import batched_nms
from retinanet.ops.roi_align import roi_align, roi_pool
from retinanet.ops.torchvision_ops import torchvision_op

NAMES = ("nms", "roi_align", "roi_pool")


@pytest.fixture
def fresh_probe():
    """Forget the cached probes before and after, so that the other tests see the real environment."""
    torchvision_op.cache_clear()
    nms_module.torchvision_batched_nms.cache_clear()
    yield
    torchvision_op.cache_clear()
    nms_module.torchvision_batched_nms.cache_clear()


def test_without_torchvision_every_op_falls_back_to_ours(fresh_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    assert [torchvision_op(name) for name in NAMES] == [None, None, None]
    assert nms_module.torchvision_batched_nms() is None
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
    assert batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64), 0.5).tolist() == [0, 2]
    f = torch.arange(16.0).view(1, 1, 4, 4)
    assert roi_align(f, torch.tensor([[0.0, 0, 0, 2, 2]]), 1, 1.0, 1).item() == 5.0  # one sample at (1, 1)
    assert roi_pool(f, torch.tensor([[0.0, 0, 0, 2, 2]]), 1).item() == 10.0  # max of rows, columns 0..2
    for backend, call in (("NMS", lambda: batched_nms(boxes, torch.ones(3), torch.zeros(3), 0.5, "torchvision")),
                          ("roi_align", lambda: roi_align(f, torch.zeros(1, 5), 1, backend="torchvision"))):
        with pytest.raises(RuntimeError, match=f"torchvision {backend} requested but torchvision is not importable"):
            call()


def test_a_torchvision_whose_kernels_do_not_run_counts_as_absent(fresh_probe, monkeypatch):
    """Importable but broken (compiled ops built for another torch): the probe runs each kernel once."""
    import types

    def broken(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.roi_pool = broken
    package = types.ModuleType("torchvision")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    assert [torchvision_op(name) for name in NAMES] == [None, None, None]
    ops.nms = lambda boxes, scores, threshold: torch.arange(boxes.shape[0])  # one that runs
    torchvision_op.cache_clear()
    assert torchvision_op("nms") is ops.nms and torchvision_op("roi_align") is None


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown torchvision op 'batched_nms'"):
        torchvision_op("batched_nms")
