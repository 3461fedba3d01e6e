"""Every GPU check and benchmark in one run: each item's rows as it ends, one summary table at the end.

    python benchmarks/gpu.py --quick --json gpu.json  # the main figures, inside --budget (540 s) on one H100
    python benchmarks/gpu.py --budget 0               # more repeats, longer runs, a compiled training step
    python benchmarks/gpu.py --device cpu --quick     # a dry run without a GPU: small sizes, few iterations
    python benchmarks/gpu.py --only inference,train --json gpu.json

Items (`--only`, default all, run in this order whatever the order given):
  inference    batch 1, 800x1067 image: our fast path (folded BatchNorm, channels_last) in fp32, bf16,
               fp16 against torchvision's retinanet_resnet50_fpn in fp32 with the same weights (when
               torchvision imports; else our plain fp32), and how far their detections agree
  batch        the same at batch 8, ms per image
  postprocess  post-processing alone (163k anchors x 91 classes, ~5000 scores above 0.05), ours vs torchvision's
  train        a training step (forward, losses, backward, SGD) of batch 16 at 800x800: ours bf16
               channels_last (and fp32) against torchvision fp32, images/s; peak CUDA memory per training
               image; host synchronizations in one step of ours
  e2e          `retinanet train` (retinanet.engine.train) on JPEG files written to a temp folder, through
               the real loader (uint8 pinned batches, resized on the GPU), bf16 channels_last: images/s
  loader       the training loader alone on the same files: images/s, GPU path (uint8) and float path
  syncs        host synchronizations per step of the engine (tiny model, 2 micro-batches per step)
  frcnn        FPN Faster R-CNN against torchvision's fasterrcnn_resnet50_fpn with the same weights
               (benchmarks/bench_faster_rcnn.py in a subprocess): inference at 800x1066 and a training
               step of 2 images of 512 px, each configuration's ms and ratio; needs torchvision
  tests        pytest tests/test_cuda.py (sync-free step, fp16/bf16, NMS, Predictor, DDP, compile): pass/fail,
               last, with a per-test timeout where pytest-timeout is installed
With `--device cpu` the sizes shrink (inference at 256 px, batch 2, training steps of 2 images of
256 px, a few iterations) so that a 2-core machine finishes in minutes; the figures then only show
that every item runs. Models have random weights in torchvision's R50-FPN layout (benchmarks/common.py).
A failing item is a row of the table ("FAILED: ...", the traceback on stderr); the others go on.

The run keeps to a time budget (`--budget`, seconds from the start of `main`; the default fits a
10-minute call on a lent GPU machine with the wheels' install and Python's start-up): an item runs
only if its expected duration (ITEM_SECONDS) fits in what is left after the time kept for the tests,
which run last; an item still running at its limit is stopped (SIGALRM), and each subprocess's
limit lies inside it. Skipped and stopped items are rows of the table that say why. The rows are
printed as each item ends and `--json` is rewritten after every item, so a run cut short still
leaves what it measured. The data loader's workers start by forkserver (not fork: CUDA is
initialized in this process) and are as many as /dev/shm holds their batches for.
The exit code is 1 if an item failed or was stopped, or tests/test_cuda.py did not pass.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (ROOT, calibrated_model, compare_detections, cpu_model, load_average,  # noqa: E402
                    set_candidate_load, time_interleaved, torchvision_layout_config, torchvision_module,
                    torchvision_postprocess, torchvision_retinanet)

ITEMS = ["inference", "batch", "postprocess", "train", "e2e", "loader", "syncs", "frcnn", "tests"]

# Seconds each item is expected to take: (GPU --quick, GPU without --quick, CPU dry run --quick). The GPU
# figures are estimates (no GPU has run this script yet); the CPU ones are what the dry run took on the
# shared 2-core machine under a load of 4-5 (train: stopped at 324 s there; an idle machine takes a fraction).
# They decide what the budget skips; nothing is stopped for exceeding them, only for exceeding the budget.
ITEM_SECONDS = {"inference": (60, 90, 70), "batch": (20, 40, 110), "postprocess": (10, 20, 10),
                "train": (60, 150, 330), "e2e": (45, 120, 75), "loader": (20, 40, 10), "syncs": (15, 15, 15),
                "frcnn": (90, 180, 60), "tests": (150, 180, 15)}
DEFAULT_BUDGET = 540  # a 600 s device call less the wheels' install, Python's start-up and the final table


@dataclass
class Profile:
    """Sizes and counts of one run."""

    infer: tuple  # (min_size, max_size, (h, w) of the test image)
    many: int  # the inference batch of the `batch` item
    train_batch: int
    train_size: int
    repeats: int  # timed rounds per configuration
    warmup: int
    e2e_images: int  # JPEG files written
    e2e_shape: tuple  # (h, w) of each file
    e2e_min_size: int  # the model's shorter side (the loader resizes to it)
    e2e_batch: int
    e2e_iterations: int
    loader_batches: int
    workers: int  # loader worker processes (fewer where /dev/shm cannot hold their batches)
    start_method: str  # how the loader's workers start


def profile(device: str, quick: bool) -> Profile:
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    method = WORKER_START_METHOD if WORKER_START_METHOD in multiprocessing.get_all_start_methods() else "spawn"
    if device.startswith("cuda"):
        return Profile(infer=(800, 1333, (800, 1067)), many=8, train_batch=16, train_size=800,
                       repeats=5 if quick else 10, warmup=2, e2e_images=128 if quick else 256, e2e_shape=(480, 640),
                       e2e_min_size=800, e2e_batch=16, e2e_iterations=30 if quick else 90,
                       loader_batches=20 if quick else 50, workers=workers, start_method=method)
    return Profile(infer=(256, 427, (256, 341)), many=2, train_batch=2, train_size=256, repeats=2 if quick else 3,
                   warmup=1, e2e_images=16, e2e_shape=(120, 160), e2e_min_size=128, e2e_batch=2,
                   e2e_iterations=4 if quick else 8, loader_batches=4, workers=min(2, workers), start_method=method)


def item_seconds(item: str, device: str, quick: bool) -> float:
    gpu_quick, gpu_full, cpu = ITEM_SECONDS[item]
    return (gpu_quick if quick else gpu_full) if device.startswith("cuda") else cpu


class BudgetExceeded(BaseException):
    """Raised in the main thread when an item runs past its limit (a BaseException, so that no
    `except Exception` inside an item swallows it)."""


class Budget:
    """The run's time budget: how long each item may run, and which items do not fit.

    seconds: the whole run's (0: no limit). expected: item -> seconds it is expected to take. The
    tests run last and keep their expected time: an item before them may use what is left less that
    and SLACK (for the clean-up after an item stopped at its limit). The tests start with half their
    expected time left: a partial run still says which tests passed and which one was running.
    """

    SLACK = 15.0

    def __init__(self, seconds: float, expected: dict, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.expected, self.clock = seconds, expected, clock
        self.deadline = clock() + seconds if seconds > 0 else float("inf")

    def left(self) -> float:
        return self.deadline - self.clock()

    def limit(self, item: str, to_come: list) -> float:
        """Seconds `item` may run, with `to_come` (the items after it) still to run."""
        return self.left() - (self.expected["tests"] + self.SLACK if "tests" in to_come else 0.0)

    def skip_reason(self, item: str, to_come: list) -> Optional[str]:
        """Why `item` does not fit (None if it does)."""
        limit, need = self.limit(item, to_come), self.expected[item] / (2 if item == "tests" else 1)
        if limit >= need:
            return None
        kept = f", {self.expected['tests'] + self.SLACK:.0f} s of it kept for the tests" if "tests" in to_come else ""
        return (f"time budget: needs about {need:.0f} s, {max(self.left(), 0):.0f} s left of --budget "
                f"{self.seconds:g}{kept}")


class stop_after:
    """Raise BudgetExceeded in the main thread after `seconds` (SIGALRM; no limit where the platform has
    none, or for an infinite limit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = hasattr(signal, "setitimer") and seconds != float("inf")

    def _raise(self, signum, frame):
        raise BudgetExceeded(f"ran past its {self.seconds:.0f} s limit")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.01))
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


# ---------------------------------------------------------------------------------------------- device, workers


def setup_device(spec: str) -> torch.device:
    """`--device` -> the torch.device every item runs on: cpu, or cuda with an index (a bare "cuda" is
    torch's current GPU), set as the current device. ValueError (one line) for a GPU torch does not see."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is not None and device.type == "cpu":
        return device
    if device is None or device.type != "cuda":
        raise ValueError(f"--device {spec}: use cuda, cuda:N or cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}, but torch sees no CUDA GPU (use --device cpu for a dry run)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"--device {spec}, but torch sees {count} GPU{'s' if count > 1 else ''} "
                         f"(cuda:0 to cuda:{count - 1})")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)  # it takes an indexed device only
    torch.backends.cudnn.benchmark = True  # fixed sizes here; the same setting for torchvision and ours
    return device


WORKER_START_METHOD = "forkserver"  # workers forked from a clean server process, not from this one (CUDA state)
PREFETCH_BATCHES = 2  # torch DataLoader's default prefetch_factor: batches in flight per worker


def shm_free_bytes(path: str = "/dev/shm") -> Optional[int]:
    """Free bytes in the shared memory that the loader's workers hand their batches over in (None: no such
    file system here)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fit_workers(wanted: int, batch_bytes: int, shm_free: Optional[int]) -> tuple:
    """Loader workers whose batches fit in half the free shared memory: each worker holds up to
    PREFETCH_BATCHES batches there, and the main process two more (the one in hand, the one being pinned).
    -> (workers, a line that says why)."""
    mib = f"{batch_bytes / 2 ** 20:.0f} MiB"
    if shm_free is None:
        return wanted, f"no /dev/shm to check; {wanted} workers as planned (batches of up to {mib})"
    fit = max(0, int((shm_free / 2 / batch_bytes - 2) // PREFETCH_BATCHES))
    free = f"/dev/shm has {shm_free / 2 ** 30:.1f} GiB free"
    if fit >= wanted:
        return wanted, f"{free}: room for {wanted} workers' batches (up to {mib} each, {PREFETCH_BATCHES} per worker)"
    return fit, (f"{free}: {fit} workers instead of {wanted} (each holds up to {PREFETCH_BATCHES} batches of "
                 f"{mib} there; 0 loads in the main process)")


def loader_batch_bytes(prof: Profile) -> int:
    """The largest training batch the e2e and loader items hand over: float32 images resized to the
    model's size (the CPU path; the GPU path's uint8 at the files' size is smaller)."""
    h, w = prof.e2e_shape
    scale = min(prof.e2e_min_size / min(h, w), prof.e2e_min_size * 5 // 3 / max(h, w))
    return prof.e2e_batch * 3 * round(h * scale) * round(w * scale) * 4


@dataclass
class Row:
    item: str
    config: str
    value: str
    unit: str = ""
    versus: str = ""  # against the item's baseline
    note: str = ""
    failed: bool = False


# ---------------------------------------------------------------------------------------------- environment


COCO_LIBRARIES = ("orjson", "hotcoco", "pycocotools")  # what the GPU machine lacks (BENCHMARKS.md: the wheels)


def library_origins(names=COCO_LIBRARIES) -> tuple:
    """-> ("name version (folder it imports from), ...", [names that do not import])."""
    found, missing = [], []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            missing.append(name)
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        found.append(f"{name} {version} ({Path(spec.origin).parent.parent})")
    return ", ".join(found + [f"{name} absent" for name in missing]), missing


def environment(device: str, budget: Budget) -> dict:
    """The card, driver and library versions (and the CPU, which feeds the GPU)."""
    tv = torchvision_module()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": tv.__version__ if tv is not None else "absent (baselines: our plain fp32)",
           "coco libraries": library_origins()[0], "PYTHONPATH": os.environ.get("PYTHONPATH", "(unset)"),
           "cpu": f"{cpu_model()}, {os.cpu_count()} cores", "load average": load_average()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = (f"{device}: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, "
                      f"{props.multi_processor_count} SMs")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True,
                                           timeout=max(1.0, min(30.0, budget.left()))).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi did not answer)"
        env["cuda (torch build)"] = torch.version.cuda
        env["cudnn"] = str(torch.backends.cudnn.version())
        env["settings"] = (f"cudnn.benchmark {torch.backends.cudnn.benchmark}, cudnn TF32 "
                           f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}")
    else:
        env["gpu"] = "none: --device cpu (a dry run; figures are not GPU figures)"
        env["settings"] = f"torch threads {torch.get_num_threads()}"
    return env


# ---------------------------------------------------------------------------------------------- items


def run_streamed(cmd: list, limit: float, prefix: str = "  | ") -> tuple:
    """Run `cmd` in the repository with the repository and this process's PYTHONPATH (the carried wheels)
    on its path, echoing its output (stdout and stderr merged) line by line as it comes, so that a run
    cut short still shows how far it got. Killed, with its children, after `limit` seconds or when this
    process is interrupted. -> (exit code, None if killed at the limit; its lines)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # its own process group, killed as one
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(prefix + lines[-1], flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = None
    try:
        code = proc.wait(timeout=max(limit, 1.0) if limit != float("inf") else None)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if code is None:  # the limit, or BudgetExceeded / KeyboardInterrupt in this process
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(timeout=10)
    return code, lines


def pytest_outcome(code: Optional[int], lines: list, limit: float) -> tuple:
    """A `pytest -v` run's result -> (summary, failed or unfinished tests). Without pytest's closing line
    (`code` None: killed at `limit` seconds; else a crash, e.g. NCCL's watchdog aborting the process) the
    summary counts the outcomes printed so far and the list names the test that was running."""
    import re

    outcome_re = r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
    outcomes = [m.groups() for m in (re.match(r"^\S+::(\S+)\s+" + outcome_re, line) for line in lines) if m]
    failed = list(dict.fromkeys(name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")))
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and (
        "passed" in line or "failed" in line or "skipped" in line or "error" in line)), None)
    if summary is not None and code is not None:
        return summary.split(" in ")[0], failed
    counts = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    running = next((line.split("::", 1)[1].split()[0] for line in reversed(lines)
                    if re.match(r"^\S+::", line) and not re.search(outcome_re, line)), None)
    done = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no test finished"
    ended = f"stopped at its {limit:.0f} s limit" if code is None else f"ended without a summary (exit code {code})"
    return f"{ended}: {done}", failed + ([f"{running} (running)"] if running else [])


def item_tests(args, prof: Profile, shared: dict) -> list:
    """tests/test_cuda.py in a subprocess, inside the time left: its summary line. With pytest-timeout
    (on the GPU machine; not required here) each test also stops after --test-timeout seconds."""
    limit = shared["limit"] - 10  # room to kill it and report before this item's own limit
    per_test = min(args.test_timeout, limit)
    timeout = importlib.util.find_spec("pytest_timeout") is not None
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    cmd += ["--timeout", f"{per_test:.0f}"] if timeout else []
    code, lines = run_streamed(cmd, limit)
    summary, failed = pytest_outcome(code, lines, limit)
    if code not in (0, None) and not failed:
        print("\n".join(lines[-40:]), file=sys.stderr)
    note = ("failed: " + ", ".join(failed)) if failed else ("no CUDA: every test skipped" if "skipped" in summary
                                                            and "passed" not in summary else "")
    note += ("; " if note else "") + (f"per-test timeout {per_test:.0f} s" if timeout else
                                      "no per-test timeout (pytest-timeout is not installed)")
    return [Row("tests", "pytest tests/test_cuda.py", summary, "", "", note[:300], failed=code != 0)]


def _variants(args, prof: Profile, shared: dict) -> tuple:
    """The inference configurations (built once for `inference`, `batch`, `postprocess`) and the image."""
    if "variants" not in shared:
        from bench_inference import build_variants

        min_size, max_size, (h, w) = prof.infer
        torch.manual_seed(1)
        image = torch.rand(3, h, w)
        ns = argparse.Namespace(device=args.device, candidates=5000, quick=True, compile=False,
                                dtypes=["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32", "bf16"])
        shared["variants"] = (build_variants(ns, min_size, max_size, image), image.to(args.device))
    return shared["variants"]


def _time_variants(args, prof: Profile, variants: list, images: list) -> dict:
    def call(v):
        def fn():
            with v.context():
                v.model(images)
        return fn

    return time_interleaved({v.name: call(v) for v in variants}, repeats=prof.repeats, warmup=prof.warmup,
                            device=args.device)


def _timing_rows(item: str, times: dict, per: int, unit: str) -> list:
    base_name = next(iter(times))
    base = statistics.median(times[base_name])
    rows = []
    for name, samples in times.items():
        med = statistics.median(samples)
        rows.append(Row(item, name + (" (baseline)" if name == base_name else ""), f"{1000 * med / per:.1f}", unit,
                        f"{base / med:.2f}x", f"range {1000 * min(samples) / per:.1f}-{1000 * max(samples) / per:.1f}"))
    return rows


def item_inference(args, prof: Profile, shared: dict) -> list:
    variants, image = _variants(args, prof, shared)
    h, w = prof.infer[2]
    rows = _timing_rows("inference", _time_variants(args, prof, variants, [image]), 1, f"ms ({h}x{w}, b1)")
    results = {}
    for v in variants:
        with v.context():
            results[v.name] = v.model([image])
    base = variants[0].name
    for v in variants[1:]:
        if v.name.startswith("ours"):
            rel = 1e-3 if v.dtype is None else 5e-2  # reduced precision moves scores, boxes and the ranking
            c = compare_detections(results[v.name], results[base], rel=rel)
            rows.append(Row("inference", f"detections: {v.name.split(' (')[0]}", f"{c['matched']}/{c['total']}",
                            f"same label, box within {rel:g}", f"vs {base}",
                            f"worst box difference {c['worst_rel']:.1e} relative; {c['count_ours']} detections"))
    return rows


def item_batch(args, prof: Profile, shared: dict) -> list:
    variants, image = _variants(args, prof, shared)
    chosen = [v for v in variants if v.name == variants[0].name or v.name.startswith("ours fast")]
    times = _time_variants(args, prof, chosen, [image] * prof.many)
    return _timing_rows("batch", times, prof.many, f"ms/image (b{prof.many})")


def item_postprocess(args, prof: Profile, shared: dict) -> list:
    from retinanet.modeling.detector import ImageBatch

    variants, image = _variants(args, prof, shared)
    model = next(v.model for v in variants if v.name == "ours plain fp32")  # its candidate load is set
    with torch.no_grad():
        pre = model.preprocess([image])
        cls_logits, box_deltas, anchors, level_sizes = model.forward_features(pre.tensor)
    above = int((torch.sigmoid(cls_logits) > model.score_thresh).sum())
    split = anchors.split(level_sizes)
    fns = {}
    if torchvision_module() is not None:
        net = next(v.model for v in variants if v.name == "torchvision fp32")
        fns["torchvision postprocess_detections"] = lambda: torchvision_postprocess(
            net, cls_logits, box_deltas, anchors, level_sizes, pre.image_sizes)
    fns["ours, vectorized"] = lambda: model.postprocess((cls_logits, box_deltas, *split),
                                                        ImageBatch(None, pre.image_sizes, pre.image_sizes))
    with torch.no_grad():
        times = time_interleaved(fns, repeats=prof.repeats * 2, warmup=prof.warmup, device=args.device)
    rows = _timing_rows("postprocess", times, 1, "ms")
    rows[-1].note += f"; {cls_logits.shape[1]} anchors x {cls_logits.shape[2]} classes, {above} scores > 0.05"
    return rows


def item_train(args, prof: Profile, shared: dict) -> list:
    from bench_train import make_step

    from retinanet.syncs import SyncRecorder

    cuda = args.device.startswith("cuda")
    size, count = prof.train_size, prof.train_batch
    state = calibrated_model(torchvision_layout_config(min_size=size, max_size=size)).state_dict()
    names = ["torchvision fp32"] if torchvision_module() is not None else ["ours fp32"]
    names += ["ours fp32 channels_last", "ours bf16 channels_last"]
    if not args.quick and cuda:
        names.append("ours bf16 channels_last compiled")
    steps = {name: make_step(name, state, args.device, count=count, size=size)[0] for name in names}
    times = time_interleaved(steps, repeats=prof.repeats, warmup=prof.warmup, device=args.device)
    rows = []
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        rows.append(Row("train", name + (" (baseline)" if name == names[0] else ""), f"{count / med:.3g}",
                        f"images/s (b{count}, {size}x{size})", f"{base / med:.2f}x",
                        f"step {1000 * med:.0f} ms, range {1000 * min(times[name]):.0f}-{1000 * max(times[name]):.0f}"))
    with SyncRecorder() as syncs:  # one step of ours: model forward/backward, SGD, and the benchmark's loss read
        steps["ours bf16 channels_last"]()
    rows.append(Row("train", "host syncs in one step of ours", str(len(syncs.records)), "syncs", "",
                    "; ".join(f"{op} at {where.rsplit('/', 1)[-1]}" for op, where in syncs.records[:4])
                    + " (1 expected on a GPU: bench_train.py reading the loss; on the CPU the box loss's"
                    " nonzero, free there, adds 1)"))
    del steps
    gc.collect()
    if cuda:
        for name in names:
            if name.endswith("compiled"):
                continue
            torch.cuda.empty_cache()
            step, _ = make_step(name, state, args.device, count=count, size=size)
            step()  # the optimizer state exists from here on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            peak = torch.cuda.max_memory_allocated()
            del step
            rows.append(Row("train", f"peak CUDA memory: {name}", f"{peak / count / 2 ** 30:.2f}", "GiB/image",
                            "", f"{peak / 2 ** 30:.1f} GiB for the batch of {count}, weights and momentum included"))
    else:
        rows.append(Row("train", "peak CUDA memory", "n/a", "", "", "CPU run"))
    return rows


def write_jpeg_dataset(folder: Path, count: int, shape: tuple, seed: int = 0) -> tuple:
    """`count` JPEG files (smooth background, 1-8 filled rectangles, mild noise) and their COCO JSON."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images, annotations = [], []
    for i in range(count):
        img = rng.uniform(40, 215, 3) + yy[..., None] * rng.uniform(-0.15, 0.15, 3) + xx[..., None] * rng.uniform(
            -0.15, 0.15, 3)
        for _ in range(int(rng.integers(1, 9))):
            bw, bh = int(rng.integers(w // 16, w // 2)), int(rng.integers(h // 16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            img[y:y + bh, x:x + bw] = rng.uniform(0, 255, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 5)),
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / "images" / f"{i:05d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "height": h, "width": w})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 5)]
    json_path = folder / "train.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path, folder / "images"


def _jpeg_config(args, prof: Profile, shared: dict):
    """The e2e/loader config on the JPEG files (written once per run)."""
    if "jpegs" not in shared:
        folder = Path(tempfile.mkdtemp(prefix="retinanet-gpu-bench-"))
        shared["tmp"] = folder
        shared["jpegs"] = write_jpeg_dataset(folder / "data", prof.e2e_images, prof.e2e_shape)
    json_path, images = shared["jpegs"]
    cfg = torchvision_layout_config(num_classes=4, min_size=prof.e2e_min_size, max_size=prof.e2e_min_size * 5 // 3)
    d, t = cfg.data, cfg.train
    d.train_json, d.train_images = str(json_path), str(images)
    d.batch_size, d.num_workers = prof.e2e_batch, prof.workers
    t.device, t.lr, t.warmup_iters = args.device, 0.001, 5
    t.channels_last = True
    t.amp = "bf16" if args.device.startswith("cuda") else "none"  # bf16 on a CPU without AMX is slower
    return cfg


def item_e2e(args, prof: Profile, shared: dict) -> list:
    from retinanet.engine import train

    cfg = _jpeg_config(args, prof, shared)
    t = cfg.train
    t.iterations = prof.e2e_iterations
    t.log_every = max(1, prof.e2e_iterations // 3)
    t.checkpoint_every = prof.e2e_iterations
    out = shared["tmp"] / f"run-{time.time_ns()}"
    start = time.perf_counter()
    train(cfg, str(out), progress=False)
    wall = time.perf_counter() - start
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    speeds = [r["images_per_s"] for r in logged]
    steady = speeds[1:] or speeds  # the first window holds the warm-up (and the focal loss's compilation)
    h, w = prof.e2e_shape
    return [Row("e2e", f"retinanet train, {t.amp} channels_last, {prof.workers} workers ({prof.start_method})",
                f"{statistics.median(steady):.3g}", f"images/s (b{prof.e2e_batch})", "",
                f"{h}x{w} JPEGs -> shorter side {prof.e2e_min_size}; windows of {t.log_every} iterations: "
                + ", ".join(f"{s:.1f}" for s in speeds) + f"; {wall:.0f} s in all with start-up"),
            Row("e2e", "final loss", f"{logged[-1]['loss']:.3f}", "", "", f"iteration {logged[-1]['iteration']}")]


def item_loader(args, prof: Profile, shared: dict) -> list:
    from retinanet.data.loader import build_train_dataset, build_train_loader

    cfg = _jpeg_config(args, prof, shared)
    dataset = build_train_dataset(cfg)
    cuda = args.device.startswith("cuda")
    rows = []
    for label, pending in (("uint8, pinned (the GPU path)" if cuda else "uint8 (the GPU path)", True),
                           ("float32, resized on the CPU (the CPU path)", False)):
        batches = iter(build_train_loader(cfg, dataset, seed=0, pin_memory=cuda and pending, pending_images=pending))
        next(batches)  # worker start-up
        start, count = time.perf_counter(), 0
        for _ in range(prof.loader_batches):
            images, _ = next(batches)
            count += len(images)
        rate = count / (time.perf_counter() - start)
        rows.append(Row("loader", label, f"{rate:.0f}", "images/s", "",
                        f"{prof.workers} workers ({prof.start_method}), {prof.loader_batches} batches of "
                        f"{prof.e2e_batch}"))
        del batches
    return rows


def syncs_per_step(short: list, long: list, steps: int) -> dict:
    """Syncs per step that a run of `steps` more iterations adds: (op, where) -> (count in `long` - count
    in `short`) / steps, nonzero only. A sync seen only in the shorter run counts negative."""
    from collections import Counter

    added = Counter(long)
    added.subtract(short)
    return {key: n / steps for key, n in added.items() if n}


def item_syncs(args, prof: Profile, shared: dict) -> list:
    """Syncs the engine adds per step: a run of 4 iterations minus a run of 2, tiny model."""
    from retinanet.config import Config
    from retinanet.data.synthetic import make_shapes_dataset
    from retinanet.engine import train
    from retinanet.syncs import SyncRecorder

    folder = Path(tempfile.mkdtemp(prefix="retinanet-gpu-syncs-"))
    shapes = make_shapes_dataset(str(folder / "data"), num_train=8, num_val=2, image_size=64, seed=0)
    counts = []
    for iterations in (2, 4):
        cfg = Config()
        m, d, t = cfg.model, cfg.data, cfg.train
        m.num_classes, m.backbone, m.backbone_width, m.backbone_norm, m.frozen_stages = 4, "resnet18", 8, "gn", 0
        m.fpn_channels = m.head_channels = 16
        m.head_convs, m.min_level, m.max_level, m.anchor_sizes, m.min_size, m.max_size = 1, 3, 6, [16.0, 32.0, 64.0,
                                                                                                  128.0], 64, 64
        d.train_json, d.train_images = str(shapes.train_json), str(shapes.train_images)
        d.batch_size, d.num_workers, d.aspect_grouping = 4, 0, False
        t.iterations, t.accumulate, t.device, t.checkpoint_every, t.log_every = iterations, 2, args.device, 100, 100
        with SyncRecorder() as syncs:
            train(cfg, str(folder / f"run{iterations}"), progress=False)
        counts.append([(op, where.rsplit("/", 1)[-1]) for op, where in syncs.records if "/retinanet/data/" not in where])
    per_step = syncs_per_step(counts[0], counts[1], 2)
    note = "; ".join(f"{op} at {where}: {n:g}" for (op, where), n in per_step.items())
    if not args.device.startswith("cuda"):
        note += " (on the CPU the box loss picks the foreground with nonzero, free there; a GPU takes the mask path)"
    return [Row("syncs", "engine, per optimizer step (2 micro-batches)", f"{sum(per_step.values()):g}", "syncs", "",
                note)]


def item_frcnn(args, prof: Profile, shared: dict) -> list:
    """benchmarks/bench_faster_rcnn.py on this device: one row per timed configuration."""
    cmd = [sys.executable, str(HERE / "bench_faster_rcnn.py"), "--device", args.device] + (
        ["--quick"] if args.quick else [])
    limit = shared["limit"] - 10  # room to kill it and report before this item's own limit
    code, lines = run_streamed(cmd, limit)
    out = "\n".join(lines)
    if code is None:
        return [Row("frcnn", "-", "STOPPED", "", "", f"killed at its {limit:.0f} s limit (the time budget)",
                    failed=True)]
    if code != 0:
        if "No module named 'torchvision'" in out:
            return [Row("frcnn", "-", "skipped", "", "", "torchvision is not importable")]
        return [Row("frcnn", "-", "FAILED", "", "", f"exit code {code}", failed=True)]
    return parse_bench_rows("frcnn", out)


def parse_bench_rows(item: str, text: str) -> list:
    """Rows from a benchmark's report: a title line, then "  <configuration>  <ms> ms  <ratio>x" lines
    (the first configuration the baseline); a "detections: ..." line becomes the note of the first row."""
    import re

    rows, title, note = [], "", ""
    for line in text.splitlines():
        timed = re.match(r"^\s{2}(\S.*?)\s+([\d.]+) ms\s+([\d.]+)x\s*$", line)
        if timed:
            name, ms, ratio = timed.groups()
            rows.append(Row(item, f"{title}: {name}" if title else name, ms, "ms", f"{ratio}x"))
        elif line.startswith("detections:"):
            note = line
        elif line.strip() and not line.startswith(" "):
            title = line.split(",")[0].strip()
    if rows and note:
        rows[0].note = note[:200]
    return rows or [Row(item, "-", "FAILED", "", "", "no timings in the output", failed=True)]


RUNNERS = {"tests": item_tests, "inference": item_inference, "batch": item_batch, "postprocess": item_postprocess,
           "train": item_train, "e2e": item_e2e, "loader": item_loader, "syncs": item_syncs, "frcnn": item_frcnn}


# ---------------------------------------------------------------------------------------------- main


def print_table(rows: list) -> None:
    headers = ("item", "configuration", "value", "unit", "vs baseline", "note")
    cells = [headers] + [(r.item, r.config, r.value, r.unit, r.versus, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells[:]) if i < 5 else 0 for i in range(6)]
    widths = [min(w, 60) for w in widths]
    for k, c in enumerate(cells):
        print("  ".join(f"{c[i][:widths[i]]:<{widths[i]}}" if i < 5 else c[i] for i in range(6)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths[:5]) + "  " + "-" * 4)
    sys.stdout.flush()


def write_report(path: Optional[str], report: dict) -> None:
    """`--json`, rewritten whole after every item (a temporary file renamed over it: never half written)."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a dry run at small sizes)")
    parser.add_argument("--quick", action="store_true", help="the main figures: fewer repeats, shorter runs")
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items (default: {','.join(ITEMS)})")
    parser.add_argument("--json", help="also write the environment and the rows to this file (after every item)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"seconds for the whole run, from here on (default {DEFAULT_BUDGET}, inside a 10-minute "
                             "call on a lent GPU machine); items that would not fit are skipped, an item past it "
                             "stopped; 0: no limit")
    parser.add_argument("--test-timeout", type=float, default=180,
                        help="seconds per test of tests/test_cuda.py, where pytest-timeout is installed (default 180)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget, {})
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    items = [name for name in ITEMS if name in chosen]  # the tests last
    try:
        args.device = str(setup_device(args.device))
    except ValueError as e:
        parser.error(str(e))
    budget.expected = {name: item_seconds(name, args.device, args.quick) for name in ITEMS}
    prof = profile(args.device, args.quick)
    wanted = prof.workers
    prof.workers, workers_note = fit_workers(wanted, loader_batch_bytes(prof), shm_free_bytes())
    multiprocessing.set_start_method(prof.start_method, force=True)  # the DataLoader's default context
    env = environment(args.device, budget)
    env["loader workers"] = (f"{prof.workers}, started by {prof.start_method} (not fork: CUDA is initialized in "
                             f"this process); {workers_note}")
    env["time budget"] = (f"{args.budget:g} s" if args.budget > 0 else "none") + (
        ", items expected to take: " + ", ".join(f"{n} {budget.expected[n]:.0f} s" for n in items))
    print(f"retinanet GPU benchmark, {time.strftime('%Y-%m-%d %H:%M')}: python benchmarks/gpu.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    for key, value in env.items():
        print(f"  {key}: {value}")
    print(f"  profile: {asdict(prof)}")
    missing = library_origins()[1]
    if missing:
        print(f"  WARNING: {', '.join(missing)} do not import: evaluation (tests/test_cuda.py, the engine) needs "
              "them; carry the wheels as BENCHMARKS.md (GPU benchmark script) says", flush=True)
    rows, shared, started = [], {}, time.perf_counter()
    report = {"environment": env, "profile": asdict(prof), "rows": [], "finished": False}
    for k, name in enumerate(items):
        start = time.perf_counter()
        skip = budget.skip_reason(name, items[k + 1:])
        if skip:
            new = [Row(name, "-", "skipped", "", "", skip)]
        else:
            shared["limit"] = budget.limit(name, items[k + 1:])
            print(f"\n[{name}] running (about {budget.expected[name]:.0f} s expected, at most "
                  f"{shared['limit']:.0f} s) ...", flush=True)
            try:
                with stop_after(shared["limit"]):
                    new = RUNNERS[name](args, prof, shared)
            except BudgetExceeded as e:
                new = [Row(name, "-", "STOPPED", "", "", f"{e} (the time budget); its rows are lost", failed=True)]
            except KeyboardInterrupt:
                rows.append(Row(name, "-", "INTERRUPTED", "", "", "KeyboardInterrupt", failed=True))
                break
            except Exception as e:  # reported in the table; the other items still run
                traceback.print_exc()
                new = [Row(name, "-", "FAILED", "", "", f"{type(e).__name__}: {e}"[:300].replace("\n", " "),
                           failed=True)]
        rows += new
        print(f"[{name}] {time.perf_counter() - start:.0f} s; {time.perf_counter() - started:.0f} s since the start",
              flush=True)
        print_table(new)
        report.update(rows=[asdict(r) for r in rows], elapsed_s=round(time.perf_counter() - started, 1))
        write_report(args.json, report)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "tmp" in shared:
        import shutil

        shutil.rmtree(shared["tmp"], ignore_errors=True)
    print(f"\nSummary ({args.device}{', quick' if args.quick else ''}; {time.perf_counter() - started:.0f} s; "
          f"load average now {load_average()}):\n")
    print_table(rows)
    report.update(rows=[asdict(r) for r in rows], elapsed_s=round(time.perf_counter() - started, 1), finished=True)
    write_report(args.json, report)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
