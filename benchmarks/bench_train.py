"""Training step time and peak memory: batch 2, 512x512, SGD, same weights for every configuration.
"folded": FrozenBatchNorm2d applied inside its conv (train.fold_frozen_bn).

Step times are measured with every configuration in one process, steps interleaved A B C A B C
(a load change on the shared machine hits all alike); peak memory is measured with each
configuration alone in a fresh process (so its peak RSS is its own):

    python benchmarks/bench_train.py --worker "ours fp32" --weights W.pt   (one configuration, one process)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import (
    ROOT,
    calibrated_model,
    print_table,
    time_interleaved,
    torchvision_layout_config,
    torchvision_module,
    torchvision_retinanet,
)
from retinanet.optimize import compile_network, fold_frozen_bn_for_training  # noqa: E402  (common puts the repository on sys.path)

BATCH, SIZE = 2, 512


def configurations(dtypes: list, compile: bool = False) -> list:
    """Names of the configurations this environment can run, the baseline first."""
    names = []
    if torchvision_module() is not None:
        names.append("torchvision fp32")
        names += [f"torchvision {d} channels_last" for d in dtypes if d != "fp32"]
    names += ["ours fp32", "ours fp32 folded", "ours fp32 channels_last", "ours fp32 channels_last folded"]
    names += [f"ours {d} channels_last{suffix}" for d in dtypes if d != "fp32" for suffix in ("", " folded")]
    if compile:
        names += [f"ours {d} channels_last compiled" for d in dtypes]
    return names


def batch(device: str, seed: int = 0, *, count: int = BATCH, size: int = SIZE) -> tuple:
    """`count` size x size images (default two of 512) with 4 boxes each (xyxy pixels) and labels in 0..90."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(count)]
    targets = []
    for _ in range(count):
        xy = torch.rand(4, 2, generator=g) * (size * 300 / 512)
        wh = (40 + torch.rand(4, 2, generator=g) * 160) * (size / 512)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, 91, (4,), generator=g).to(device)})
    return images, targets


def make_step(name: str, state: dict, device: str, *, count: int = BATCH, size: int = SIZE):
    """A closure running one training step of configuration `name` (forward with the losses,
    backward, SGD step) on `batch(device, count=count, size=size)`, and the list it appends each
    step's total loss to."""
    from retinanet.modeling import build_model

    model = build_model(torchvision_layout_config(min_size=size, max_size=size))
    model.load_state_dict(state)
    if name.startswith("torchvision"):
        model = torchvision_retinanet(model)
    model = model.to(device).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name.split()[1])
    if "channels_last" in name:
        model = model.to(memory_format=torch.channels_last)
    if "folded" in name:  # train.fold_frozen_bn
        fold_frozen_bn_for_training(model)
    if name.endswith("compiled") and not compile_network(model, freezing=False):
        raise RuntimeError("torch.compile does not work here")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    images, targets = batch(device, count=count, size=size)
    losses = []

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))

    return step, losses


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; unlike getrusage's ru_maxrss, it is not
    inherited from the parent that started this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def worker(name: str, weights: str, steps: int, device: str) -> dict:
    """One configuration alone in this process: one warm-up step, `steps` more; peak memory."""
    step, losses = make_step(name, torch.load(weights, map_location="cpu", weights_only=True), device)
    for _ in range(1 + steps):
        step()
    out = {"peak_rss": peak_rss_bytes(), "losses": losses}
    if device.startswith("cuda"):
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
    return out


def run_train(args) -> None:
    print(f"\n== training step, batch {BATCH}, {SIZE}x{SIZE}, SGD (momentum 0.9): forward, losses, backward, step")
    names = configurations(args.dtypes, args.compile)
    state = calibrated_model(torchvision_layout_config(min_size=SIZE, max_size=SIZE)).state_dict()
    # Time: every configuration in this process, steps interleaved A B C A B C ...
    steps = {}
    for name in names:
        steps[name], _ = make_step(name, state, args.device)
    times = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=args.device)
    del steps
    # Memory: each configuration alone in a fresh process.
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        torch.save(state, weights)
        for name in names:
            cmd = [sys.executable, str(Path(__file__)), "--worker", name, "--weights", weights, "--steps", "1",
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"  {name}: the memory run failed\n{proc.stderr[-2000:]}")
                continue
            memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print_table("", list(times.items()), baseline=names[0])
    print(f"  {'peak memory, one configuration per process':<46} {'peak RSS':>10}"
          + (f" {'peak CUDA':>10}" if args.device.startswith("cuda") else "") + "   loss at steps 1, 2")
    for name in names:
        if name not in memory:
            continue
        m = memory[name]
        line = f"  {name:<46} {m['peak_rss'] / 2 ** 30:>6.2f} GiB"
        if args.device.startswith("cuda"):
            line += f" {m['peak_cuda'] / 2 ** 30:>6.2f} GiB"
        print(line + "   " + ", ".join(f"{v:.4f}" for v in m["losses"]))
    best = min(statistics.median(t) for t in times.values())
    print(f"  fastest: {BATCH / best:.2f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", required=True, help="configuration name to run in this process")
    parser.add_argument("--weights", required=True, help="state dict of our model (torchvision's is converted)")
    parser.add_argument("--steps", type=int, default=1, help="steps after the warm-up step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(json.dumps(worker(args.worker, args.weights, args.steps, args.device)))


if __name__ == "__main__":
    main()
