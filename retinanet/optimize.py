"""Make a RetinaNet cheaper to run, without changing what it detects.

- `fold_batchnorm`: a frozen (or eval-mode) BatchNorm after a conv is a per-channel affine map
  y = scale * x + shift, so it can live in the conv instead: W' = scale * W, b' = scale * b + shift.
  This removes one full read and write of every backbone activation (53 of them in a ResNet-50).
- channels_last: oneDNN's convolutions work in NHWC; with NCHW tensors every conv reorders its
  input and output. With the weights in channels_last, the first conv's output and everything after
  it stay NHWC, and the heads' (B, A*K, H, W) -> (B, H*W*A, K) flattening becomes a free view.
- `autocast`: bfloat16 convolutions (AVX-512 BF16 or AMX on recent Xeons, tensor cores on GPUs).
  Post-processing still decodes boxes in float32 (`boxes.decode`), so reduced precision only moves
  the network's outputs, never the box arithmetic.
- `fold_frozen_bn_for_training`: the same fold for training, recomputed at every forward from the
  unchanged weights, so the conv weights stay the trained parameters and checkpoints keep their keys.

Example:
    >>> model = optimize_for_inference(build_model(cfg).eval())
    >>> with autocast(model, dtype=torch.bfloat16):
    ...     detections = model(images)
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import nn

from .modeling.backbone import FrozenBatchNorm2d


def conv_norm_pairs(model: nn.Module) -> list:
    """Every (parent, conv name, norm name) where a BatchNorm directly follows a conv.

    ResNet blocks name them `convN` / `bnN`; a downsample is `Sequential(conv, norm)`.
    """
    pairs = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                continue
            if name.startswith("bn") and isinstance(children.get("conv" + name[2:]), nn.Conv2d):
                pairs.append((parent, "conv" + name[2:], name))
            elif isinstance(parent, nn.Sequential) and name.isdigit() and int(name) > 0 \
                    and isinstance(children.get(str(int(name) - 1)), nn.Conv2d):
                pairs.append((parent, str(int(name) - 1), name))
    return pairs


def norm_scale_shift(norm: nn.Module) -> tuple:
    """(C,), (C,) float64: the affine map y = scale * x + shift a frozen or eval-mode BatchNorm applies."""
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias, eps = norm.weight, norm.bias, norm.eps
    else:
        if norm.training or norm.running_mean is None:
            raise ValueError(f"cannot fold {norm}: it uses batch statistics (put the model in eval mode first)")
        c = norm.num_features
        weight = norm.weight if norm.weight is not None else torch.ones(c)
        bias = norm.bias if norm.bias is not None else torch.zeros(c)
        eps = norm.eps
    scale = weight.double() / (norm.running_var.double() + eps).sqrt()
    return scale, bias.double() - norm.running_mean.double() * scale


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that follows a conv into that conv, in place; the norm becomes Identity.

    Exact up to float rounding (computed in float64). Only for inference with fixed statistics:
    a FrozenBatchNorm2d anywhere, an nn.BatchNorm2d only in eval mode. Returns how many were folded.
    """
    unfold_frozen_bn(model)
    pairs = conv_norm_pairs(model)
    for parent, conv_name, norm_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        scale, shift = norm_scale_shift(norm)
        scale, shift = scale.to(conv.weight.device), shift.to(conv.weight.device)
        weight = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight.copy_(weight.to(conv.weight.dtype))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        setattr(parent, norm_name, nn.Identity())
    return len(pairs)


class ConvFrozenBatchNorm2d(nn.Conv2d):
    """A conv that also applies the FrozenBatchNorm2d after it: conv(x, W * scale) + shift, one pass.

    What `fold_frozen_bn_for_training` turns a conv into. W stays the parameter: the folded weight is
    recomputed at every forward (a weight-sized product, against a pass over the activation forward
    and backward that the norm would take), and gradients reach W through it. The norm keeps its
    place and buffers (`norm.folded` makes it pass x through), so the state dict is unchanged.
    """

    frozen_norm: FrozenBatchNorm2d  # set by fold_frozen_bn_for_training; not a child module, so no new keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.frozen_norm.scale_shift()  # (C_out,), (C_out,)
        weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)  # keeps the weight's strides
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, weight, bias.to(self.weight.dtype))


def fold_frozen_bn_for_training(model: nn.Module) -> int:
    """Make every conv followed by a FrozenBatchNorm2d apply that norm itself, in place
    (`ConvFrozenBatchNorm2d`). Returns how many pairs were folded.

    The same function as before up to float rounding, in training and in eval mode, with autocast,
    channels_last (`to_channels_last`, before or after) and DDP; one pass over every backbone activation
    less, forward and backward. `unfold_frozen_bn` undoes it; state dicts load into either form.
    """
    count = 0
    for parent, conv_name, norm_name in conv_norm_pairs(model):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if not isinstance(norm, FrozenBatchNorm2d) or norm.folded or type(conv) is not nn.Conv2d:
            continue
        conv.__class__ = ConvFrozenBatchNorm2d
        object.__setattr__(conv, "frozen_norm", norm)  # a plain attribute: the norm stays a child of `parent` only
        norm.folded = True
        count += 1
    return count


def unfold_frozen_bn(model: nn.Module) -> int:
    """Undo `fold_frozen_bn_for_training` in place: plain convs, norms that apply themselves. -> pairs undone."""
    count = 0
    for conv in model.modules():
        if isinstance(conv, ConvFrozenBatchNorm2d):
            conv.frozen_norm.folded = False
            del conv.frozen_norm
            conv.__class__ = nn.Conv2d
            count += 1
    return count


def onednn_unsafe_channels_last(conv: nn.Module) -> bool:
    """Whether oneDNN's channels_last backward-weights kernel for `conv` is known to write out of bounds.

    oneDNN's `jit_1x1` convolution, backward weights, NHWC, stride > 1 ("reduce to unit stride") writes
    past its workspace when the input has fewer channels than its channel block (16 with AVX-512, 8 with
    AVX2): heap corruption ("double free or corruption") seen on AMD Zen 4 with torch 2.13, SIGSEGV or
    silently wrong gradients on Intel, a hang or SIGSEGV on AMD Zen 3 (AVX2: 4 -> 16 channels fails,
    8 -> 16 and 16 -> 32 run) (uxlfoundation/oneDNN#6035, open). 1x1 stride-1, 3x3 and NCHW
    convolutions take other kernels and are fine. A ResNet downsample conv with `backbone_width` <= 8
    (the tests' tiny models) is such a layer.

    One rule for every ISA, fewer than 16 input channels: that is the AVX-512 block, and on AVX2 it
    also covers the 8..15 channels that would be safe there, at the cost of a few small NCHW convs,
    because the ISA oneDNN dispatches to is its own choice at run time (ONEDNN_MAX_CPU_ISA, the CPU).
    """
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
            and conv.in_channels < 16)


def _run_nchw_on_cpu(conv: nn.Module, args: tuple):
    """Forward pre-hook: on the CPU, the conv's weight and input in NCHW (so oneDNN takes its NCHW kernel)."""
    x = args[0]
    if x.device.type != "cpu":
        return None
    if conv.weight.stride() != _nchw_strides(conv.weight.shape):
        conv.weight.data = _nchw(conv.weight.data)
    return (x.contiguous(),)


def _nchw_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """`t` with NCHW strides. `.contiguous()` is not enough for a 1x1 kernel: its channels_last strides
    (C, 1, C, C) already count as contiguous, and PyTorch would still pick NHWC for the conv."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _grad_nchw(conv: nn.Module, args: tuple, output):
    """Forward hook: the gradient that reaches the conv's backward in NCHW too (an expanded or NHWC
    gradient, e.g. from `.sum()`, would lead oneDNN back to its NHWC kernel)."""
    if output.device.type == "cpu" and output.requires_grad:
        output.register_hook(lambda grad: grad.contiguous())
    return None


def to_channels_last(model: nn.Module, log=None) -> nn.Module:
    """`model.to(memory_format=torch.channels_last)`, except the convolutions that oneDNN's defect
    (`onednn_unsafe_channels_last`) makes unsafe to train in channels_last: those run NCHW on the CPU
    (a forward pre-hook; the rest of the network stays NHWC). In place; returns `model`.
    `log`: called once with a one-line notice when such layers are found.
    """
    model.to(memory_format=torch.channels_last)
    unsafe = [(name, m) for name, m in model.named_modules() if onednn_unsafe_channels_last(m)]
    for _, conv in unsafe:
        if not getattr(conv, "_nchw_hook", False):
            conv.register_forward_pre_hook(_run_nchw_on_cpu)
            conv.register_forward_hook(_grad_nchw)
            conv._nchw_hook = True
        conv.weight.data = _nchw(conv.weight.data)
    if unsafe and log is not None:
        log(f"channels_last: {len(unsafe)} 1x1 strided conv(s) with < 16 input channels stay NCHW on the CPU "
            f"(oneDNN defect uxlfoundation/oneDNN#6035): {', '.join(name for name, _ in unsafe[:4])}"
            + (", ..." if len(unsafe) > 4 else ""))
    return model


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Put `model` in eval mode, fold its BatchNorms into the convs and store its weights channels_last.

    In place (returns the same module). The result is for inference only: its state dict no longer
    has the BatchNorm buffers, so save checkpoints from the original model.
    """
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    if channels_last:
        to_channels_last(model)
    return model


def autocast(model: nn.Module, dtype: Optional[torch.dtype] = torch.bfloat16):
    """Context for reduced-precision inference on the model's device (a no-op for dtype None or float32).

    bfloat16 on CPU runs the convolutions on AVX-512 BF16 / AMX through oneDNN; float16 and bfloat16
    on CUDA use tensor cores.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.lru_cache(maxsize=None)
def compiler_works(device_type: str) -> bool:
    """Whether torch.compile (inductor) can build and run a kernel on this device type here
    (it needs a C++ compiler on CPU, Triton on GPU)."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) + 1.0)
        return bool(fn(torch.ones(4, device=device_type)).eq(2.0).all())
    except Exception:  # no compiler, unsupported platform, ...: stay eager
        return False


def compile_network(model: nn.Module, *, freezing: bool = True) -> bool:
    """Compile the backbone, FPN and heads in place with torch.compile (inductor).

    With `freezing`, inductor treats the weights as constants: it pre-packs them for oneDNN and
    fuses conv + bias + ReLU and conv + residual add into single kernels (inference under
    torch.no_grad only). Every new input size compiles again, so this pays for fixed-size inputs.
    Returns False and leaves the model eager where torch.compile does not work (e.g. no compiler).
    """
    device_type = next(model.parameters()).device.type
    if not compiler_works(device_type):
        return False
    for part in (model.backbone, model.fpn, model.head):
        part.compile(options={"freezing": freezing})
    return True
