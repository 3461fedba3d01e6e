"""train.ema: the moving average by hand after one and two updates, exact resume, no effect on training."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from retinanet.checkpoint import checkpoint_name, load_checkpoint
from retinanet.config import save_config
from retinanet.ema import ModelEMA, ema_decay
from retinanet.engine import train

from conftest import tiny_config


def test_decay_ramp_values():
    assert ema_decay(0.999, 0) == 0.0
    assert ema_decay(0.999, 1) == pytest.approx(0.999 * 4.998750208e-4, rel=1e-9)  # 1 - e^(-1/2000)
    assert ema_decay(0.999, 2000) == pytest.approx(0.999 * (1 - 1 / math.e), rel=1e-12)
    assert ema_decay(0.999, 100000) == pytest.approx(0.999, rel=1e-12)


class Tiny(nn.Module):
    """One linear layer, one BatchNorm, and a non-statistics buffer that must be copied, not averaged."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("measured", torch.tensor(float("nan")))

    def fill(self, value: float) -> "Tiny":
        with torch.no_grad():
            for p in self.parameters():
                p.fill_(value)
            self.bn.running_mean.fill_(value)
            self.bn.running_var.fill_(value + 1)
            self.bn.num_batches_tracked.fill_(int(value))
            self.measured.fill_(value)
        return self


def test_average_after_one_and_two_updates_equals_the_formula():
    model = Tiny().fill(0.0)
    ema = ModelEMA(model, decay=0.99)
    d1, d2 = 0.99 * (1 - math.exp(-1 / 2000)), 0.99 * (1 - math.exp(-2 / 2000))
    ema.update(model.fill(1000.0))
    expected1 = d1 * 0.0 + (1 - d1) * 1000.0  # 999.5052...
    ema.update(model.fill(-500.0))
    expected2 = d2 * expected1 + (1 - d2) * -500.0
    state = ema.state_dict()
    for key in ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean"):
        assert state[key].flatten().tolist() == pytest.approx([expected2] * state[key].numel(), rel=1e-6, abs=1e-4), key
    var1 = d1 * 1.0 + (1 - d1) * 1001.0
    assert state["bn.running_var"].tolist() == pytest.approx([d2 * var1 + (1 - d2) * -499.0] * 2, rel=1e-6, abs=1e-4)
    assert state["bn.num_batches_tracked"].item() == -500  # copied
    assert state["measured"].item() == -500.0  # copied: an average of the initial NaN would stay NaN
    assert ema.updates == 2
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_a_shorter_ramp():
    model = Tiny().fill(0.0)
    ema = ModelEMA(model, decay=0.5, ramp=1.0)
    ema.update(model.fill(1.0))
    d1 = 0.5 * (1 - math.exp(-1.0))  # 0.31606
    assert ema.state_dict()["fc.bias"].tolist() == pytest.approx([1 - d1] * 2, rel=1e-6)


def test_decay_must_be_below_one_and_the_ramp_positive():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ModelEMA(Tiny(), decay=1.0)
    with pytest.raises(ValueError, match="ramp must be positive"):
        ModelEMA(Tiny(), decay=0.9, ramp=0.0)


# ----------------------------------------------------------------------------------------------
# in the training loop


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from retinanet.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "data"), num_train=8, num_val=4,
                               image_size=64, seed=0)


def train_config(shapes, ema: float, iterations: int = 4):
    """A tiny model with BatchNorm (running statistics for the EMA to average), random scale and flip."""
    cfg = tiny_config(num_classes=4, backbone_norm="bn", head_convs=1, min_level=3, max_level=6,
                      anchor_sizes=[16.0, 32.0, 64.0, 128.0], min_size=64, max_size=64)
    d = cfg.data
    d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
    d.batch_size, d.num_workers, d.aspect_grouping = 4, 0, False
    d.train_sizes, d.flip_prob = [48, 64], 0.5
    t = cfg.train
    t.iterations, t.warmup_iters, t.lr_steps, t.base_lr = iterations, 2, [3], 0.05
    t.checkpoint_every, t.log_every, t.seed, t.deterministic = 2, 1, 0, True
    t.ema = ema
    return cfg


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ema_leaves_training_unchanged_and_final_pt_holds_the_average(shapes, tmp_path):
    train(train_config(shapes, ema=0.0), str(tmp_path / "off"), progress=False)
    train(train_config(shapes, ema=0.9), str(tmp_path / "on"), progress=False)
    off = load_checkpoint(str(tmp_path / "off" / "final.pt"))
    on = load_checkpoint(str(tmp_path / "on" / "final.pt"))
    assert "raw_model" not in off and "ema_updates" not in off  # ema 0: the checkpoint as before
    assert_equal_states(off["model"], on["raw_model"])  # the average never feeds back into training
    assert on["ema_updates"] == 4
    assert not torch.equal(on["model"]["fpn.lateral.0.weight"], on["raw_model"]["fpn.lateral.0.weight"])
    # After 4 updates the ramp is at d_4 = 0.9 (1 - e^(-4/2000)) ~ 0.0018: the average is within
    # about 0.2% of the step from the last weights, and much closer to them than to the first.
    first = load_checkpoint(str(tmp_path / "on" / checkpoint_name(2)))
    key = "head.cls_subnet.predictor.weight"
    dist_last = (on["model"][key] - on["raw_model"][key]).abs().max()
    dist_first = (on["model"][key] - first["raw_model"][key]).abs().max()
    assert dist_last < 0.01 * dist_first


def test_resume_with_ema_is_exact(shapes, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(train_config(shapes, ema=0.9), str(straight), progress=False)
    train(train_config(shapes, ema=0.9, iterations=2), str(resumed), progress=False)
    assert load_checkpoint(str(resumed / checkpoint_name(2)))["ema_updates"] == 2
    train(train_config(shapes, ema=0.9), str(resumed), resume="auto", progress=False)
    a, b = load_checkpoint(str(straight / "final.pt")), load_checkpoint(str(resumed / "final.pt"))
    assert_equal_states(a["model"], b["model"])  # the average
    assert_equal_states(a["raw_model"], b["raw_model"])  # the trained weights
    assert a["ema_updates"] == b["ema_updates"] == 4


def test_negative_ema_is_an_error(shapes, tmp_path):
    with pytest.raises(ValueError, match="train.ema"):
        train(train_config(shapes, ema=-0.1), str(tmp_path / "out"), progress=False)


def test_two_gloo_processes_keep_the_same_average_as_one(shapes, tmp_path):
    """Under DDP every process updates its own copy of the average; rank 0's is evaluated and saved."""
    cfg = train_config(shapes, ema=0.5, iterations=3)
    cfg.train.ema_ramp, cfg.train.deterministic = 1.0, False  # d_t = 0.5 (1 - e^-t): a visible average
    cfg.data.flip_prob, cfg.data.train_sizes = 0.0, []  # same-size images, no augmentation
    cfg.model.backbone_norm = "gn"  # no per-process batch statistics
    cfg.data.val_json, cfg.data.val_images = str(shapes.val_json), str(shapes.val_images)
    config_file = tmp_path / "config.yaml"
    save_config(cfg, str(config_file))
    train(cfg, str(tmp_path / "single"), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "retinanet", "train", str(config_file), "--output", str(tmp_path / "ddp"),
           "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = load_checkpoint(str(tmp_path / "single" / "final.pt")), load_checkpoint(str(tmp_path / "ddp" / "final.pt"))
    for key in ("model", "raw_model"):
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], rtol=1e-4, atol=1e-6), (key, name)
    assert b["ema_updates"] == 3 and b["val"]["AP"] == pytest.approx(a["val"]["AP"], abs=1e-3)
