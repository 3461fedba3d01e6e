"""Sigmoid focal loss, forward + backward: the reference formula vs `sigmoid_focal_loss_fast`.

    python benchmarks/bench_focal.py                      # (2, 120000, 80), as in training at 800 px
    python benchmarks/bench_focal.py --quick              # fewer repeats
    python benchmarks/bench_focal.py --rounds 3 --threads 1   # interleaved rounds, steadier on a busy machine
    python benchmarks/bench_focal.py --device cuda

Variants: "plain" is `sigmoid_focal_loss` (the formula, differentiated by autograd); "fast eager"
and "fast compiled" are `sigmoid_focal_loss_fast` with its eager and its torch.compile kernel.
Each runs in its own process. Time: median of the repeats after a warm-up call (which compiles),
and the median over rounds. On CPU much of a pass over fresh memory is page faults, which is why
the number of logits-sized buffers allocated matters as much as the arithmetic.
Extra memory: the peak over what the inputs hold, during one forward + backward (the gradient it
leaves counts, for every variant). On CPU that is the peak resident set size: the kernel's peak
(VmHWM) is reset through /proc/self/clear_refs just before the measured call (Linux; torch's large
CPU buffers are mmapped, so freed memory leaves the resident set at once). On CUDA it is
torch.cuda.max_memory_allocated. Each fast variant also checks its loss and gradient against the
plain formula on the same inputs, after measuring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "fast eager", "fast compiled")


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(variant: str, shape: list, repeats: int, device: str, threads: int) -> dict:
    """Run in the child process: time and extra memory of one variant."""
    import torch

    sys.path.insert(0, str(ROOT))
    from retinanet.losses import sigmoid_focal_loss, sigmoid_focal_loss_fast

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(*shape, generator=g, device=device) * 3).requires_grad_()
    # about 1 positive (anchor, class) pair per 1000, as with ~100 foreground anchors of 120k and 80 classes
    targets = (torch.rand(*shape, generator=g, device=device) < 1e-3).float()

    def step():
        logits.grad = None
        if variant == "plain":
            loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
        else:
            loss = sigmoid_focal_loss_fast(logits, targets, alpha=0.25, gamma=2.0, reduction="sum",
                                           compile=variant == "fast compiled")
        loss.backward()
        return loss.detach()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    logits.grad = None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base = _proc_status_kib("VmRSS")
        step()
        extra = (_proc_status_kib("VmHWM") - base) * 1024
    result = {"variant": variant, "time_s": statistics.median(times), "extra_bytes": extra}
    if variant != "plain":  # check against the formula on the same inputs
        loss = step()
        grad = logits.grad.clone()
        logits.grad = None
        ref = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
        ref.backward()
        result["loss_rel_err"] = abs(loss.item() - ref.item()) / abs(ref.item())
        result["grad_max_abs_err"] = (grad - logits.grad).abs().max().item()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 120000, 80], help="logits shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every variant, interleaved (median reported)")
    parser.add_argument("--quick", action="store_true", help="2 timed calls per variant")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    if args.child:
        print(json.dumps(measure(args.child, args.shape, repeats, args.device, args.threads)))
        return 0

    import torch

    print(f"sigmoid focal loss, forward + backward, logits {tuple(args.shape)} float32 on {args.device}; "
          f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
          f"median of {repeats} calls x {args.rounds} round(s)")
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):  # A B C A B C ...: a change in the machine's load hits every variant
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--shape", *map(str, args.shape),
                   "--repeats", str(repeats), "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"  {variant}: failed\n{proc.stderr[-2000:]}")
                continue
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if proc.stderr.strip():  # e.g. the warning that compiling failed and the eager kernel ran
                print(f"  {variant}: {proc.stderr.strip().splitlines()[-1]}")
    results = {}
    for variant, rs in runs.items():
        if rs:
            results[variant] = dict(rs[-1], time_s=statistics.median(r["time_s"] for r in rs),
                                    extra_bytes=statistics.median(r["extra_bytes"] for r in rs))
    plain = results.get("plain")
    print(f"{'variant':<15}{'time (s)':>10}{'extra memory (MiB)':>20}{'plain / this, time':>20}"
          f"{'this / plain, memory':>22}   check vs plain")
    for variant, r in results.items():
        line = f"{variant:<15}{r['time_s']:>10.3f}{r['extra_bytes'] / 2 ** 20:>20.0f}"
        if plain:
            line += f"{plain['time_s'] / r['time_s']:>19.1f}x{r['extra_bytes'] / plain['extra_bytes']:>22.2f}"
        if "loss_rel_err" in r:
            line += f"   loss rel. err {r['loss_rel_err']:.1e}, grad max abs err {r['grad_max_abs_err']:.1e}"
        print(line)
    return 0 if len(results) == len(VARIANTS) else 1


if __name__ == "__main__":
    sys.exit(main())
