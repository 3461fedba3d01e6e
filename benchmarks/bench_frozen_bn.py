"""FrozenBatchNorm2d's y = x * scale + shift evaluated three ways, alone and inside an R50-FPN Faster
R-CNN; interleaved rounds, medians:

- "addcmul": torch.addcmul(shift, x, scale), one pass, one rounding (a fused multiply-add): what the
  package used before 2026-11-27;
- "mul+add": x * scale + shift, torchvision's FrozenBatchNorm2d: two passes, two roundings, two fresh
  tensors;
- "mul, add_": (x * scale).add_(shift), the package's now: torchvision's two roundings (its features
  to the bit), one fresh tensor.

    python benchmarks/bench_frozen_bn.py [--rounds 5] [--threads 2] [--skip-model]

1. The norm alone on the 53 activations of a ResNet-50 (shapes recorded from a forward pass): a training
   step's forward + backward (batch 2, 512 x 512) and an inference forward (batch 1, 800 x 1088), NCHW
   and channels_last.
2. The whole detector, plain (BatchNorm not folded): one 800 x 1066 inference and a training step of
   2 images of 512 x 512 (forward + backward), NCHW and channels_last (`train.channels_last`).
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_report, median_ms, time_interleaved  # noqa: E402  (puts the repository on sys.path)
from retinanet.convert import torchvision_faster_rcnn_config  # noqa: E402
from retinanet.modeling import build_model  # noqa: E402
from retinanet.modeling.backbone import FrozenBatchNorm2d, ResNet  # noqa: E402
from retinanet.optimize import to_channels_last  # noqa: E402

FORMULAS = {
    "addcmul": lambda x, scale, shift: torch.addcmul(shift, x, scale),
    "mul+add": lambda x, scale, shift: x * scale + shift,
    "mul, add_": lambda x, scale, shift: (x * scale).add_(shift),
}


def use_formula(model: torch.nn.Module, name: str) -> None:
    """Make every FrozenBatchNorm2d of `model` evaluate its affine map with FORMULAS[name]."""
    def forward(self, x):
        scale, shift = self.scale_shift()
        return FORMULAS[name](x, scale.to(x.dtype).reshape(1, -1, 1, 1), shift.to(x.dtype).reshape(1, -1, 1, 1))

    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.forward = types.MethodType(forward, m)


def interleaved(fns: dict, rounds: int) -> dict:
    """One untimed call of each, then `rounds` rounds A B C A B C ...: {name: median ms}."""
    return {name: median_ms(t) for name, t in time_interleaved(fns, repeats=rounds).items()}


def load() -> str:
    return machine_report("cpu").splitlines()[1].split(": ")[1]


def line(title: str, ms: dict, digits: int) -> str:
    base = ms["addcmul"]
    return f"  {title}: " + ", ".join(f"{name} {t:.{digits}f} (x{t / base:.3f})" for name, t in ms.items())


def norm_shapes(batch: int, height: int, width: int) -> list:
    """The input shape of every FrozenBatchNorm2d of a ResNet-50 at this image size."""
    net, shapes = ResNet("resnet50", frozen_stages=0), []
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        net(torch.rand(batch, 3, height, width))
    return shapes


def bench_alone(rounds: int) -> None:
    print("\n1. FrozenBatchNorm2d alone, the 53 norms of a ResNet-50 (median ms per pass over all 53; "
          "x: time / addcmul's)")
    for title, shapes, train in (("training step, 2 x 512 x 512, forward + backward", norm_shapes(2, 512, 512), True),
                                 ("inference, 1 x 800 x 1088, forward", norm_shapes(1, 800, 1088), False)):
        for layout in (torch.contiguous_format, torch.channels_last):
            inputs = []
            for shape in shapes:
                x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(train)
                scale, shift = torch.rand(1, shape[1], 1, 1) + 0.5, torch.rand(1, shape[1], 1, 1) - 0.5
                inputs.append((x, scale, shift, torch.randn_like(x) if train else None))

            def run(formula):
                def go():
                    with torch.set_grad_enabled(train):
                        for x, scale, shift, grad in inputs:
                            y = formula(x, scale, shift)
                            if train:
                                torch.autograd.grad(y, x, grad)
                return go

            ms = interleaved({name: run(f) for name, f in FORMULAS.items()}, rounds)
            name = "channels_last" if layout == torch.channels_last else "NCHW"
            print(line(f"{title}, {name:13s}", ms, 1) + f"   load {load()}")


def bench_model(rounds: int) -> None:
    print("\n2. R50-FPN Faster R-CNN (torchvision's layout, eps 0), plain: BatchNorm not folded "
          "(median ms; x: time / addcmul's)")
    torch.manual_seed(0)
    cfg = torchvision_faster_rcnn_config(bn_eps=0.0)
    reference = build_model(cfg)
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    models = {}
    for channels_last in (False, True):
        for formula in FORMULAS:
            model = build_model(cfg)
            model.load_state_dict(reference.state_dict())
            use_formula(model, formula)
            models[(formula, channels_last)] = to_channels_last(model) if channels_last else model
    image = torch.rand(3, 600, 800)  # resized to 800 x 1066
    images = [torch.rand(3, 512, 512), torch.rand(3, 512, 512)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 200.0, 260.0], [300.0, 100.0, 480.0, 400.0]]),
                "labels": torch.tensor([0, 17])},
               {"boxes": torch.tensor([[50.0, 60.0, 450.0, 380.0]]), "labels": torch.tensor([2])}]

    def infer(model):
        def go():
            model.eval()
            with torch.no_grad():
                model([image])
        return go

    def step(model):
        def go():
            model.train()
            sum(model(images, targets).values()).backward()
            model.zero_grad(set_to_none=True)
        return go

    for title, make in (("inference, 800 x 1066", infer), ("training step, 2 x 512 x 512", step)):
        ms = interleaved({key: make(model) for key, model in models.items()}, rounds)
        for channels_last in (False, True):
            layout = "channels_last" if channels_last else "NCHW"
            print(line(f"{title}, {layout:13s}", {f: ms[(f, channels_last)] for f in FORMULAS}, 0))
        print(f"  load average after: {load()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-model", action="store_true", help="only the norm alone (part 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"python benchmarks/bench_frozen_bn.py {' '.join(sys.argv[1:])}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(machine_report("cpu"))
    bench_alone(args.rounds)
    if not args.skip_model:
        bench_model(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
