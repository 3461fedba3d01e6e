"""FrozenBatchNorm2d's two formulas (`model.frozen_bn_formula`): "fused" (torch.addcmul: one pass, one
rounding) against "torchvision" (x * scale + shift: two passes, two roundings, torchvision's results to
the bit), alone and inside an R50-FPN Faster R-CNN; interleaved rounds, medians.

    python benchmarks/bench_frozen_bn.py [--rounds 5] [--threads 2] [--skip-model]

1. The norm alone on the 53 activations of a ResNet-50 (shapes recorded from a forward pass): a training
   step's forward + backward (batch 2, 512 x 512) and an inference forward (batch 1, 800 x 1088), NCHW
   and channels_last.
2. The whole detector, plain (BatchNorm not folded): one 800 x 1066 inference and a training step of
   2 images of 512 x 512 (forward + backward), NCHW and channels_last (`train.channels_last`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_report  # noqa: E402  (puts the repository on sys.path)
from retinanet.convert import torchvision_faster_rcnn_config  # noqa: E402
from retinanet.modeling import build_model  # noqa: E402
from retinanet.modeling.backbone import FrozenBatchNorm2d, ResNet  # noqa: E402
from retinanet.optimize import to_channels_last  # noqa: E402

FORMULAS = FrozenBatchNorm2d.FORMULAS  # ("fused", "torchvision")


def interleaved(fns: dict, rounds: int) -> dict:
    """One untimed call of each, then `rounds` rounds A B A B ...: {name: median ms}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


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
    print("\n1. FrozenBatchNorm2d alone, the 53 norms of a ResNet-50 (median ms per pass over all 53)")
    for title, shapes, train in (("training step, 2 x 512 x 512, forward + backward", norm_shapes(2, 512, 512), True),
                                 ("inference, 1 x 800 x 1088, forward", norm_shapes(1, 800, 1088), False)):
        for layout in (torch.contiguous_format, torch.channels_last):
            inputs = []
            for shape in shapes:
                norm = FrozenBatchNorm2d(shape[1])
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.2, 0.2)
                    norm.running_mean.uniform_(-0.2, 0.2), norm.running_var.uniform_(0.5, 2.0)
                x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_(train)
                inputs.append((norm, x, torch.randn_like(x) if train else None))

            def run(formula):
                def go():
                    with torch.set_grad_enabled(train):
                        for norm, x, grad in inputs:
                            norm.formula = formula
                            y = norm(x)
                            if train:
                                torch.autograd.grad(y, x, grad)
                return go

            ms = interleaved({f: run(f) for f in FORMULAS}, rounds)
            name = "channels_last" if layout == torch.channels_last else "NCHW"
            print(f"  {title}, {name:13s}: fused {ms['fused']:7.1f}, torchvision {ms['torchvision']:7.1f} "
                  f"(+{ms['torchvision'] - ms['fused']:.1f} ms, x{ms['torchvision'] / ms['fused']:.2f})   "
                  f"load {machine_report('cpu').splitlines()[1].split(': ')[1]}")


def bench_model(rounds: int) -> None:
    print("\n2. R50-FPN Faster R-CNN (torchvision's layout, eps 0), plain: BatchNorm not folded (median ms)")
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
            cfg.model.frozen_bn_formula = formula
            model = build_model(cfg)
            model.load_state_dict(reference.state_dict())
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
            fused, tv = ms[("fused", channels_last)], ms[("torchvision", channels_last)]
            print(f"  {title}, {'channels_last' if channels_last else 'NCHW':13s}: fused {fused:7.0f}, "
                  f"torchvision {tv:7.0f} (x{tv / fused:.3f})")
        print(f"  load average after: {machine_report('cpu').splitlines()[1].split(': ')[1]}")


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
