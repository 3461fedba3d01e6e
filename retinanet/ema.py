"""An exponential moving average (EMA) of the weights, with YOLOX's warm-up ramp (`train.ema`).

After optimizer step t (t = 1, 2, ...) every averaged tensor becomes

    ema = d_t * ema + (1 - d_t) * weight,    d_t = decay * (1 - exp(-t / ramp))

(YOLOX, yolox/utils/ema.py: `decay * (1 - exp(-updates / 2000))`, ramp 2000, the default of
`train.ema_ramp`). Early on d_t is near 0 and the average follows the weights; after about 3 ramps
d_t is within 5% of `decay`. The average covers roughly the last 1 / (1 - d_t) steps, so a run much
shorter than the ramp averages little: at step 500 with ramp 2000, d_t = 0.22 decay. The average starts
from the weights before the first step, as YOLOX's does.

Averaged: every parameter, and the BatchNorm running mean and variance (YOLOX averages every
floating-point tensor of the state dict; MMDetection's ExpMomentumEMA does so with
`update_buffers=True`, which its YOLOX configs set). Every other buffer is copied from the trained
model: BatchNorm's `num_batches_tracked` counter, FrozenBatchNorm's constant statistics and the
IoU-balanced loss's measured `w_loc` (NaN until measured, which an average would keep forever).

MMDetection's ExpMomentumEMA differs in two small ways: it copies the weights at the first update
instead of starting from the initial weights, and its update k (k = 1, 2, ...) after that uses
exp(-(k + 1) / gamma), i.e. t + 1 where YOLOX and this module use t.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

RAMP = 2000.0  # YOLOX: updates over which d_t rises to (1 - 1/e) decay


def ema_decay(decay: float, updates: int, ramp: float = RAMP) -> float:
    """d_t = decay * (1 - exp(-updates / ramp)): the weight of the old average at update `updates` (1-based)."""
    return decay * (1.0 - math.exp(-updates / ramp))


def _averaged_names(model: nn.Module) -> set:
    """State-dict keys the EMA averages: parameters and BatchNorm running statistics."""
    names = {name for name, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            names |= {f"{prefix}.{b}" if prefix else b for b in ("running_mean", "running_var")}
    return names


class ModelEMA:
    """The moving average of `model`'s weights, as a model of its own (eval mode, no gradients).

    Args:
        model: the model being trained (unwrapped from DDP); the average starts from a copy of it.
        decay: the decay the ramp rises to, in [0, 1), e.g. 0.9998 (YOLOX) or 0.999.
        ramp: the ramp's time constant in updates (YOLOX: 2000).
        updates: updates already made (resuming; the average itself is then loaded with
            `load_state_dict`).

    Example:
        >>> ema = ModelEMA(model, decay=0.999)
        >>> optimizer.step(); ema.update(model)
        >>> ema.model(images)  # detections with the averaged weights
    """

    def __init__(self, model: nn.Module, decay: float, ramp: float = RAMP, updates: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if not ramp > 0:
            raise ValueError(f"EMA ramp must be positive, got {ramp}")
        self.decay, self.ramp, self.updates = decay, ramp, updates
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._averaged = _averaged_names(self.model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update after an optimizer step: average the parameters and BatchNorm statistics, copy the rest."""
        self.updates += 1
        d = ema_decay(self.decay, self.updates, self.ramp)
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if name in self._averaged:
                value.mul_(d).add_(source[name].detach(), alpha=1.0 - d)
            else:
                value.copy_(source[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
