import pytest
import torch

from retinanet.config import Config

# Tests use tiny tensors, where one thread is faster than two and immune to a busy machine
# (with more threads than free cores, every small op waits on the OpenMP barrier).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(num_classes: int = 3, **model_overrides) -> Config:
    """A RetinaNet small enough for unit tests: ResNet-18 layout with 8-channel stem, 16-channel FPN/heads."""
    cfg = Config()
    m = cfg.model
    m.num_classes = num_classes
    m.backbone, m.backbone_width, m.backbone_norm, m.frozen_stages = "resnet18", 8, "bn", 0
    m.fpn_channels = m.head_channels = 16
    m.head_convs = 2
    m.min_size, m.max_size = 128, 192
    for k, v in model_overrides.items():
        setattr(m, k, v)
    return cfg


def tiny_deepmask_config() -> Config:
    """A DeepMask (one class, one scale, 32 px windows, 8 features) small enough for unit tests."""
    from retinanet.config import config_from_dict

    return config_from_dict({"model": {"arch": "deepmask", "num_classes": 1, "backbone": "resnet18",
                                       "backbone_width": 8, "frozen_stages": 0, "min_size": 64, "max_size": 64,
                                       "segprop_window": 32, "segprop_context": 16, "segprop_features": 8,
                                       "segprop_head_dim": 16, "segprop_mask_size": 8,
                                       "segprop_scales": [0.0, 0.0, 1.0]},
                             "data": {"masks": True}})


def train_steps(model, images, targets, steps: int, lr: float = 0.05) -> list:
    """Plain SGD steps on a fixed batch; returns the total loss before each step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    return history
